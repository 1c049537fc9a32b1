"""Compression recipes, in this process: bad recipes must fail at config load or before any
work, and a variant names the arithmetic it computes in.
"""

import pytest
from compression_models import BASES, IN_SHAPE, variant_configs

from distillery.compression.stage import check_recipes
from distillery.config import from_dict
from distillery.config.compress import VariantConfig
from distillery.core.errors import UserError
from distillery.models.architectures import build_model, make_spec

STEP_PATH = "compress.variants.0.steps.0"


@pytest.mark.parametrize("variants, where, reason", [
    ([{"name": "a", "steps": [{"kind": "prune_unstructured", "sparsity": 1.0}]}],
     f"{STEP_PATH}.prune_unstructured.sparsity", "less than 1"),
    ([{"name": "a", "steps": [{"kind": "prune_unstructured", "sparsity": 1.5}]}],
     f"{STEP_PATH}.prune_unstructured.sparsity", "less than 1"),
    ([{"name": "a", "steps": [{"kind": "prune_channels", "mac_ratio": 1.0}]}],
     f"{STEP_PATH}.prune_channels.mac_ratio", "greater than 1"),
    ([{"name": "a", "steps": [{"kind": "weight_only", "bits": 16}]}],
     f"{STEP_PATH}.weight_only.bits", "1- to 8-bit weights, not 16"),
    ([{"name": "a", "steps": [{"kind": "weight_only", "bits": 0}]}],
     f"{STEP_PATH}.weight_only.bits", "1- to 8-bit weights, not 0"),
    ([{"name": "a", "steps": [{"kind": "distill_more"}]}], STEP_PATH, "'distill_more'"),
    ([{"name": "a", "steps": [{"kind": "int8_dynamic"}, {"kind": "prune_channels", "mac_ratio": 2.0}]}],
     "compress.variants.0", "must be the last"),
    ([{"name": "a", "steps": [{"kind": "finetune"}]}],
     "compress.variants.0", "finetune must follow a prune step"),
    ([{"name": "a", "steps": [{"kind": "prune_channels", "mac_ratio": 2.0}, {"kind": "finetune"},
                              {"kind": "finetune"}]}],
     "compress.variants.0", "finetune must follow a prune step"),
    ([{"name": "a", "parent": "b", "steps": [{"kind": "int8_dynamic"}]},
      {"name": "b", "steps": [{"kind": "int8_dynamic"}]}],
     "compress", "parent 'b' is not student, teacher or an earlier variant"),
    ([{"name": "a", "steps": [{"kind": "int8_dynamic"}]}, {"name": "a", "steps": [{"kind": "int8_static"}]}],
     "compress", "variant 'a' is defined twice"),
    ([{"name": "teacher", "steps": [{"kind": "int8_dynamic"}]}],
     "compress.variants.0.name", "not student, teacher"),
], ids=["sparsity-1", "sparsity-1.5", "mac-ratio-1", "bits-16", "bits-0", "unknown-kind", "quant-not-last",
        "finetune-first", "finetune-twice", "parent-later", "duplicate", "named-teacher"])
def test_bad_recipes_fail_at_config_load(variants, where, reason):
    with pytest.raises(UserError) as e:
        from_dict({"compress": {"variants": variants}})
    message = str(e.value)
    assert f"{where}:" in message and reason in message, message


def test_default_recipes_load_and_check_against_the_default_models():
    cfg = from_dict({})
    assert len(cfg.compress.variants) >= 5
    spec = {"teacher": make_spec(cfg.teacher.model, [1, 8, 8], 10),
            "student": make_spec(cfg.student.model, [1, 8, 8], 10)}
    check_recipes(cfg.compress.variants, {name: build_model(s) for name, s in spec.items()}, [1, 8, 8])


def test_check_recipes_refuses_an_unknown_layer_listing_the_known_ones():
    recipes = variant_configs({"name": "a", "steps": [{"kind": "prune_unstructured", "sparsity": 0.5,
                                                       "exclude": ["conv9"]}]})
    with pytest.raises(UserError) as e:
        check_recipes(recipes, BASES, IN_SHAPE)
    message = str(e.value)
    assert "compress.variants.a: prune_unstructured.exclude" in message and "conv9" in message
    assert "conv1, conv2, fc1, fc2" in message
    teacher = variant_configs({"name": "a", "parent": "teacher",
                               "steps": [{"kind": "prune_channels", "mac_ratio": 2.0, "exclude": ["conv1"]}]})
    with pytest.raises(UserError, match="no conv/linear layer named conv1 .*stem.0"):
        check_recipes(teacher, BASES, IN_SHAPE)  # conv1 is the student's, not the teacher's


def test_check_recipes_refuses_a_group_size_that_does_not_divide_a_linear_input():
    ok = variant_configs({"name": "a", "steps": [{"kind": "weight_only", "bits": 4, "group_size": 16}]})
    check_recipes(ok, BASES, IN_SHAPE)
    bad = variant_configs({"name": "a", "steps": [{"kind": "weight_only", "bits": 4, "group_size": 48}]})
    with pytest.raises(UserError,
                       match=r"group_size 48 does not divide the input width of fc1 \(128\), fc2 \(64\)"):
        check_recipes(bad, BASES, IN_SHAPE)


def test_check_recipes_checks_group_sizes_against_the_widths_channel_pruning_leaves():
    # fc2's input shrinks from 64 to a multiple of 4 that 16 need not divide: refused before any work,
    # in the variant itself and in a variant built on it.
    pruned = {"kind": "prune_channels", "mac_ratio": 2.0, "round_to": 4}
    w4 = {"kind": "weight_only", "bits": 4, "group_size": 16}
    same = variant_configs({"name": "slim", "steps": [pruned, w4]})
    child = variant_configs({"name": "slim", "steps": [pruned]},
                            {"name": "w4", "parent": "slim", "steps": [w4]})
    for recipes, name in ((same, "slim"), (child, "w4")):
        with pytest.raises(UserError,
                           match=f"compress.variants.{name}: weight_only: group_size 16 does not divide"):
            check_recipes(recipes, BASES, IN_SHAPE)


def test_check_recipes_refuses_a_variant_built_on_a_quantized_parent():
    for quant in ({"kind": "int8_dynamic"}, {"kind": "int8_static"},
                  {"kind": "weight_only", "group_size": 16}):
        recipes = variant_configs({"name": "q", "steps": [quant]},
                                  {"name": "child", "parent": "q",
                                   "steps": [{"kind": "prune_channels", "mac_ratio": 2.0}]})
        with pytest.raises(UserError, match="compress.variants.child: parent 'q' is quantized"):
            check_recipes(recipes, BASES, IN_SHAPE)
    fp32_parent = variant_configs({"name": "p",
                                   "steps": [{"kind": "prune_channels", "mac_ratio": 2.0, "round_to": 4}]},
                                  {"name": "child", "parent": "p", "steps": [{"kind": "int8_static"}]})
    check_recipes(fp32_parent, BASES, IN_SHAPE)


@pytest.mark.parametrize("steps, numerics", [
    ([{"kind": "prune_unstructured", "sparsity": 0.5}, {"kind": "finetune"}], None),  # computes as its parent
    ([{"kind": "int8_static"}], "int8_static"),
    ([{"kind": "prune_channels", "mac_ratio": 2.0}, {"kind": "int8_dynamic"}], "int8_dynamic"),
    ([{"kind": "weight_only", "bits": 4}], "int4_weights"),
])
def test_a_variant_names_the_arithmetic_it_computes_in(steps, numerics):
    assert VariantConfig(name="v", parent="student", steps=steps).numerics() == numerics


def test_every_step_kind_has_a_handler():
    import typing

    from distillery.compression.steps import HANDLERS
    from distillery.config.compress import Step

    kinds = {cls.model_fields["kind"].default for cls in typing.get_args(typing.get_args(Step)[0])}
    assert kinds == set(HANDLERS)
