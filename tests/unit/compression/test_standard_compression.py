"""Compression on standard (torchvision) architectures and imported programs: what applies is
built and reloads exactly; what cannot apply refuses its variant with the reason, and the
other variants go on. (int8 on a pruned mobilenet, served: tests/integration/test_bring_your_own.py.)"""

import pytest
import torch

from distillery import artifacts
from distillery.compression import prune
from distillery.compression.stage import check_recipes
from distillery.config import CNNConfig, TorchvisionConfig, from_dict
from distillery.config.compress import PruneChannels
from distillery.core.errors import UserError
from distillery.models.architectures import build_model, make_spec
from distillery.models.exported import ExportedModel

SHAPE = [1, 8, 8]
SPECS = {name: make_spec(TorchvisionConfig(name=name), SHAPE, 10)
         for name in ("mobilenet_v3_small", "resnet18")}


def _recipes(*variants: dict):
    return list(from_dict({"compress": {"variants": list(variants)}}).compress.variants)


def _model(name):
    torch.manual_seed(0)
    return build_model(SPECS[name]).eval()


@pytest.fixture(scope="module")
def pruned():
    """mobilenet_v3_small with 1.2x fewer MACs (Torch-Pruning): pruning it is the slow part."""
    return prune.prune_channels(_model("mobilenet_v3_small"), PruneChannels(mac_ratio=1.2, round_to=8),
                                SHAPE).eval()


def test_a_channel_pruned_mobilenet_reloads_exactly_depthwise_groups_included(tmp_path, pruned):
    """Pruning a depthwise conv changes its groups; the saved layer sizes record them."""
    model = pruned
    grouped = {n: s for n, s in prune.layer_shapes(model).items() if len(s) == 3}
    assert grouped and all(s[2] == s[0] == s[1] for s in grouped.values())  # depthwise: groups = channels
    spec = SPECS["mobilenet_v3_small"]
    artifacts.save_dense(tmp_path, model, spec, prune.layer_shapes(build_model(spec)))
    reloaded, _ = artifacts.load(tmp_path)
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model.eval()(x))


def test_a_step_that_cannot_apply_refuses_its_variant_and_those_built_on_it():
    """torchvision's resnet18 reuses one ReLU module twice per block, which the x86 PT2E
    quantizer cannot annotate: int8_static is refused there, with torch's reason; the other
    variants go on."""
    recipes = _recipes(
        {"name": "teacher-int8", "parent": "teacher", "steps": [{"kind": "int8_static"}]},
        {"name": "on-int8", "parent": "teacher-int8", "steps": [{"kind": "cascade", "to": "student"}]},
        {"name": "teacher-w8", "parent": "teacher", "steps": [{"kind": "int8_dynamic"}]},
        {"name": "int8", "steps": [{"kind": "int8_dynamic"}]})
    refused = check_recipes(recipes, {"teacher": _model("resnet18"), "student": _model("mobilenet_v3_small")},
                            SHAPE)
    assert refused == {
        "teacher-int8": "PT2E int8 (x86 quantizer) does not apply to this ResNet: ValueError: Input "
                        "partition has more than one output node",
        "on-int8": "built on teacher-int8, which was refused"}


def test_nothing_is_built_on_an_imported_program_but_it_can_be_a_cascade_s_larger_model():
    small = build_model(make_spec(CNNConfig(width_mult=0.25), SHAPE, 10)).eval()
    teacher = ExportedModel(torch.export.export(small, (torch.zeros(1, *SHAPE),)).module(), 1, SHAPE)
    recipes = _recipes({"name": "t8", "parent": "teacher", "steps": [{"kind": "int8_dynamic"}]},
                       {"name": "cascade", "steps": [{"kind": "cascade", "to": "teacher"}]})
    refused = check_recipes(recipes, {"teacher": teacher, "student": small}, SHAPE)
    assert list(refused) == ["t8"] and "imported torch.export program, a fixed graph" in refused["t8"]


def test_a_mistake_in_a_recipe_still_fails_the_whole_check():
    recipes = _recipes({"name": "a", "steps": [{"kind": "prune_unstructured", "sparsity": 0.5,
                                                 "exclude": ["nope"]}]})
    with pytest.raises(UserError, match="compress.variants.a: prune_unstructured.exclude: "
                                        "no conv/linear layer named nope"):
        check_recipes(recipes, {"teacher": _model("resnet18"), "student": _model("mobilenet_v3_small")},
                      SHAPE)
