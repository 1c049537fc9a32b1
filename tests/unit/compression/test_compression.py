"""Variant storage, in this process, without Ray or training loops.

Every kind of variant is built on small seeded models, saved, reloaded (here and in a fresh
process) and must give bit-identical outputs; the files must be plain safetensors + JSON.
Pruning's targets are test_pruning.py's, the recipe checks test_recipes.py's.
"""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from compression_models import IN_SHAPE, SPECS, base_shapes, inputs, seeded_model
from conftest import ROOT
from safetensors import safe_open
from safetensors.torch import save_file

from distillery import artifacts
from distillery.artifacts import ARCH_FILE, WEIGHTS_FILE
from distillery.compression import prune
from distillery.config.compress import Int8Dynamic, PruneChannels, PruneUnstructured, WeightOnly
from distillery.core.errors import UserError
from distillery.models import quantized as quantize


def _dense(folder, model, arch):
    return model, artifacts.save_dense(folder, model, SPECS[arch], base_shapes(arch))


def _unstructured(folder, arch):
    model = prune.prune_unstructured(seeded_model(arch), PruneUnstructured(sparsity=0.7))
    return _dense(folder, model, arch)


def _channels(arch):
    return prune.prune_channels(seeded_model(arch), PruneChannels(mac_ratio=1.5, round_to=4), IN_SHAPE).eval()


def _torchao(folder, arch, step):
    model = quantize.apply_torchao(copy.deepcopy(seeded_model(arch)), step)
    return model, artifacts.save_torchao(folder, model, SPECS[arch], base_shapes(arch), step)


def _static(folder, fp32, arch):
    prepared = quantize.prepare(copy.deepcopy(fp32), IN_SHAPE)
    quantize.calibrate(prepared, inputs(64, seed=2))
    converted = quantize.convert(copy.deepcopy(prepared))
    return converted, artifacts.save_pt2e(folder, fp32, prepared, SPECS[arch], base_shapes(arch), qat=False)


def _qat(folder, arch):
    """As compress._qat does: train the fake-quantized graph (a few SGD steps in train mode,
    which also update the fake-quantizers' ranges), copy its float weights back into the plain
    model, save both."""
    fp32 = seeded_model(arch)
    prepared = quantize.prepare(copy.deepcopy(fp32), IN_SHAPE, qat=True)
    prepared.train()
    opt = torch.optim.SGD(prepared.parameters(), lr=0.1)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(prepared(inputs(32, seed=3)), torch.arange(32) % 10)
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = prepared.state_dict()
    fp32.load_state_dict({k: trained[k] for k in fp32.state_dict()})
    converted = quantize.convert(copy.deepcopy(prepared))
    return converted, artifacts.save_pt2e(folder, fp32, prepared, SPECS[arch], base_shapes(arch), qat=True)


BUILDERS = {
    "unstructured": lambda f, a: _unstructured(f, a),
    "channels": lambda f, a: _dense(f, _channels(a), a),
    "int8_dynamic": lambda f, a: _torchao(f, a, Int8Dynamic()),
    "weight_only4": lambda f, a: _torchao(f, a, WeightOnly(bits=4, group_size=16)),
    "weight_only2": lambda f, a: _torchao(f, a, WeightOnly(bits=2, group_size=16)),
    "int8_static": lambda f, a: _static(f, seeded_model(a), a),
    "channels_int8_static": lambda f, a: _static(f, _channels(a), a),
}


KINDS = [(kind, arch) for kind in BUILDERS for arch in SPECS] + [("qat", "cnn")]


FORMATS = {"unstructured": "dense", "channels": "dense", "int8_dynamic": "torchao", "weight_only4": "torchao",
           "weight_only2": "torchao", "int8_static": "pt2e", "channels_int8_static": "pt2e", "qat": "pt2e"}


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """{(kind, arch): folder} with every variant saved, and expected.safetensors holding each
    model's outputs on `inputs()` before saving, keyed `kind/arch`."""
    root = tmp_path_factory.mktemp("variants")
    folders, expected = {}, {}
    x = inputs()
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
        out = model(inputs())
    assert out.shape == (16, 10)
    assert torch.equal(out, expected[f"{kind}/{arch}"])
    if kind not in ("unstructured", "channels"):  # quantized: not merely the float model again
        with torch.no_grad():
            assert not torch.allclose(out, seeded_model(arch)(inputs()), atol=1e-5, rtol=0)
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
    out = subprocess.run([sys.executable, "-c", script, json.dumps(cases),
                          str(root / "expected.safetensors")],
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

