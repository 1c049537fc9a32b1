from distillery.config import load_config
from distillery.search.trial import describe, flat, model_macs


def test_a_drawn_model_pair_is_spelt_out_and_described():
    cfg = load_config(None)
    settings = {"model": [0.5, 1], "temperature": 2.0, "alpha": 1.0, "epochs": 400, "augment": True}
    assert flat(settings) == {"temperature": 2.0, "alpha": 1.0, "epochs": 400, "augment": True,
                              "width_mult": 0.5, "recipe": 1}
    assert describe(cfg, settings) == "cnn x0.5, T=2, alpha=1, 400 epochs, augmented -> int8_static"


def test_the_work_of_a_width_after_its_recipe_is_counted_before_any_training():
    cfg = load_config(None, ["search.space.recipe=[[], [{kind: prune_channels, mac_ratio: 2.0, round_to: 1}, "
                             "{kind: finetune}], [{kind: prune_channels, mac_ratio: 40.0, round_to: 8}, "
                             "{kind: finetune}]]"])
    plain = model_macs(cfg, 0.5, 0, [1, 8, 8], 10)
    pruned = model_macs(cfg, 0.5, 1, [1, 8, 8], 10)
    assert plain == 91_776  # the default student's, as a run's console says
    assert plain / 2.2 <= pruned <= plain / 1.8
    # unreachable: the trial fails at its start instead
    assert model_macs(cfg, 0.25, 2, [1, 8, 8], 10) is None
