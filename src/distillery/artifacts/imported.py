"""A teacher made elsewhere (`teacher.import_from`), in one of three forms:

- a distillery model folder (arch.json + weights) or a finished run's directory (its teacher);
- a `.safetensors` file of weights for the architecture `teacher.model` names, built for this
  run's data: e.g. `{kind: torchvision, name: resnet18}` and a state dict saved from
  torchvision's resnet18 with 10 classes and 3-channel input;
- a `torch.export` program (`.pt2`), checked so that nothing in it is unpickled;

each a local path or an `s3://` / `gs://` URI (copied to this node's cache first). Each is
verified (sha256 recorded), checked against the run's image shape and class count
before any training, and written into the run as a model folder of its own.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from distillery import artifacts
from distillery.artifacts import ARCH_FILE, save_model, save_program
from distillery.core.errors import UserError
from distillery.core.files import read_json, sha256_file
from distillery.models.architectures import build_model, make_spec
from distillery.models.exported import load_program
from distillery.run import storage

PICKLES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


class Imported(NamedTuple):
    model: nn.Module
    spec: dict[str, Any]
    source: str  # the folder, file or URI read
    sha256: str  # of the weights or program
    save: Callable[[Path], list[Path]]  # writes it into a model folder


def source_of(location: str) -> Path:
    """The model folder (a run's teacher folder for a run) or the file to read, on this node."""
    path = _local(location)
    if path.is_file():
        if path.suffix in PICKLES:
            raise UserError(f"teacher.import_from: {path} is a pickle-based file ({path.suffix}), which can "
                            "run code when loaded and is never read here; save the weights with safetensors "
                            "(safetensors.torch.save_file(model.state_dict(), ...)) or the model with "
                            "torch.export.save")
        if path.suffix not in (".safetensors", ".pt2"):
            raise UserError(f"teacher.import_from: {path}: expected a .safetensors or .pt2 file, a model "
                            "folder or a run's directory")
        return path.resolve()
    for folder in (path, path / "teacher"):
        if (folder / ARCH_FILE).is_file():
            return folder.resolve()
    raise UserError(f"teacher.import_from: {path} holds no {ARCH_FILE} (give a model folder, a finished "
                    "run's directory, a .safetensors or a .pt2 file)")


def _local(location: str) -> Path:
    """A local path as it is; a URI's file, or model folder (a run's: its teacher), copied to
    this node's cache. Nothing is trusted for being there: it is verified as a local one is."""
    if not storage.is_uri(location):
        return Path(location).expanduser()
    parts = urlsplit(location)
    name = posixpath.basename(parts.path)
    if name.endswith((".safetensors", ".pt2", *PICKLES)):
        parent = urlunsplit(parts._replace(path=posixpath.dirname(parts.path)))
        dest = storage.cache_dir(parent) / name
        # a pickle is never fetched
        if not name.endswith(PICKLES) and not storage.download(parent, name, dest):
            raise UserError(f"teacher.import_from: {location}: no such object")
        return dest
    root = storage.cache_dir(location)
    for prefix in ("", "teacher/"):
        if storage.download(location, prefix + ARCH_FILE, root / prefix / ARCH_FILE):
            weights = read_json(root / prefix / ARCH_FILE).get("weights")
            if not isinstance(weights, str) or posixpath.basename(weights) != weights \
                    or weights in ("", ".", ".."):
                raise UserError(f"teacher.import_from: {location}/{prefix}{ARCH_FILE}: weights "
                                "must be a file name")
            storage.download(location, prefix + weights, root / prefix / weights)
            return root
    raise UserError(f"teacher.import_from: {location} holds no {ARCH_FILE} (give a model folder, a finished "
                    "run, a .safetensors or a .pt2 file)")


def digest(location: str) -> str:
    """What identifies the import: the file's sha256, or the folder's arch.json's (which holds
    its weights' sha256)."""
    source = source_of(location)
    return sha256_file(source if source.is_file() else source / ARCH_FILE)


def import_model(location: str, model_cfg: Any, in_shape: list[int], num_classes: int) -> Imported:
    source = source_of(location)
    origin = location if storage.is_uri(location) else str(source)
    want = f"this run's data has shape {list(in_shape)} and {num_classes} classes"
    if source.suffix == ".safetensors":
        return _weights(source, origin, model_cfg, in_shape, num_classes, want)
    if source.suffix == ".pt2":
        return _program(source, origin, in_shape, num_classes, want)
    model, arch = artifacts.load(source)  # sha256 verified; safetensors and JSON only
    spec = arch["spec"]
    if (list(spec["in_shape"]), spec["num_classes"]) != (list(in_shape), num_classes):
        raise UserError(f"teacher.import_from: {source} takes images of shape {spec['in_shape']} and gives "
                        f"{spec['num_classes']} classes; {want}")
    return Imported(model, spec, origin, arch["weights_sha256"],
                    lambda folder: save_model(folder, model, spec))


def _weights(source: Path, origin: str, model_cfg: Any, in_shape: list[int], num_classes: int,
             want: str) -> Imported:
    """Weights for `teacher.model`'s architecture, checked key by key and shape by shape."""
    sha = sha256_file(source)
    try:
        state = load_file(str(source))
    except SafetensorError as e:
        raise UserError(f"teacher.import_from: {source}: not a readable safetensors file ({e})") from None
    spec = make_spec(model_cfg, in_shape, num_classes)
    model = build_model(spec)
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    found = {k: list(v.shape) for k, v in state.items()}
    wrong = [f"{k} is {found[k]} in the file, {expected[k]} here" for k in expected
             if k in found and found[k] != expected[k]]
    missing, extra = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if wrong or missing or extra:
        problems = wrong[:3] + ([f"missing {', '.join(missing[:3])}"] if missing else []) \
            + ([f"not in the model: {', '.join(extra[:3])}"] if extra else [])
        raise UserError(f"teacher.import_from: {source} does not fit teacher.model ({_describe(model_cfg)}) "
                        f"for {want}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)
    model.eval()
    return Imported(model, spec, origin, sha, lambda folder: save_model(folder, model, spec))


def _program(source: Path, origin: str, in_shape: list[int], num_classes: int, want: str) -> Imported:
    sha = sha256_file(source)
    model = load_program(source)
    # Run it on its own input shape (the run's where a dimension is dynamic) to learn its classes.
    probe = [w if got is None else got for got, w in zip(model.image_shape, in_shape)]
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *probe))
    except Exception as e:  # the graph's own shape guards
        raise UserError(f"teacher.import_from: {source} does not take images of shape {probe}: "
                        f"{str(e).splitlines()[0]}") from None
    classes = out.shape[-1] if isinstance(out, torch.Tensor) and out.dim() == 2 else "no [N, K] output, so no"
    if probe != list(in_shape) or classes != num_classes:
        raise UserError(f"teacher.import_from: {source} takes images of shape {model.image_shape} and gives "
                        f"{classes} classes; {want}")
    spec = {"kind": "exported", "in_shape": list(in_shape), "num_classes": num_classes}
    return Imported(model, spec, origin, sha, lambda folder: save_program(folder, source, spec))


def _describe(cfg: Any) -> str:
    return " ".join(str(v) for v in cfg.model_dump().values())
