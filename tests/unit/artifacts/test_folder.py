import ast
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from distillery import artifacts
from distillery.artifacts import save_model
from distillery.config import CNNConfig
from distillery.core.errors import UserError
from distillery.core.files import atomic_write_bytes, atomic_write_json, read_json, sha256_file, verify_sha256
from distillery.models.architectures import build_model, make_spec


@pytest.fixture
def saved(tmp_path):
    spec = make_spec(CNNConfig(width_mult=0.25), [1, 8, 8], 10)
    model = build_model(spec)
    save_model(tmp_path / "m", model, spec)
    return tmp_path / "m", model


def test_save_load_round_trip(saved):
    folder, model = saved
    loaded, arch = artifacts.load(folder)
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(loaded(x), model.eval()(x))
    assert arch["weights_sha256"] == sha256_file(folder / "model.safetensors")
    assert not loaded.training


def test_flipped_byte_is_refused(saved):
    folder, _ = saved
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"model\.safetensors: sha256 mismatch"):
        artifacts.load(folder)


def test_truncated_file_is_refused(saved):
    folder, _ = saved
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match=r"model\.safetensors: sha256 mismatch"):
        artifacts.load(folder)


def test_missing_weights_are_refused(saved):
    folder, _ = saved
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserError, match="model.safetensors: file not found"):
        artifacts.load(folder)


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["PAYLOAD_MARKER"]),))


def test_crafted_pickle_never_runs(saved, tmp_path, monkeypatch):
    """A pickle in place of the weights, even with a matching sha256, is refused unexecuted."""
    folder, _ = saved
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PAYLOAD_MARKER", str(marker))
    (folder / "model.safetensors").write_bytes(pickle.dumps(_Payload()))
    arch = read_json(folder / "arch.json")
    atomic_write_json(folder / "arch.json",
                      {**arch, "weights_sha256": sha256_file(folder / "model.safetensors")})
    with pytest.raises(UserError, match="not a readable safetensors file"):
        artifacts.load(folder)
    assert not marker.exists()


def test_weights_that_do_not_fit_the_spec(saved):
    folder, _ = saved
    arch = read_json(folder / "arch.json")
    arch["spec"]["hidden"] += 1
    atomic_write_json(folder / "arch.json", arch)
    with pytest.raises(UserError, match="weights do not fit the spec"):
        artifacts.load(folder)


def test_bad_arch_file(tmp_path):
    (tmp_path / "arch.json").write_text("{not json")
    with pytest.raises(UserError, match="arch.json: not valid JSON"):
        artifacts.load(tmp_path)
    (tmp_path / "arch.json").write_text('{"spec": {}}')
    with pytest.raises(UserError, match="not a distillery arch file"):
        artifacts.load(tmp_path)


def test_verify_sha256(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"abc")
    verify_sha256(f, sha256_file(f))
    with pytest.raises(UserError, match="sha256 mismatch"):
        verify_sha256(f, "0" * 64)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"v": object()})
    assert read_json(target) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_write_killed_midway_leaves_the_previous_file(tmp_path):
    """SIGKILL a process in the middle of an atomic write: the old file is intact."""
    target = tmp_path / "weights.bin"
    atomic_write_bytes(target, b"old contents")
    script = textwrap.dedent(f"""
        import sys, time
        from distillery.core.files import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"x" * 4096); f.flush()
                print("writing", flush=True)
                time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert target.read_bytes() == b"old contents"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "weights.bin"]
    assert all(name.startswith(".weights.bin.") and name.endswith(".tmp") for name in leftovers)


def test_product_code_never_unpickles():
    """No torch.load without weights_only=True, and no pickle (or its kin), anywhere in the
    product: read from the syntax tree, so a call split over lines or aliased is still seen."""
    unsafe_modules = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal"}
    offenders = []
    for folder in ("src", "jobs", "serve"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
                if isinstance(node, ast.Import) and \
                        {a.name.split(".")[0] for a in node.names} & unsafe_modules:
                    offenders.append(f"{where}: imports {[a.name for a in node.names]}")
                elif isinstance(node, ast.ImportFrom) and \
                        (node.module or "").split(".")[0] in unsafe_modules:
                    offenders.append(f"{where}: imports from {node.module}")
                elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                        and node.func.attr == "load" \
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                    safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant)
                               and k.value.value is True for k in node.keywords)
                    if not safe:
                        offenders.append(f"{where}: torch.load without weights_only=True")
    assert offenders == []
