"""Data parallelism: a whole model per rank ("none", DDP) or every piece sharded (FSDP2)."""

from __future__ import annotations

import copy
from typing import cast

from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from distillery.models.architectures import stage_layers
from distillery.training.loop import optimizer_step
from distillery.training.model_state import (
    cpu_copy,
    dcp,
    device_of,
    eval_forward,
    load_local_optim_state,
    local_optim_state,
)


class Replicated:
    """A whole model per rank: "none" (one process, no process group) or "ddp", which averages
    gradients across ranks in backward (each rank: its share of the batch). `predict` runs the
    local model: no collective, any rank may call it alone."""

    def __init__(self, name: str, rank: int):
        self.name, self.rank = name, rank

    def wrap(self, model: nn.Module, spec: dict) -> nn.Module:
        if self.name != "ddp":
            return model
        device = device_of(model)  # DDP takes device_ids on a GPU and none on the CPU
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model

    def train_step(self, model, x, target, loss_fn, opt) -> float:
        model.train()  # DDP/FSDP average the grads across ranks inside backward
        return optimizer_step(model, x, target, loss_fn, opt)

    def predict(self, model, x) -> Tensor:
        return eval_forward(self.unwrap(model), x)

    def owned_state(self, model) -> dict[str, Tensor] | None:
        return cpu_copy(self.unwrap(model).state_dict()) if self.rank == 0 else None

    def load_owned_state(self, model, state) -> None:
        self.unwrap(model).load_state_dict(state)

    def optimizer_state(self, model, opt) -> dict | None:
        return local_optim_state(self.unwrap(model), opt) if self.rank == 0 else None

    def load_optimizer_state(self, model, opt, state) -> None:
        """Every rank is given rank 0's dict (the replicas are identical)."""
        load_local_optim_state(self.unwrap(model), opt, state)

    def local_parameter_names(self, model) -> set[str]:
        return {n for n, _ in self.unwrap(model).named_parameters()}

    def local_numel(self, model) -> int:
        return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- FSDP2


class FSDP:
    """FSDP2: every parameter-holding piece of `stage_layers` and the root are `fully_shard`ed
    over all ranks (dim-0 shards); each rank feeds its share of the batch and reduce-scatter
    averages the grads. All methods but `local_*` are collectives."""

    name = "fsdp"

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def wrap(self, model: nn.Module, spec: dict) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device_of(model).type, (self.world_size,))
        # Inner units first, root last: the root then owns only what no block claimed, and each
        # block's all-gather is freed right after its forward (reshard_after_forward default).
        for _, layer in stage_layers(model, spec):
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        return cast(nn.Module, fully_shard(model, mesh=mesh))  # the module itself, now an FSDPModule too

    def train_step(self, model, x, target, loss_fn, opt) -> float:
        model.train()  # DDP/FSDP average the grads across ranks inside backward
        return optimizer_step(model, x, target, loss_fn, opt)

    def predict(self, model, x) -> Tensor:
        return eval_forward(model, x)

    def owned_state(self, model) -> dict[str, Tensor] | None:
        dcp_sd = dcp()
        # Gathered to rank 0 only (cpu_offload=True); the other ranks get {} back.
        opts = dcp_sd.StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = dcp_sd.get_model_state_dict(model, options=opts)
        return cpu_copy(state) if self.rank == 0 else None

    def load_owned_state(self, model, state) -> None:
        dcp_sd = dcp()
        # Every rank holds the full dict, so each cuts out its own shard: no broadcast needed.
        dcp_sd.set_model_state_dict(model, state, options=dcp_sd.StateDictOptions(full_state_dict=True))

    def optimizer_state(self, model, opt) -> dict | None:
        dcp_sd = dcp()
        opts = dcp_sd.StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = dcp_sd.get_optimizer_state_dict(model, opt, options=opts)
        return copy.deepcopy(state) if self.rank == 0 else None

    def load_optimizer_state(self, model, opt, state) -> None:
        """Every rank is given rank 0's full dict and keeps its own shard of each tensor."""
        if not state["state"]:
            # A stateless optimizer (SGD without momentum) has only hyper-parameters, nothing to
            # shard; DCP's full-state path would fail on it ("Expected device to be set").
            load_local_optim_state(model, opt, state)
            return
        dcp_sd = dcp()
        opt.zero_grad(set_to_none=True)  # else DCP skips initialising an empty optimizer
        dcp_sd.set_optimizer_state_dict(model, opt, copy.deepcopy(state),
                                        options=dcp_sd.StateDictOptions(full_state_dict=True))

    def local_parameter_names(self, model) -> set[str]:
        """Every name: FSDP keeps the module tree and shards each parameter (see `local_numel`)."""
        return {n for n, _ in model.named_parameters()}

    def local_numel(self, model) -> int:
        """Parameter elements stored on this rank: the sum of the local DTensor shards."""
        return sum(_local(p).numel() for p in model.parameters())


def _local(p: Tensor) -> Tensor:
    return p.to_local() if hasattr(p, "to_local") else p
