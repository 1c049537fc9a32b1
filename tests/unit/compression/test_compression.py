"""Compression steps and variant storage, in this process, without Ray or training loops.

Every kind of variant is built on small seeded models, saved, reloaded (here and in a fresh
process) and must give bit-identical outputs; the files must be plain safetensors + JSON;
pruning must reach its targets; bad recipes must fail at config load or before any work.
"""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from safetensors import safe_open
from safetensors.torch import save_file

from distillery import artifacts
from distillery.artifacts import ARCH_FILE, WEIGHTS_FILE, save_model
from distillery.compression import prune
from distillery.compression.stage import check_recipes
from distillery.config import CNNConfig, ResNetConfig, from_dict
from distillery.config.compress import (
    Int8Dynamic,
    PruneChannels,
    PruneUnstructured,
    VariantConfig,
    WeightOnly,
)
from distillery.errors import UserError
from distillery.models import quantized as quantize
from distillery.models.architectures import build_model, count_macs, make_spec

IN_SHAPE = [1, 8, 8]
SPECS = {"cnn": make_spec(CNNConfig(width_mult=0.5), IN_SHAPE, 10),
         "resnet": make_spec(ResNetConfig(width=8, blocks=[1, 1]), IN_SHAPE, 10)}


def _model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(SPECS[arch]).eval()
    if arch == "resnet":  # non-trivial batch-norm statistics, so folding them is exercised
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
    return model


def _batch(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *IN_SHAPE, generator=torch.Generator().manual_seed(seed))


def _base_shapes(arch: str) -> dict:
    return prune.layer_shapes(build_model(SPECS[arch]))


def _dense(folder, model, arch):
    return model, artifacts.save_dense(folder, model, SPECS[arch], _base_shapes(arch))


def _unstructured(folder, arch):
    model = prune.prune_unstructured(_model(arch), PruneUnstructured(sparsity=0.7))
    return _dense(folder, model, arch)


def _channels(arch):
    return prune.prune_channels(_model(arch), PruneChannels(mac_ratio=1.5, round_to=4), IN_SHAPE).eval()


def _torchao(folder, arch, step):
    model = quantize.apply_torchao(copy.deepcopy(_model(arch)), step)
    return model, artifacts.save_torchao(folder, model, SPECS[arch], _base_shapes(arch), step)


def _static(folder, fp32, arch):
    prepared = quantize.prepare(copy.deepcopy(fp32), IN_SHAPE)
    quantize.calibrate(prepared, _batch(64, seed=2))
    converted = quantize.convert(copy.deepcopy(prepared))
    return converted, artifacts.save_pt2e(folder, fp32, prepared, SPECS[arch], _base_shapes(arch), qat=False)


def _qat(folder, arch):
    """As compress._qat does: train the fake-quantized graph (a few SGD steps in train mode,
    which also update the fake-quantizers' ranges), copy its float weights back into the plain
    model, save both."""
    fp32 = _model(arch)
    prepared = quantize.prepare(copy.deepcopy(fp32), IN_SHAPE, qat=True)
    prepared.train()
    opt = torch.optim.SGD(prepared.parameters(), lr=0.1)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(prepared(_batch(32, seed=3)), torch.arange(32) % 10)
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = prepared.state_dict()
    fp32.load_state_dict({k: trained[k] for k in fp32.state_dict()})
    converted = quantize.convert(copy.deepcopy(prepared))
    return converted, artifacts.save_pt2e(folder, fp32, prepared, SPECS[arch], _base_shapes(arch), qat=True)


BUILDERS = {
    "unstructured": lambda f, a: _unstructured(f, a),
    "channels": lambda f, a: _dense(f, _channels(a), a),
    "int8_dynamic": lambda f, a: _torchao(f, a, Int8Dynamic()),
    "weight_only4": lambda f, a: _torchao(f, a, WeightOnly(bits=4, group_size=16)),
    "weight_only2": lambda f, a: _torchao(f, a, WeightOnly(bits=2, group_size=16)),
    "int8_static": lambda f, a: _static(f, _model(a), a),
    "channels_int8_static": lambda f, a: _static(f, _channels(a), a),
}


KINDS = [(kind, arch) for kind in BUILDERS for arch in SPECS] + [("qat", "cnn")]


FORMATS = {"unstructured": "dense", "channels": "dense", "int8_dynamic": "torchao", "weight_only4": "torchao",
           "weight_only2": "torchao", "int8_static": "pt2e", "channels_int8_static": "pt2e", "qat": "pt2e"}


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """{(kind, arch): folder} with every variant saved, and expected.safetensors holding each
    model's outputs on `_batch()` before saving, keyed `kind/arch`."""
    root = tmp_path_factory.mktemp("variants")
    folders, expected = {}, {}
    x = _batch()
    for kind, arch in KINDS:
        folder = root / f"{kind}-{arch}"
        model, files = (_qat(folder, arch) if kind == "qat" else BUILDERS[kind](folder, arch))
        assert [p.name for p in files] == [WEIGHTS_FILE, ARCH_FILE]
        with torch.no_grad():
            expected[f"{kind}/{arch}"] = model(x).contiguous()
        folders[(kind, arch)] = folder
    save_file(expected, str(root / "expected.safetensors"))
    return root, folders, expected


@pytest.mark.parametrize("kind, arch", KINDS, ids=[f"{k}-{a}" for k, a in KINDS])
def test_variant_round_trip_is_exact(variants, kind, arch):
    _, folders, expected = variants
    model, arch_json = artifacts.load(folders[(kind, arch)])
    assert arch_json["format"] == FORMATS[kind]
    with torch.no_grad():
        out = model(_batch())
    assert out.shape == (16, 10)
    assert torch.equal(out, expected[f"{kind}/{arch}"])
    if kind not in ("unstructured", "channels"):  # quantized: not merely the float model again
        with torch.no_grad():
            assert not torch.allclose(out, _model(arch)(_batch()), atol=1e-5, rtol=0)
    if kind == "unstructured":
        assert arch_json["sparse"], "a 70%-sparse model was not stored as mask + values"
    if kind.startswith("channels"):
        assert arch_json["layers"], "the resized layers were not recorded"
    if FORMATS[kind] == "pt2e":
        assert arch_json["quant"]["int8_weights"], "no weight stored as int8"
        assert arch_json["quant"]["qat"] == (kind == "qat")


def test_reload_in_a_fresh_process_is_exact(variants):
    root, folders, expected = variants
    cases = {f"{kind}/{arch}": str(folder) for (kind, arch), folder in folders.items()}
    script = (
        "import json, sys, torch\n"
        "from safetensors.torch import load_file\n"
        "from distillery import artifacts\n"
        "cases, expected = json.loads(sys.argv[1]), load_file(sys.argv[2])\n"
        "x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))\n"
        "bad = []\n"
        "for key, folder in cases.items():\n"
        "    model, _ = artifacts.load(folder)\n"
        "    with torch.no_grad():\n"
        "        if not torch.equal(model(x), expected[key]): bad.append(key)\n"
        "print('MISMATCH', bad)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", script, json.dumps(cases), str(root / "expected.safetensors")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "MISMATCH []" in out.stdout, out.stdout
    assert {FORMATS[key.split("/")[0]] for key in cases} == {"dense", "torchao", "pt2e"}


def _safetensors_layout_ok(data: bytes) -> bool:
    """An 8-byte little-endian header length, a JSON header, then exactly the tensor bytes it
    lists: nothing else (no pickle) fits in the file. (The first byte alone says little: a
    header of 0x380 bytes starts the file with b"\\x80\\x03", like a protocol-3 pickle.)"""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return header and len(data) == 8 + n + max(ends, default=0)


@pytest.mark.parametrize("kind, arch", KINDS, ids=[f"{k}-{a}" for k, a in KINDS])
def test_variant_files_are_safetensors_and_json_only(variants, kind, arch):
    folder = variants[1][(kind, arch)]
    assert sorted(p.name for p in folder.iterdir()) == [ARCH_FILE, WEIGHTS_FILE]
    arch_bytes, weights = (folder / ARCH_FILE).read_bytes(), (folder / WEIGHTS_FILE).read_bytes()
    assert arch_bytes.startswith(b"{") and not weights.startswith(b"PK\x03\x04")  # JSON; not a torch.save zip
    arch = json.loads(arch_bytes)
    assert arch["weights"] == WEIGHTS_FILE and len(arch["weights_sha256"]) == 64
    assert _safetensors_layout_ok(weights)
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
        keys = list(f.keys())
        assert keys and all(isinstance(f.get_tensor(k), torch.Tensor) for k in keys)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
@pytest.mark.parametrize("kind", ["unstructured", "int8_dynamic", "int8_static"])
def test_damaged_weights_are_refused_naming_the_file(tmp_path, damage, kind):
    folder = tmp_path / kind
    BUILDERS[kind](folder, "cnn")
    weights = folder / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[:-7]
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256 mismatch") as e:
        artifacts.load(folder)
    assert str(weights) in str(e.value)


def _zeros(layers: dict) -> tuple[int, int]:
    return (sum(int((m.weight == 0).sum()) for m in layers.values()),
            sum(m.weight.numel() for m in layers.values()))


@pytest.mark.parametrize("arch, exclude", [("cnn", []), ("cnn", ["conv1", "fc2"]), ("resnet", ["stem.0"])])
def test_unstructured_reaches_global_sparsity_and_spares_excluded_layers(arch, exclude):
    model = _model(arch)
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
        model = prune.prune_unstructured(_model("cnn"), PruneUnstructured(sparsity=sparsity))
        files = artifacts.save_dense(tmp_path / f"sparse-{sparsity}", model, SPECS["cnn"], _base_shapes("cnn"))
        dense = save_model(tmp_path / f"dense-{sparsity}", model, SPECS["cnn"])
        arch = json.loads(files[1].read_text())
        sizes[sparsity] = (files[0].stat().st_size, dense[0].stat().st_size, arch["sparse"])
        reloaded, _ = artifacts.load(files[0].parent)
        for k, v in model.state_dict().items():
            assert torch.equal(reloaded.state_dict()[k], v), k
    packed, dense, sparse = sizes[0.7]
    assert sparse and set(sparse) <= {f"{n}.weight" for n in prune.prunable(_model("cnn"))}
    assert packed < 0.5 * dense  # 30% of the values plus a 1-bit mask: well under half
    packed, dense, sparse = sizes[0.01]
    assert sparse == {}
    assert abs(packed - dense) <= 64  # the same tensors; only the JSON header may differ


def test_gradual_sparsity_follows_the_cubic_schedule():
    step, epochs = PruneUnstructured(sparsity=0.8, exclude=["conv1"]), 5
    model = _model("cnn")
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
        model = _model("cnn").train()
        gradual = prune.GradualSparsity(model, PruneUnstructured(sparsity=0.5), 2)
        gradual.start_epoch(2)
        was_zero = {name: m.weight.detach() == 0 for name, m in prune.prunable(model).items()}
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        if hook:
            opt.register_step_post_hook(gradual.after_step)
        loss = torch.nn.functional.cross_entropy(model(_batch(32)), torch.arange(32) % 10)
        loss.backward()
        opt.step()
        return model, was_zero

    model, was_zero = one_step(hook=False)  # the control: a plain step does regrow pruned weights
    assert any(bool((m.weight[was_zero[n]] != 0).any()) for n, m in prune.prunable(model).items())
    model, was_zero = one_step(hook=True)
    for name, m in prune.prunable(model).items():
        assert int((m.weight[was_zero[name]] != 0).sum()) == 0, name
        assert bool((m.weight[~was_zero[name]] != 0).all()), name


def _recipes(*variants: dict) -> list[VariantConfig]:
    return list(from_dict({"compress": {"variants": list(variants)}}).compress.variants)


BASES = {"student": build_model(SPECS["cnn"]), "teacher": build_model(SPECS["resnet"])}


@pytest.mark.parametrize("arch, exclude, ratio, round_to", [
    ("cnn", ["conv1"], 2.0, 1), ("cnn", [], 3.0, 8), ("cnn", ["conv1"], 1.5, 16), ("resnet", ["stem.0"], 1.5, 4),
    ("resnet", [], 2.0, 1)])
def test_channel_pruning_reaches_the_mac_ratio(arch, exclude, ratio, round_to):
    model = _model(arch)
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
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in _model(arch).parameters())
    with torch.no_grad():
        assert model.eval()(_batch()).shape == (16, 10)


@pytest.mark.parametrize("step", [PruneChannels(mac_ratio=100.0, exclude=["conv1", "conv2", "fc1"], round_to=1),
                                  PruneChannels(mac_ratio=1.5, round_to=32)], ids=["excluded", "round_to"])
def test_unreachable_mac_ratio_is_a_user_error(step):
    model = _model("cnn")
    with pytest.raises(UserError, match=f"mac_ratio {step.mac_ratio} not reachable") as e:
        prune.prune_channels(model, step, IN_SHAPE)
    assert ", ".join(step.exclude) in str(e.value)
    recipes = _recipes({"name": "slim", "steps": [step.model_dump()]})
    with pytest.raises(UserError, match=f"mac_ratio {step.mac_ratio} not reachable"):
        check_recipes(recipes, BASES, IN_SHAPE)  # found before any work, on a copy
    assert prune.layer_shapes(BASES["student"]) == prune.layer_shapes(build_model(SPECS["cnn"]))


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
    ([{"name": "a", "steps": [{"kind": "finetune"}]}], "compress.variants.0", "finetune must follow a prune step"),
    ([{"name": "a", "steps": [{"kind": "prune_channels", "mac_ratio": 2.0}, {"kind": "finetune"}, {"kind": "finetune"}]}],
     "compress.variants.0", "finetune must follow a prune step"),
    ([{"name": "a", "parent": "b", "steps": [{"kind": "int8_dynamic"}]}, {"name": "b", "steps": [{"kind": "int8_dynamic"}]}],
     "compress", "parent 'b' is not student, teacher or an earlier variant"),
    ([{"name": "a", "steps": [{"kind": "int8_dynamic"}]}, {"name": "a", "steps": [{"kind": "int8_static"}]}],
     "compress", "variant 'a' is defined twice"),
    ([{"name": "teacher", "steps": [{"kind": "int8_dynamic"}]}], "compress.variants.0.name", "not student, teacher"),
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
    spec = {"teacher": make_spec(cfg.teacher.model, [1, 8, 8], 10), "student": make_spec(cfg.student.model, [1, 8, 8], 10)}
    check_recipes(cfg.compress.variants, {name: build_model(s) for name, s in spec.items()}, [1, 8, 8])


def test_check_recipes_refuses_an_unknown_layer_listing_the_known_ones():
    recipes = _recipes({"name": "a", "steps": [{"kind": "prune_unstructured", "sparsity": 0.5, "exclude": ["conv9"]}]})
    with pytest.raises(UserError) as e:
        check_recipes(recipes, BASES, IN_SHAPE)
    message = str(e.value)
    assert "compress.variants.a: prune_unstructured.exclude" in message and "conv9" in message
    assert "conv1, conv2, fc1, fc2" in message
    teacher = _recipes({"name": "a", "parent": "teacher",
                        "steps": [{"kind": "prune_channels", "mac_ratio": 2.0, "exclude": ["conv1"]}]})
    with pytest.raises(UserError, match="no conv/linear layer named conv1 .*stem.0"):
        check_recipes(teacher, BASES, IN_SHAPE)  # conv1 is the student's, not the teacher's


def test_check_recipes_refuses_a_group_size_that_does_not_divide_a_linear_input():
    ok = _recipes({"name": "a", "steps": [{"kind": "weight_only", "bits": 4, "group_size": 16}]})
    check_recipes(ok, BASES, IN_SHAPE)
    bad = _recipes({"name": "a", "steps": [{"kind": "weight_only", "bits": 4, "group_size": 48}]})
    with pytest.raises(UserError, match=r"group_size 48 does not divide the input width of fc1 \(128\), fc2 \(64\)"):
        check_recipes(bad, BASES, IN_SHAPE)


def test_check_recipes_checks_group_sizes_against_the_widths_channel_pruning_leaves():
    # fc2's input shrinks from 64 to a multiple of 4 that 16 need not divide: refused before any work,
    # in the variant itself and in a variant built on it.
    pruned = {"kind": "prune_channels", "mac_ratio": 2.0, "round_to": 4}
    w4 = {"kind": "weight_only", "bits": 4, "group_size": 16}
    same = _recipes({"name": "slim", "steps": [pruned, w4]})
    child = _recipes({"name": "slim", "steps": [pruned]}, {"name": "w4", "parent": "slim", "steps": [w4]})
    for recipes, name in ((same, "slim"), (child, "w4")):
        with pytest.raises(UserError, match=f"compress.variants.{name}: weight_only: group_size 16 does not divide"):
            check_recipes(recipes, BASES, IN_SHAPE)


def test_check_recipes_refuses_a_variant_built_on_a_quantized_parent():
    for quant in ({"kind": "int8_dynamic"}, {"kind": "int8_static"}, {"kind": "weight_only", "group_size": 16}):
        recipes = _recipes({"name": "q", "steps": [quant]},
                           {"name": "child", "parent": "q", "steps": [{"kind": "prune_channels", "mac_ratio": 2.0}]})
        with pytest.raises(UserError, match="compress.variants.child: parent 'q' is quantized"):
            check_recipes(recipes, BASES, IN_SHAPE)
    fp32_parent = _recipes({"name": "p", "steps": [{"kind": "prune_channels", "mac_ratio": 2.0, "round_to": 4}]},
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
