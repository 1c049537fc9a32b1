"""Pruning, in this process, without Ray or training loops: unstructured pruning reaches its
global sparsity (at once or on the cubic schedule) and spares excluded layers; channel pruning
reaches its MAC ratio, or fails as a user error before any work.
"""

import json

import pytest
import torch
from compression_models import BASES, IN_SHAPE, SPECS, base_shapes, inputs, seeded_model, variant_configs

from distillery import artifacts
from distillery.artifacts import save_model
from distillery.compression import prune
from distillery.compression.stage import check_recipes
from distillery.config.compress import PruneChannels, PruneUnstructured
from distillery.core.errors import UserError
from distillery.models.architectures import build_model, count_macs


def _zeros(layers: dict) -> tuple[int, int]:
    return (sum(int((m.weight == 0).sum()) for m in layers.values()),
            sum(m.weight.numel() for m in layers.values()))


@pytest.mark.parametrize("arch, exclude", [("cnn", []), ("cnn", ["conv1", "fc2"]), ("resnet", ["stem.0"])])
def test_unstructured_reaches_global_sparsity_and_spares_excluded_layers(arch, exclude):
    model = seeded_model(arch)
    assert _zeros(prune.prunable(model))[0] == 0
    prune.prune_unstructured(model, PruneUnstructured(sparsity=0.6, exclude=exclude))
    zeros, total = _zeros(prune.prunable(model, exclude))
    assert abs(zeros - 0.6 * total) <= 1
    for name in exclude:
        w = model.get_submodule(name).weight
        assert int((w == 0).sum()) == 0, f"{name} was excluded but pruned"
    assert not [k for k in model.state_dict() if k.endswith(("_orig", "_mask"))]
    report = prune.sparsity_report(model)
    assert set(report) == set(prune.prunable(model))
    assert all(report[name]["sparsity"] == 0.0 for name in exclude)


def test_sparse_encoding_is_smaller_only_when_it_pays(tmp_path):
    sizes = {}
    for sparsity in (0.7, 0.01):
        model = prune.prune_unstructured(seeded_model("cnn"), PruneUnstructured(sparsity=sparsity))
        files = artifacts.save_dense(tmp_path / f"sparse-{sparsity}", model, SPECS["cnn"], base_shapes("cnn"))
        dense = save_model(tmp_path / f"dense-{sparsity}", model, SPECS["cnn"])
        arch = json.loads(files[1].read_text())
        sizes[sparsity] = (files[0].stat().st_size, dense[0].stat().st_size, arch["sparse"])
        reloaded, _ = artifacts.load(files[0].parent)
        for k, v in model.state_dict().items():
            assert torch.equal(reloaded.state_dict()[k], v), k
    packed, dense, sparse = sizes[0.7]
    assert sparse and set(sparse) <= {f"{n}.weight" for n in prune.prunable(seeded_model("cnn"))}
    assert packed < 0.5 * dense  # 30% of the values plus a 1-bit mask: well under half
    packed, dense, sparse = sizes[0.01]
    assert sparse == {}
    assert abs(packed - dense) <= 64  # the same tensors; only the JSON header may differ


def test_gradual_sparsity_follows_the_cubic_schedule():
    step, epochs = PruneUnstructured(sparsity=0.8, exclude=["conv1"]), 5
    model = seeded_model("cnn")
    gradual = prune.GradualSparsity(model, step, epochs)
    reached = []
    for epoch in range(1, epochs + 1):
        gradual.start_epoch(epoch)
        zeros, total = _zeros(prune.prunable(model, step.exclude))
        target = 0.8 * (1 - (1 - epoch / epochs) ** 3)
        assert abs(zeros - target * total) <= 1, (epoch, zeros / total, target)
        reached.append(zeros)
    assert reached == sorted(reached) and reached[0] < reached[-1]
    assert abs(reached[-1] - round(0.8 * total)) <= 1
    assert int((model.conv1.weight == 0).sum()) == 0


def test_gradual_sparsity_re_zeroes_weights_after_an_optimizer_step():
    def one_step(hook: bool) -> tuple[torch.nn.Module, dict]:
        model = seeded_model("cnn").train()
        gradual = prune.GradualSparsity(model, PruneUnstructured(sparsity=0.5), 2)
        gradual.start_epoch(2)
        was_zero = {name: m.weight.detach() == 0 for name, m in prune.prunable(model).items()}
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        if hook:
            opt.register_step_post_hook(gradual.after_step)
        loss = torch.nn.functional.cross_entropy(model(inputs(32)), torch.arange(32) % 10)
        loss.backward()
        opt.step()
        return model, was_zero

    model, was_zero = one_step(hook=False)  # the control: a plain step does regrow pruned weights
    assert any(bool((m.weight[was_zero[n]] != 0).any()) for n, m in prune.prunable(model).items())
    model, was_zero = one_step(hook=True)
    for name, m in prune.prunable(model).items():
        assert int((m.weight[was_zero[name]] != 0).sum()) == 0, name
        assert bool((m.weight[~was_zero[name]] != 0).all()), name


@pytest.mark.parametrize("arch, exclude, ratio, round_to", [
    ("cnn", ["conv1"], 2.0, 1), ("cnn", [], 3.0, 8), ("cnn", ["conv1"], 1.5, 16),
    ("resnet", ["stem.0"], 1.5, 4), ("resnet", [], 2.0, 1)])
def test_channel_pruning_reaches_the_mac_ratio(arch, exclude, ratio, round_to):
    model = seeded_model(arch)
    before = count_macs(model, IN_SHAPE)
    kept = {name: model.get_submodule(name).out_channels for name in exclude}
    classifier = prune.classifier(model)
    original = prune.layer_shapes(model)
    prune.prune_channels(model, PruneChannels(mac_ratio=ratio, exclude=exclude, round_to=round_to), IN_SHAPE)
    assert before / count_macs(model, IN_SHAPE) >= ratio
    assert prune.classifier(model).out_features == classifier.out_features == 10
    for name, out in kept.items():
        assert model.get_submodule(name).out_channels == out
    shapes = prune.layer_shapes(model)
    changed = {name: shape for name, shape in shapes.items() if shape != original[name]}
    assert changed  # some layer really lost channels
    for name, m in model.named_modules():  # pruned conv outputs stay multiples of round_to
        if isinstance(m, torch.nn.Conv2d) and m.out_channels != original[name][1]:
            assert m.out_channels % round_to == 0, (name, m.out_channels, round_to)
    assert sum(p.numel() for p in model.parameters()) < \
        sum(p.numel() for p in seeded_model(arch).parameters())
    with torch.no_grad():
        assert model.eval()(inputs()).shape == (16, 10)


@pytest.mark.parametrize("step", [
    PruneChannels(mac_ratio=100.0, exclude=["conv1", "conv2", "fc1"], round_to=1),
    PruneChannels(mac_ratio=1.5, round_to=32)], ids=["excluded", "round_to"])
def test_unreachable_mac_ratio_is_a_user_error(step):
    model = seeded_model("cnn")
    with pytest.raises(UserError, match=f"mac_ratio {step.mac_ratio} not reachable") as e:
        prune.prune_channels(model, step, IN_SHAPE)
    assert ", ".join(step.exclude) in str(e.value)
    recipes = variant_configs({"name": "slim", "steps": [step.model_dump()]})
    with pytest.raises(UserError, match=f"mac_ratio {step.mac_ratio} not reachable"):
        check_recipes(recipes, BASES, IN_SHAPE)  # found before any work, on a copy
    assert prune.layer_shapes(BASES["student"]) == prune.layer_shapes(build_model(SPECS["cnn"]))

