"""Pruning steps, each `model -> model`, in place.

Unstructured: global magnitude pruning, zeros written into the weights themselves, so no
`weight_orig`/`weight_mask` is ever saved. It gives no speed-up on dense kernels; it is here
for size and as the article's "weight pruning".
Structured: Torch-Pruning removes whole conv channels and linear units and shrinks every
layer that depends on them, which is what makes a model faster.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch_pruning as tp
from torch import nn

from distillery.compression.recipe import PruneChannels, PruneUnstructured
from distillery.errors import UserError
from distillery.models.architectures import count_macs

PRUNABLE = (nn.Conv2d, nn.Linear)
RESIZABLE = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)


def check_layers(model: nn.Module, names: Iterable[str], where: str) -> None:
    """Refuse module names the model does not have, listing the ones it does."""
    known = {name for name, m in model.named_modules() if isinstance(m, PRUNABLE)}
    unknown = sorted(set(names) - known)
    if unknown:
        raise UserError(f"{where}: no conv/linear layer named {', '.join(unknown)} "
                        f"(this model has {', '.join(sorted(known))})")


def prunable(model: nn.Module, exclude: Iterable[str] = ()) -> dict[str, nn.Module]:
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
        model.get_submodule(name).weight.mul_(mask)


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


def classifier(model: nn.Module) -> nn.Module:
    """The last linear layer: its outputs are the classes and are never pruned."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError("channel pruning needs a model whose last layer is nn.Linear")
    return linears[-1]


def prune_channels(model: nn.Module, step: PruneChannels, in_shape: list[int], max_steps: int = 95) -> nn.Module:
    """Remove channels in small rounds (1% of each layer per round, least important first by
    the group's L1/L2 norm) until the model needs `mac_ratio` times fewer MACs."""
    base = count_macs(model, in_shape)
    ignored = [classifier(model)] + [model.get_submodule(name) for name in step.exclude]
    pruner = tp.pruner.MetaPruner(
        model, torch.zeros(1, *in_shape), importance=tp.importance.GroupMagnitudeImportance(p=1 if step.importance == "l1" else 2),
        pruning_ratio=max_steps / 100, iterative_steps=max_steps, ignored_layers=ignored,
        round_to=step.round_to if step.round_to > 1 else None)
    for _ in range(max_steps):
        pruner.step()
        if base / count_macs(model, in_shape) >= step.mac_ratio:
            return model
    raise UserError(f"prune_channels: mac_ratio {step.mac_ratio} not reachable with round_to {step.round_to} and "
                    f"{', '.join(step.exclude) or 'no'} layers excluded (got {base / count_macs(model, in_shape):.2f}x); "
                    "lower mac_ratio or round_to, or exclude fewer layers")


def layer_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Per conv/linear/batch-norm layer its [in, out] channels (batch-norm: [features]; a grouped
    conv, e.g. depthwise, also its groups, which pruning changes): with the architecture's
    spec, all a fresh process needs to rebuild a channel-pruned model."""
    shapes = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            shapes[name] = [m.in_channels, m.out_channels, *([m.groups] if m.groups > 1 else [])]
        elif isinstance(m, nn.Linear):
            shapes[name] = [m.in_features, m.out_features]
        elif isinstance(m, nn.BatchNorm2d):
            shapes[name] = [m.num_features]
    return shapes


def resize(model: nn.Module, shapes: dict[str, list[int]]) -> nn.Module:
    """Replace each named layer by one of the recorded size (weights are loaded afterwards)."""
    for name, size in shapes.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"layer {name!r} in the recorded shapes is not in the model") from None
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, _resized(old, size))
    return model


def _resized(m: nn.Module, size: list[int]) -> nn.Module:
    if isinstance(m, nn.Conv2d):
        return nn.Conv2d(size[0], size[1], m.kernel_size, stride=m.stride, padding=m.padding,
                         dilation=m.dilation, groups=size[2] if len(size) > 2 else 1, bias=m.bias is not None)
    if isinstance(m, nn.Linear):
        return nn.Linear(size[0], size[1], bias=m.bias is not None)
    if isinstance(m, nn.BatchNorm2d):
        return nn.BatchNorm2d(size[0], eps=m.eps, momentum=m.momentum)
    raise UserError(f"cannot resize a {type(m).__name__}")
