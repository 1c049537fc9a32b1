"""Parallelism as a function applied to an unchanged model: none, DDP, FSDP2, GPipe pipeline.

`make_strategy(name, rank=, world_size=)` returns a `Strategy`; `wrap` turns the full model
(identical on every rank, process group already initialised) into what this rank trains, and
`train_step` / `predict` / `owned_state` / `optimizer_state` hide how the work is split. The
models in `distillery.models.architectures` know nothing of this module.

Checkpoints are always keyed by the full, unwrapped model's names, so a run saved under one
strategy can be merged and read back as a plain `state_dict` (and resumed under the same one).

Strategies live in `data_parallel` (none, DDP, FSDP2) and `pipeline_parallel` (GPipe); any
batch size works under each, the last partial one included.

Collectives (all ranks must call together): under fsdp every method but `local_*`; under ddp
`train_step`; under pipeline `train_step` and `predict`. Everything else is local.
Data parallel: each rank passes its own share of the batch and gets back that share's mean loss;
BatchNorm running statistics stay per rank (each sees only its share); checkpoints hold rank 0's.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from distillery.core.errors import UserError
from distillery.training.data_parallel import FSDP, Replicated
from distillery.training.losses import LossFn
from distillery.training.pipeline_parallel import Pipeline

STRATEGIES = ("none", "ddp", "fsdp", "pipeline")


class Strategy(Protocol):
    """How one rank trains its part of a model. See the module docstring for collectives."""

    name: str

    def wrap(self, model: nn.Module, spec: dict) -> nn.Module: ...
    def train_step(self, model: nn.Module, x: Tensor, target: Tensor, loss_fn: LossFn,
                   opt: torch.optim.Optimizer) -> float | None: ...
    def predict(self, model: nn.Module, x: Tensor) -> Tensor | None: ...
    def owned_state(self, model: nn.Module) -> dict[str, Tensor] | None: ...
    def load_owned_state(self, model: nn.Module, state: dict[str, Tensor]) -> None: ...
    def optimizer_state(self, model: nn.Module, opt: torch.optim.Optimizer) -> dict | None: ...
    def load_optimizer_state(self, model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None: ...
    def local_parameter_names(self, model: nn.Module) -> set[str]: ...
    def local_numel(self, model: nn.Module) -> int: ...


def make_strategy(name: str, *, rank: int, world_size: int, microbatches: int = 4) -> Strategy:
    """The strategy `name` for this rank; a bad name or layout is a UserError."""
    if name not in STRATEGIES:
        raise UserError(f"unknown parallel strategy {name!r} (choose from {', '.join(STRATEGIES)})")
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is not in a world of {world_size}")
    if name == "none" and world_size != 1:
        raise UserError(f"strategy 'none' trains on one worker, got world_size={world_size} (use ddp)")
    if microbatches < 1:
        raise UserError(f"microbatches must be >= 1, got {microbatches}")
    if name == "pipeline":
        return Pipeline(rank, world_size, microbatches)
    if name == "fsdp":
        return FSDP(rank, world_size)
    return Replicated(name, rank)
