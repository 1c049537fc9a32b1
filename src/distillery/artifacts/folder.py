"""A model on disk: `model.safetensors` plus `arch.json` (the JSON spec, the storage format
and the weights' sha256), so a model folder verifies on its own and loads without unpickling.

Every model folder has this shape. Trained models are `format: dense` and load here, as do
imported `torch.export` programs (`format: exported`, `program.pt2` in place of the weights);
compressed variants add their format's fields (pruned layer sizes, sparse encoding, the
quantization to re-apply) and a `recipe.json`. Every format loads through `artifacts.load`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from distillery.core.errors import UserError
from distillery.core.files import atomic_path, atomic_write_json, read_json, sha256_file, verify_sha256

WEIGHTS_FILE = "model.safetensors"
PROGRAM_FILE = "program.pt2"
ARCH_FILE = "arch.json"


def save_model(folder: str | Path, model: torch.nn.Module, spec: dict, **extra: Any) -> list[Path]:
    """Write `model.safetensors` and `arch.json` (spec + weights sha256); return both paths."""
    folder = Path(folder)
    weights = folder / WEIGHTS_FILE
    # clone(): safetensors refuses tensors that share storage (e.g. views from pruning).
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp))
    arch = {"format": "dense", "spec": spec, "weights": WEIGHTS_FILE, "weights_sha256": sha256_file(weights),
            **extra}
    atomic_write_json(folder / ARCH_FILE, arch)
    return [weights, folder / ARCH_FILE]


def save_program(folder: str | Path, source: Path, spec: dict, **extra: Any) -> list[Path]:
    """An imported torch.export program (`models.exported`), copied byte for byte: `format:
    exported`, the program file in place of the weights."""
    program = Path(folder) / PROGRAM_FILE
    with atomic_path(program) as tmp:
        shutil.copyfile(source, tmp)
    arch = {"format": "exported", "spec": spec, "weights": PROGRAM_FILE,
            "weights_sha256": sha256_file(program), **extra}
    atomic_write_json(Path(folder) / ARCH_FILE, arch)
    return [program, Path(folder) / ARCH_FILE]


def read_arch(folder: str | Path) -> tuple[dict, Path]:
    """A model folder's `arch.json` and its weights file, verified against the recorded sha256."""
    folder = Path(folder)
    arch = read_json(folder / ARCH_FILE)
    if not isinstance(arch, dict) or not {"spec", "weights", "weights_sha256"} <= arch.keys():
        raise UserError(f"{folder / ARCH_FILE}: not a distillery arch file (needs spec, "
                        "weights, weights_sha256)")
    weights = folder / arch["weights"]
    verify_sha256(weights, arch["weights_sha256"])
    return arch, weights
