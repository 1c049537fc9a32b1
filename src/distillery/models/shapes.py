"""A model's layer sizes, recorded and re-applied: how a channel-pruned model is rebuilt in a
fresh process from its architecture's spec and the recorded shapes, before its weights load."""

from __future__ import annotations

from torch import nn

from distillery.core.errors import UserError


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


def conv_like(m: nn.Conv2d, c_in: int, c_out: int, groups: int = 1) -> nn.Conv2d:
    """A new convolution with `m`'s kernel, stride, padding, dilation and bias, other channels."""
    # torch types a Conv2d's own sizes as tuple[int, ...] and its arguments as pairs: they are pairs
    return nn.Conv2d(c_in, c_out, m.kernel_size, stride=m.stride, padding=m.padding,  # type: ignore[arg-type]
                     dilation=m.dilation, groups=groups, bias=m.bias is not None)  # type: ignore[arg-type]


def _resized(m: nn.Module, size: list[int]) -> nn.Module:
    if isinstance(m, nn.Conv2d):
        return conv_like(m, size[0], size[1], groups=size[2] if len(size) > 2 else 1)
    if isinstance(m, nn.Linear):
        return nn.Linear(size[0], size[1], bias=m.bias is not None)
    if isinstance(m, nn.BatchNorm2d):
        return nn.BatchNorm2d(size[0], eps=m.eps, momentum=m.momentum)
    raise UserError(f"cannot resize a {type(m).__name__}")
