"""Pruning steps, each `model -> model`, in place.

Unstructured (`models.sparsity`, which training uses too): global magnitude pruning, zeros
written into the weights themselves, so no `weight_orig`/`weight_mask` is ever saved. It
gives no speed-up on dense kernels; it is here for size and as the article's "weight pruning".
Structured: Torch-Pruning removes whole conv channels and linear units and shrinks every
layer that depends on them, which is what makes a model faster.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch_pruning as tp
from torch import nn

from distillery.config.compress import PruneChannels
from distillery.core.errors import UserError
from distillery.models.architectures import count_macs
from distillery.models.shapes import layer_shapes, resize  # noqa: F401 (pruning's API)
from distillery.models.sparsity import (  # noqa: F401
    PRUNABLE,
    GradualSparsity,
    apply_masks,
    prunable,
    prune_unstructured,
    sparsity_report,
    zero_masks,
)


def check_layers(model: nn.Module, names: Iterable[str], where: str) -> None:
    """Refuse module names the model does not have, listing the ones it does."""
    known = {name for name, m in model.named_modules() if isinstance(m, PRUNABLE)}
    unknown = sorted(set(names) - known)
    if unknown:
        raise UserError(f"{where}: no conv/linear layer named {', '.join(unknown)} "
                        f"(this model has {', '.join(sorted(known))})")


def classifier(model: nn.Module) -> nn.Module:
    """The last linear layer: its outputs are the classes and are never pruned."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError("channel pruning needs a model whose last layer is nn.Linear")
    return linears[-1]


def prune_channels(model: nn.Module, step: PruneChannels, in_shape: list[int],
                   max_steps: int = 95) -> nn.Module:
    """Remove channels in small rounds (1% of each layer per round, least important first by
    the group's L1/L2 norm) until the model needs `mac_ratio` times fewer MACs."""
    base = count_macs(model, in_shape)
    ignored = [classifier(model)] + [model.get_submodule(name) for name in step.exclude]
    pruner = tp.pruner.MetaPruner(
        model, torch.zeros(1, *in_shape),
        importance=tp.importance.GroupMagnitudeImportance(p=1 if step.importance == "l1" else 2),
        pruning_ratio=max_steps / 100, iterative_steps=max_steps, ignored_layers=ignored,
        round_to=step.round_to if step.round_to > 1 else None)
    for _ in range(max_steps):
        pruner.step()
        if base / count_macs(model, in_shape) >= step.mac_ratio:
            return model
    raise UserError(f"prune_channels: mac_ratio {step.mac_ratio} not reachable with round_to "
                    f"{step.round_to} and {', '.join(step.exclude) or 'no'} layers excluded (got "
                    f"{base / count_macs(model, in_shape):.2f}x); lower mac_ratio or round_to, or "
                    "exclude fewer layers")
