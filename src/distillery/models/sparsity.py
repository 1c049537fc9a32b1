"""Unstructured sparsity of a model's weights: set by global magnitude, kept at zero while the
model trains, reached gradually over fine-tuning. Plain PyTorch, `model -> model` in place:
compression's `prune_unstructured` step and Ray Train's workers (fine-tuning a pruned model)
both use it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
from torch import nn

from distillery.config.compress import PruneUnstructured

PRUNABLE = (nn.Conv2d, nn.Linear)


def prunable(model: nn.Module, exclude: Iterable[str] = ()) -> dict[str, nn.Conv2d | nn.Linear]:
    skip = set(exclude)
    return {name: m for name, m in model.named_modules() if isinstance(m, PRUNABLE) and name not in skip}


def prune_unstructured(model: nn.Module, step: PruneUnstructured, sparsity: float | None = None) -> nn.Module:
    """Zero the smallest-magnitude weights across all prunable layers (one global ranking)
    until `sparsity` (default: the step's) of them are zero. Weights already zero count.

    In place on the weights' storage (not `torch.nn.utils.prune`, whose reparametrisation
    swaps `weight.data`): the same code then runs under DDP, whose replicas share these
    parameters, and leaves nothing like `weight_orig`/`weight_mask` behind."""
    layers = prunable(model, step.exclude)
    scores = torch.cat([m.weight.detach().abs().reshape(-1) for m in layers.values()])
    k = round((step.sparsity if sparsity is None else sparsity) * scores.numel())
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[torch.topk(scores, k, largest=False).indices] = False
    masks, start = {}, 0
    for name, m in layers.items():
        masks[name] = keep[start:start + m.weight.numel()].reshape(m.weight.shape)
        start += m.weight.numel()
    apply_masks(model, masks)
    return model


def zero_masks(model: nn.Module, exclude: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Where each prunable weight is non-zero: what fine-tuning must keep at zero."""
    return {name: m.weight.detach() != 0 for name, m in prunable(model, exclude).items()}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    for name, mask in masks.items():
        cast(torch.Tensor, model.get_submodule(name).weight).mul_(mask)  # a prunable layer's (`masks`' keys)


class GradualSparsity:
    """Sparsity reached over fine-tuning (Zhu & Gupta 2017): at the start of epoch e of E the
    target is s * (1 - (1 - e/E)^3); after every optimizer step the pruned weights are put
    back to zero (momentum would otherwise regrow them). Masks follow from the weights, so a
    run resumed from a checkpoint rebuilds them exactly."""

    def __init__(self, model: nn.Module, step: PruneUnstructured, epochs: int):
        self.model, self.step, self.epochs = model, step, epochs
        self.masks: dict[str, torch.Tensor] = {}

    def start_epoch(self, epoch: int) -> None:
        target = self.step.sparsity * (1.0 - (1.0 - min(epoch, self.epochs) / self.epochs) ** 3)
        prune_unstructured(self.model, self.step, sparsity=target)
        self.masks = zero_masks(self.model, self.step.exclude)

    def after_step(self, *_args) -> None:  # an optimizer step post-hook
        apply_masks(self.model, self.masks)


def sparsity_report(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per conv/linear layer: weights and the fraction of them that are zero."""
    return {name: {"weights": m.weight.numel(), "sparsity": round((m.weight == 0).float().mean().item(), 4)}
            for name, m in prunable(model).items()}
