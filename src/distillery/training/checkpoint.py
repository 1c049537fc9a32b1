"""Training checkpoints written by every rank into one folder, verified before use.

Ray Train merges the folders that all workers report into one checkpoint directory. Each
rank writes only what it owns (see `parallel.Strategy.owned_state`) plus `rank{r}.json`, the
sha256 of each of its files. A folder is complete only when the json of every rank of the
run is there and every listed file matches: a folder left half-written (a worker killed
while reporting) is refused instead of being loaded as if complete.

    model-rank{r}.safetensors   model tensors under full-model names (merged = state_dict)
    optim-rank{r}.pt            optimizer state: tensors and numbers only, read weights_only
    trainer.pt                  rank 0: epoch, LR-scheduler state, RNG states
    history.json                rank 0: metrics of every epoch so far
    rank{r}.json                {"world_size", "epoch", "files": {name: sha256}}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from distillery.core.errors import UserError
from distillery.core.files import atomic_write_json, read_json, sha256_file, verify_sha256
from distillery.training.parallel import Strategy


def write(folder: Path, *, rank: int, world_size: int, epoch: int, strategy: Strategy, model: torch.nn.Module,
          opt: torch.optim.Optimizer, trainer_state: dict[str, Any], history: list[dict]) -> None:
    """Write this rank's share of the checkpoint for `epoch` into `folder` (collective under fsdp)."""
    owned = strategy.owned_state(model)
    optim = strategy.optimizer_state(model, opt)
    files = []
    if owned is not None:
        save_file(owned, str(folder / f"model-rank{rank}.safetensors"))
        files.append(f"model-rank{rank}.safetensors")
    if optim is not None:
        torch.save(optim, folder / f"optim-rank{rank}.pt")
        files.append(f"optim-rank{rank}.pt")
    if rank == 0:
        torch.save({"epoch": epoch, **trainer_state}, folder / "trainer.pt")
        (folder / "history.json").write_text(json.dumps(history))
        files += ["trainer.pt", "history.json"]
    digests = {name: sha256_file(folder / name) for name in files}
    atomic_write_json(folder / f"rank{rank}.json",
                      {"world_size": world_size, "epoch": epoch, "files": digests})


def verify(folder: Path, world_size: int) -> int:
    """Check every rank's files against its digests; return the checkpoint's epoch."""
    epochs = set()
    for rank in range(world_size):
        index = folder / f"rank{rank}.json"
        if not index.is_file():
            raise UserError(f"{folder}: incomplete checkpoint, {index.name} is missing")
        meta = read_json(index)
        if meta.get("world_size") != world_size:
            raise UserError(f"{index}: written by {meta.get('world_size')} workers, this run "
                            f"has {world_size}")
        for name, digest in meta["files"].items():
            verify_sha256(folder / name, digest)
        epochs.add(meta["epoch"])
    if len(epochs) != 1:
        raise UserError(f"{folder}: ranks wrote different epochs {sorted(epochs)}")
    return epochs.pop()


def merged_model_state(folder: Path) -> dict[str, torch.Tensor]:
    """The full model's state_dict, from the model files of every rank that wrote one."""
    state: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("model-rank*.safetensors")):
        state.update(load_file(str(path)))
    return state


def restore(folder: Path, *, rank: int, world_size: int, strategy: Strategy, model: torch.nn.Module,
            opt: torch.optim.Optimizer) -> tuple[dict[str, Any], list[dict]]:
    """Load model and optimizer state into this rank; return (trainer state, history)."""
    verify(folder, world_size)
    strategy.load_owned_state(model, merged_model_state(folder))
    # Pipeline ranks each own their stage's optimizer state; the others share rank 0's.
    own = folder / f"optim-rank{rank}.pt"
    optim_file = own if strategy.name == "pipeline" else folder / "optim-rank0.pt"
    strategy.load_optimizer_state(model, opt, torch.load(optim_file, weights_only=True))
    trainer_state = torch.load(folder / "trainer.pt", weights_only=True)
    return trainer_state, read_history(folder)


def read_history(folder: Path) -> list[dict]:
    return json.loads((folder / "history.json").read_text())
