"""The confidence cascade: threshold choice on hand-made outcomes (known answers), row-by-row
predictions, a save/reload round trip, and the recipe rules. In this process, no Ray."""

import pytest
import torch

from distillery import artifacts
from distillery.artifacts import save_model
from distillery.compression import cascade
from distillery.compression.cascade import Cascade, choose_threshold, confidence
from distillery.compression.stage import check_recipes
from distillery.config import CNNConfig, ResNetConfig
from distillery.config.compress import Cascade as CascadeStep
from distillery.config.compress import CompressConfig, Int8Dynamic, VariantConfig
from distillery.core.errors import UserError
from distillery.models.architectures import build_model, make_spec

IN_SHAPE = [1, 8, 8]
SMALL = make_spec(CNNConfig(width_mult=0.5), IN_SHAPE, 10)
LARGE = make_spec(ResNetConfig(width=8, blocks=[1, 1]), IN_SHAPE, 10)


def _t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def test_the_fewest_escalations_that_reach_the_target():
    # Sorted by confidence: the two least confident rows are wrong for the small model and
    # right for the large one; escalating them (and no more) reaches 100%.
    conf = _t([0.9, 0.2, 0.8, 0.3, 0.95])
    small = _t([1, 0, 1, 0, 1], torch.bool)
    large = _t([1, 1, 0, 1, 1], torch.bool)
    got = choose_threshold(conf, small, large, target=1.0)
    assert got == {"threshold": pytest.approx(0.55), "accuracy": 1.0, "escalation": 0.4, "reached": True}
    # a lower target is met by escalating one row: 4 of 5 right
    assert choose_threshold(conf, small, large, target=0.8) == {
        "threshold": pytest.approx(0.25), "accuracy": 0.8, "escalation": 0.2, "reached": True}
    # the small model alone already reaches 60%: nothing escalated
    assert choose_threshold(conf, small, large, target=0.6)["threshold"] == 0.0


def test_an_unreachable_target_takes_the_most_accurate_threshold():
    conf = _t([0.1, 0.5, 0.9])
    small = _t([0, 1, 0], torch.bool)
    large = _t([1, 0, 0], torch.bool)  # escalating the first helps, the second hurts
    got = choose_threshold(conf, small, large, target=1.0)
    assert got == {"threshold": pytest.approx(0.3), "accuracy": pytest.approx(2 / 3),
                   "escalation": pytest.approx(1 / 3), "reached": False}


def test_ties_are_never_split():
    # Rows 0 and 1 share a confidence: escalating exactly one of them is impossible.
    conf = _t([0.4, 0.4, 0.9])
    small = _t([0, 1, 1], torch.bool)
    large = _t([1, 0, 1], torch.bool)
    got = choose_threshold(conf, small, large, target=2 / 3)
    assert got["escalation"] == 0.0 and got["threshold"] == 0.0  # 2/3 already without escalating
    got = choose_threshold(conf, small, large, target=1.0)
    assert got["reached"] is False and got["escalation"] in (0.0, 2 / 3)


def test_escalate_everything_when_only_that_reaches_the_target():
    conf, small, large = _t([0.3, 0.6]), _t([0, 0], torch.bool), _t([1, 1], torch.bool)
    got = choose_threshold(conf, small, large, target=1.0)
    assert got["escalation"] == 1.0 and got["threshold"] == cascade.ESCALATE_ALL


def test_confidence_kinds():
    logits = torch.log(_t([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]]))
    assert confidence(logits, "max_prob").tolist() == pytest.approx([0.7, 0.4])
    assert confidence(logits, "margin").tolist() == pytest.approx([0.5, 0.05])


def _models():
    torch.manual_seed(0)
    return build_model(SMALL).eval(), build_model(LARGE).eval()


@pytest.mark.parametrize("kind", ["max_prob", "margin"])
def test_a_cascade_answers_row_by_row_small_where_confident_else_large(kind):
    small, large = _models()
    x = torch.randn(64, *IN_SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        s, big = small(x), large(x)
        threshold = float(confidence(s, kind).median())
        got = Cascade(small, large, threshold, kind)(x)
    sure = confidence(s, kind) >= threshold
    assert 0 < int(sure.sum()) < 64
    assert torch.equal(got[sure], s[sure]) and torch.allclose(got[~sure], big[~sure], atol=1e-5)


def test_only_the_unsure_rows_reach_the_large_model():
    small, large = _models()
    seen = []
    large.register_forward_hook(lambda m, args, out: seen.append(len(args[0])))
    x = torch.randn(32, *IN_SHAPE)
    with torch.inference_mode():
        unsure = int((confidence(small(x), "max_prob") < 0.5).sum())
        Cascade(small, large, 0.5)(x)
    assert seen == ([unsure] if unsure else [])


def test_a_saved_cascade_reloads_identically_and_verifies_its_members(tmp_path):
    small, large = _models()
    save_model(tmp_path / "s", small, SMALL)
    save_model(tmp_path / "l", large, LARGE)
    artifacts.save_cascade(tmp_path / "c", {"small": tmp_path / "s", "large": tmp_path / "l"}, SMALL,
                       {"threshold": 0.5, "confidence": "margin", "small": "s", "large": "l"})
    model, arch = artifacts.load(tmp_path / "c")
    x = torch.randn(16, *IN_SHAPE)
    with torch.inference_mode():
        assert torch.equal(model(x), Cascade(small, large, 0.5, "margin")(x))
    assert arch["format"] == "cascade" and isinstance(model, Cascade)
    (tmp_path / "c" / "large" / "arch.json").write_text((tmp_path / "c" / "small" / "arch.json").read_text())
    with pytest.raises(UserError, match="large/arch.json"):  # a member swapped: its sha256 no longer matches
        artifacts.load(tmp_path / "c")


def test_cascade_recipe_rules():
    ok = CompressConfig(variants=[VariantConfig(name="c", steps=[CascadeStep(to="teacher")])])
    assert ok.variants[0].describe() == "student -> cascade(to=teacher)"
    with pytest.raises(ValueError, match="only step"):
        VariantConfig(name="c", steps=[CascadeStep(to="teacher"), Int8Dynamic()])
    with pytest.raises(ValueError, match="cascade to 'nope'"):
        CompressConfig(variants=[VariantConfig(name="c", steps=[CascadeStep(to="nope")])])


def test_nothing_is_built_on_a_cascade_but_a_cascade_may_join_quantized_models():
    bases = {"student": build_model(SMALL), "teacher": build_model(LARGE)}
    variants = [VariantConfig(name="q", steps=[Int8Dynamic()]),
                VariantConfig(name="c", parent="q", steps=[CascadeStep(to="teacher")])]
    check_recipes(variants, bases, IN_SHAPE)  # a quantized small model is fine
    with pytest.raises(UserError, match="'c' is a cascade"):
        check_recipes([*variants, VariantConfig(name="d", parent="c", steps=[Int8Dynamic()])], bases,
                      IN_SHAPE)
