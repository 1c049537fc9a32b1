"""A `torch.export` program (`.pt2`) as a frozen model, loaded without unpickling anything.

`torch.export.load` runs arbitrary code in four places: it fully unpickles tensor subclasses
and opaque constants, and the sample inputs when a safe load of them fails, and it loads
AOTInductor packages (shared libraries). A plain program has none of
these: its graph is JSON and its weights raw bytes. So the archive is read first, as a zip,
and every entry must be one of a plain program's (below); anything else is refused by name
before torch reads the file.

A program runs in the mode it was exported in (eval, for a teacher): it has no train mode,
no module structure to prune and no source to quantize, so compression steps are refused on
it (the frontier says why) while it can teach, be scored, join a cascade and be served.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

from distillery.core.errors import UserError

# What a plain program's archive holds, under its top-level folder.
_PLAIN = re.compile(r"(archive_format|archive_version|byteorder|version|\.data/version"
                    r"|\.data/serialization_id|models/\w+\.json|extra/.+|data/sample_inputs/\w+\.pt"
                    r"|data/weights/\w+_weights_config\.json|data/weights/weight_\d+"
                    r"|data/constants/\w+_constants_config\.json|data/constants/tensor_\d+)")


class ExportedModel(nn.Module):
    """The program's graph as a module. `batch`: the batch size it was exported with, when
    that is fixed (no dynamic batch dimension): inputs then run in chunks of that size, the
    last padded (MACs counted on one image then cover a whole chunk). `image_shape`: its
    [C, H, W], None where a dimension was exported dynamic."""

    def __init__(self, graph: nn.Module, batch: int | None, image_shape: list[int | None]):
        super().__init__()
        self.graph, self.batch, self.image_shape = graph, batch, image_shape
        self.training = False

    def train(self, mode: bool = True) -> ExportedModel:
        if mode:
            raise UserError("an imported torch.export program cannot be trained (it has no train mode)")
        return self  # already in the mode it was exported in; the graph refuses eval() itself

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch is None:
            return self.graph(x)
        out = []
        for chunk in x.split(self.batch):
            rows = len(chunk)
            if rows < self.batch:
                chunk = torch.cat([chunk, chunk.new_zeros(self.batch - rows, *chunk.shape[1:])])
            out.append(self.graph(chunk)[:rows])
        return torch.cat(out)


def check_archive(path: Path) -> None:
    """Refuse a .pt2 whose loading would unpickle something or load native code."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if not n.endswith("/")]
            for name in names:
                inner = name.split("/", 1)[1] if "/" in name else name
                if not _PLAIN.fullmatch(inner):
                    raise UserError(f"{path}: {name} is not part of a plain torch.export program (pickled "
                                    "objects, tensor subclasses and compiled packages are refused); export "
                                    "the float model with torch.export.export and save it with "
                                    "torch.export.save")
                if inner.endswith("_config.json"):
                    _check_payloads(path, name, json.loads(archive.read(name)))
                elif inner.startswith("data/sample_inputs/"):
                    _check_safe_tensors(path, name, archive.read(name))
    except (zipfile.BadZipFile, json.JSONDecodeError, KeyError) as e:
        raise UserError(f"{path}: not a torch.export program file ({e})") from None


def _check_payloads(path: Path, name: str, config: dict) -> None:
    for fqn, payload in (config.get("config") or {}).items():
        if payload.get("use_pickle") \
                or not re.fullmatch(r"(weight|tensor)_\d+", str(payload.get("path_name"))):
            raise UserError(f"{path}: {name}: {fqn} is stored pickled; only plain tensors are loaded")


def _check_safe_tensors(path: Path, name: str, raw: bytes) -> None:
    """torch falls back to a full unpickle when a safe load fails: try the safe load here."""
    try:
        torch.load(io.BytesIO(raw), weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: {name} holds more than tensors ({type(e).__name__}); refused") from None


def load_program(path: str | Path) -> ExportedModel:
    """Check the archive, then load the program it holds."""
    path = Path(path)
    check_archive(path)
    try:
        program = torch.export.load(str(path))
    except Exception as e:
        raise UserError(f"{path}: not a loadable torch.export program ({type(e).__name__}: {e})") from None
    inputs = [n.meta["val"] for n in program.graph.nodes
              if n.op == "placeholder" and n.name in program.graph_signature.user_inputs]
    if len(inputs) != 1 or inputs[0].dim() != 4:
        raise UserError(f"{path}: the program must take one image batch [N, C, H, W]; it takes "
                        f"{[list(v.shape) for v in inputs]}")
    batch, *image_shape = [d if isinstance(d, int) else None for d in inputs[0].shape]
    return ExportedModel(program.module(), batch, image_shape)

