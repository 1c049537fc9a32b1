"""The storage formats of a model folder, one registry entry each: how it is saved, how it is
read back. `arch.json` + `model.safetensors`, no pickle:

    dense     float weights; a weight with enough zeros is stored as a bit mask plus its
              non-zero values (only where that is smaller than dense); channel-pruned layer
              sizes in `layers`
    exported  an imported torch.export program (`program.pt2`, checked before it loads)
    torchao   torchao's own flattened quantized tensors (int8 data + scales) and a JSON
              header that names their classes from torchao's allow-list
    pt2e      the fp32 model with int8 weights where an observer reads them directly, plus
              every observer's recorded scale and zero point (see `models.quantized`)
    cascade   no weights of its own: its two members as model folders of their own (`small/`,
              `large/`, any format), their arch.json sha256s, the threshold (`models.cascade`)

A reload builds the spec, resizes the pruned layers, re-applies the quantization and loads
the tensors: the same outputs as before saving on the same machine and kernels. A new format
is one `Format` in `FORMATS`.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata as package_metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from distillery.artifacts.folder import ARCH_FILE, WEIGHTS_FILE, read_arch, save_program
from distillery.config.compress import Int8Dynamic, WeightOnly
from distillery.core.errors import UserError
from distillery.core.files import atomic_path, atomic_write_json, read_json, sha256_file, verify_sha256
from distillery.models.architectures import build_model
from distillery.models.cascade import Cascade
from distillery.models.exported import load_program
from distillery.models.shapes import layer_shapes, resize

QPARAMS = "qparams."  # safetensors key prefix of recorded observer parameters
TORCHAO_STEPS: dict[str, type[Int8Dynamic | WeightOnly]] = {"int8_dynamic": Int8Dynamic,
                                                           "weight_only": WeightOnly}


# ---------------------------------------------------------------- save


def save_dense(folder: Path, model: nn.Module, spec: dict, base_shapes: dict) -> list[Path]:
    """An fp32 (possibly pruned) model; sparse-encode the weights where that is smaller."""
    tensors, sparse = {}, {}
    for name, t in model.state_dict().items():
        packed = _sparse(t)
        if packed is None:
            tensors[name] = t.detach().contiguous().clone()
        else:
            tensors[f"{name}::mask"], tensors[f"{name}::values"] = packed
            sparse[name] = list(t.shape)
    return _write(folder, tensors, {"format": "dense", "sparse": sparse, **_layers(model, spec, base_shapes)})


def save_torchao(folder: Path, model: nn.Module, spec: dict, base_shapes: dict, step) -> list[Path]:
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    tensors, metadata = flatten_tensor_state_dict(model.state_dict())
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    return _write(folder, tensors,
                  {"format": "torchao", "quant": step.model_dump(), **_layers(model, spec, base_shapes)},
                  metadata=metadata)


def save_pt2e(folder: Path, fp32: nn.Module, prepared: torch.fx.GraphModule, spec: dict, base_shapes: dict,
              qat: bool) -> list[Path]:
    """`fp32`: the float model as exported (after QAT: with the trained weights); `prepared`:
    its calibrated (or QAT-trained) prepared graph."""
    qparams = _quantize().record_qparams(prepared)
    tensors = {k: v.detach().contiguous().clone() for k, v in fp32.state_dict().items()}
    int8 = {}
    for param, obs in _quantize().weight_observers(prepared).items():
        # A weight the quantizer changed first (batch norm folded in) stays fp32: its int8
        # form would not be the weight this model loads.
        if param in tensors and torch.equal(prepared.get_parameter(param).detach(), tensors[param]):
            tensors[param] = _quantize().int8_weight(tensors[param], qparams[obs])
            int8[param] = obs
    for name, q in qparams.items():
        tensors[f"{QPARAMS}{name}.scale"], tensors[f"{QPARAMS}{name}.zero_point"] = \
            q["scale"], q["zero_point"]
    observers = {name: {k: v for k, v in q.items() if k not in ("scale", "zero_point")}
                 for name, q in qparams.items()}
    quant = {"kind": "int8_static", "qat": qat, "observers": observers, "int8_weights": int8}
    return _write(folder, tensors, {"format": "pt2e", "quant": quant, **_layers(fp32, spec, base_shapes)})


def save_cascade(folder: Path, members: dict[str, Path], spec: dict, cascade: dict[str, Any]) -> list[Path]:
    """A cascade: each member's verified folder copied into `folder/<role>` (role: small,
    large), then an arch.json naming them by sha256 with `cascade`'s threshold and confidence."""
    files, shas = [], {}
    for role, source in members.items():
        arch, weights = read_arch(source)
        with atomic_path(folder / role / weights.name) as tmp:
            shutil.copyfile(weights, tmp)
        atomic_write_json(folder / role / ARCH_FILE, arch)
        files += [folder / role / weights.name, folder / role / ARCH_FILE]
        shas[role] = sha256_file(folder / role / ARCH_FILE)
    atomic_write_json(folder / ARCH_FILE, {"format": "cascade", "spec": spec, "members": shas, **cascade,
                                           "versions": {"torch": torch.__version__}})
    return [*files, folder / ARCH_FILE]


def _layers(model: nn.Module, spec: dict, base_shapes: dict) -> dict[str, Any]:
    """The spec, and the layer sizes where they differ from the spec's (channel pruning)."""
    shapes = layer_shapes(model)
    changed = {name: size for name, size in shapes.items() if base_shapes.get(name) != size}
    return {"spec": spec, "layers": changed}


def _write(folder: Path, tensors: dict[str, torch.Tensor], arch: dict,
           metadata: dict | None = None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_FILE
    with atomic_path(weights) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    arch = {**arch, "weights": WEIGHTS_FILE, "weights_sha256": sha256_file(weights),
            "versions": {"torch": torch.__version__, "torchao": _torchao_version()}}
    atomic_write_json(folder / ARCH_FILE, arch)
    return [weights, folder / ARCH_FILE]


def _sparse(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(packed bit mask, non-zero values) when smaller than the dense tensor, else None."""
    if not t.is_floating_point() or t.dim() < 2:
        return None
    flat = t.detach().reshape(-1)
    nonzero = flat != 0
    nnz = int(nonzero.sum())
    if (flat.numel() + 7) // 8 + nnz * t.element_size() >= flat.numel() * t.element_size():
        return None
    return torch.from_numpy(np.packbits(nonzero.numpy())), flat[nonzero].clone()


def _unsparse(mask: torch.Tensor, values: torch.Tensor, shape: list[int]) -> torch.Tensor:
    n = int(np.prod(shape))
    where = torch.from_numpy(np.unpackbits(mask.numpy(), count=n).astype(bool))
    if int(where.sum()) != values.numel():
        raise UserError(f"sparse tensor of shape {shape}: mask and values disagree")
    out = torch.zeros(n, dtype=values.dtype)
    out[where] = values
    return out.reshape(shape)


def _torchao_version() -> str:
    return package_metadata.version("torchao")


# ---------------------------------------------------------------- load


def _quantize() -> ModuleType:
    """`models.quantized`, and torchao with it: seconds of import (2.7 s here) that a
    replica serving a float model or a cascade of float models never needs."""
    from distillery.models import quantized

    return quantized


@dataclass(frozen=True)
class Format:
    """One storage format: `save` writes a folder (its arguments are the format's own), `load`
    rebuilds the model from a folder whose arch.json names this format (weights verified)."""

    save: Callable[..., list[Path]]
    load: Callable[[Path, dict], nn.Module]


def load(folder: str | Path) -> tuple[nn.Module, dict]:
    """Verify and rebuild the model in a model folder, any format; return (model in eval mode, arch)."""
    folder = Path(folder)
    head = read_json(folder / ARCH_FILE)
    fmt = head.get("format", "dense") if isinstance(head, dict) else "dense"  # read_arch says what is wrong
    if fmt not in FORMATS:
        raise UserError(f"{folder / ARCH_FILE}: unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    model = FORMATS[fmt].load(folder, head)
    model.eval()  # (an exported graph's eval() returns None)
    return model, head


def _load_weights(folder: Path, fill: Callable[[nn.Module, dict, dict, dict], nn.Module]) -> nn.Module:
    """The verified weights into the spec's model, resized to the recorded layer sizes, by `fill`."""
    arch, weights = read_arch(folder)
    tensors, metadata = _read(weights)
    model = resize(build_model(arch["spec"]), arch.get("layers") or {})
    try:
        return fill(model, tensors, metadata, arch)
    except (RuntimeError, KeyError, ValueError) as e:
        raise UserError(f"{weights}: weights do not fit the spec in {ARCH_FILE} "
                        f"({type(e).__name__}: {e})") from None


def _load_dense(model: nn.Module, tensors: dict, metadata: dict, arch: dict) -> nn.Module:
    model.load_state_dict(_dense_state(tensors, arch.get("sparse") or {}), strict=True)
    return model


def _load_cascade(folder: Path, arch: dict) -> nn.Module:
    if not isinstance(arch.get("members"), dict) or {"small", "large"} - arch["members"].keys() or \
            not isinstance(arch.get("threshold"), (int, float)) or \
            arch.get("confidence") not in ("max_prob", "margin"):
        raise UserError(f"{folder / ARCH_FILE}: a cascade needs members small and large, a threshold "
                        "and a confidence")
    members = {}
    for role in ("small", "large"):
        verify_sha256(folder / role / ARCH_FILE, arch["members"][role])
        members[role] = load(folder / role)[0]
    return Cascade(members["small"], members["large"], arch["threshold"], arch["confidence"]).eval()


def _read(weights: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except SafetensorError as e:
        raise UserError(f"{weights}: not a readable safetensors file ({e})") from None


def _dense_state(tensors: dict[str, torch.Tensor], sparse: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in tensors.items() if "::" not in k}
    for name, shape in sparse.items():
        state[name] = _unsparse(tensors[f"{name}::mask"], tensors[f"{name}::values"], shape)
    return state


def _load_torchao(model: nn.Module, tensors: dict, metadata: dict, arch: dict) -> nn.Module:
    step = TORCHAO_STEPS[arch["quant"]["kind"]].model_validate(arch["quant"])
    _quantize().apply_torchao(model, step)  # the same tensor classes, then the saved data into them
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    state, leftover = unflatten_tensor_state_dict(tensors, metadata)
    if leftover:
        raise UserError(f"unexpected tensors {sorted(leftover)[:3]} in a torchao variant")
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _load_pt2e(model: nn.Module, tensors: dict, metadata: dict, arch: dict) -> nn.Module:
    quant, in_shape = arch["quant"], arch["spec"]["in_shape"]
    qparams = {name: {**attrs, "scale": tensors[f"{QPARAMS}{name}.scale"],
                      "zero_point": tensors[f"{QPARAMS}{name}.zero_point"]}
               for name, attrs in quant["observers"].items()}
    state = {k: v for k, v in tensors.items() if not k.startswith(QPARAMS)}
    for param, obs in quant["int8_weights"].items():
        state[param] = _quantize().dequantized_weight(state[param], qparams[obs])
    model.load_state_dict(state, strict=True)
    prepared = _quantize().freeze(_quantize().prepare(model, in_shape, qat=quant["qat"]), qparams)
    return _quantize().convert(prepared)


def _load_program(folder: Path, arch: dict) -> nn.Module:
    return load_program(read_arch(folder)[1])


FORMATS: dict[str, Format] = {
    "dense": Format(save_dense, lambda folder, arch: _load_weights(folder, _load_dense)),
    "exported": Format(save_program, _load_program),
    "torchao": Format(save_torchao, lambda folder, arch: _load_weights(folder, _load_torchao)),
    "pt2e": Format(save_pt2e, lambda folder, arch: _load_weights(folder, _load_pt2e)),
    "cascade": Format(save_cascade, _load_cascade),
}
