"""Pickle-free, atomic, verified artifacts.

Every file is written to a temp file in the same folder, fsync'd, then `os.replace`d over
the final name, so a crash mid-write leaves either the old file or the new one, never a
partial file under the final name. Weights are safetensors; `arch.json` beside them holds
the JSON model spec and the weights' sha256, so a model folder verifies on its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from distillery.errors import UserError

WEIGHTS_FILE = "model.safetensors"
ARCH_FILE = "arch.json"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:  # libraries that wrote by name did not fsync
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    # The rename itself is durable only once the directory entry is flushed.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def verify_sha256(path: str | Path, expected: str) -> None:
    """Refuse a missing, truncated or altered file, naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    actual = sha256_file(path)
    if actual != expected:
        raise UserError(
            f"{path}: sha256 mismatch (expected {expected[:12]}…, got {actual[:12]}…); "
            "the file is corrupt, truncated or was changed after it was written"
        )


def save_model(folder: str | Path, model: torch.nn.Module, spec: dict, **extra: Any) -> list[Path]:
    """Write `model.safetensors` and `arch.json` (spec + weights sha256); return both paths."""
    folder = Path(folder)
    weights = folder / WEIGHTS_FILE
    # clone(): safetensors refuses tensors that share storage (e.g. views from pruning).
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp))
    arch = {"spec": spec, "weights": WEIGHTS_FILE, "weights_sha256": sha256_file(weights), **extra}
    atomic_write_json(folder / ARCH_FILE, arch)
    return [weights, folder / ARCH_FILE]


def read_arch(folder: str | Path) -> tuple[dict, Path]:
    """A model folder's `arch.json` and its weights file, verified against the recorded sha256."""
    folder = Path(folder)
    arch = read_json(folder / ARCH_FILE)
    if not isinstance(arch, dict) or not {"spec", "weights", "weights_sha256"} <= arch.keys():
        raise UserError(f"{folder / ARCH_FILE}: not a distillery arch file (needs spec, weights, weights_sha256)")
    weights = folder / arch["weights"]
    verify_sha256(weights, arch["weights_sha256"])
    return arch, weights


def load_model(folder: str | Path, build: Callable[[dict], torch.nn.Module] | None = None) -> tuple[torch.nn.Module, dict]:
    """Build the model from `arch.json`, verify and load its weights; return (model, arch)."""
    if build is None:
        from distillery.models.architectures import build_model as build
    arch, weights = read_arch(folder)
    try:
        state = load_file(str(weights))
    except SafetensorError as e:
        raise UserError(f"{weights}: not a readable safetensors file ({e})") from None
    model = build(arch["spec"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"{weights}: weights do not fit the spec in {ARCH_FILE}: {e}") from None
    return model.eval(), arch
