"""What the parallel strategies share: eval-mode forwards, CPU copies of state, and
optimizer state keyed by parameter names (torch.distributed.checkpoint's helpers)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


@torch.no_grad()
def eval_forward(model: nn.Module, x: Tensor) -> Tensor:
    """Eval-mode logits [N, K] of x [N, C, H, W]; the module's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    try:
        return model(x)
    finally:
        model.train(was_training)


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def cpu_copy(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached CPU copies, so later training cannot change a checkpoint being written."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def dcp():
    """torch.distributed.checkpoint's state-dict helpers. Imported on use, like FSDP and
    pipelining below: they pull in torch.distributed.tensor (~1 s), which most runs never need."""
    from torch.distributed.checkpoint import state_dict as dcp_sd
    return dcp_sd


def local_optim_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by `model`'s parameter names instead of opaque integer ids."""
    dcp_sd = dcp()
    return copy.deepcopy(dcp_sd.get_optimizer_state_dict(model, opt, options=dcp_sd.StateDictOptions()))


def load_local_optim_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    dcp_sd = dcp()
    # DCP first initialises an empty optimizer with a zero step, unless grads already exist.
    opt.zero_grad(set_to_none=True)
    dcp_sd.set_optimizer_state_dict(model, opt, copy.deepcopy(state), options=dcp_sd.StateDictOptions())
