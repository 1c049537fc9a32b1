"""Standard architectures by name, from torchvision's classification models, built without
weights (nothing is downloaded; a user's weights come as safetensors through
`teacher.import_from`).

    spec: {"kind": "torchvision", "in_shape": [C,H,W], "num_classes": K, "name": "resnet18"}

The state-dict keys are torchvision's own, so weights trained with torchvision load as they
are. Grey images (C=1) get a stem convolution with one input channel, same name and the
rest of its settings.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from distillery.compat.torchvision import torchvision
from distillery.config import TorchvisionConfig
from distillery.core.errors import UserError
from distillery.models.shapes import conv_like
from distillery.models.spec import Spec


class TorchvisionSpec(Spec):
    kind: Literal["torchvision"]
    name: str = Field(min_length=1, max_length=64)


def make_spec(cfg: TorchvisionConfig, base: dict[str, Any]) -> dict[str, Any]:
    return {**base, "name": cfg.name}


def names() -> list[str]:
    """torchvision's classification models (not detection, segmentation or video)."""
    tv = torchvision()
    return tv.models.list_models(module=tv.models)


def build(spec: TorchvisionSpec) -> nn.Module:
    if spec.name not in names():
        raise UserError(f"torchvision model {spec.name!r} is not one of torchvision's classification models "
                        f"({', '.join(names())})")
    model = torchvision().models.get_model(spec.name, weights=None, num_classes=spec.num_classes)
    _set_input_channels(model, spec.in_shape[0])
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, *spec.in_shape))
    except (RuntimeError, ValueError, AssertionError) as e:
        raise UserError(f"torchvision model {spec.name} does not take images of shape {spec.in_shape}: "
                        f"{str(e).splitlines()[0]}") from None
    return model.train()


def _set_input_channels(model: nn.Module, channels: int) -> None:
    """Replace the stem convolution (the first one registered) by one taking `channels` inputs."""
    name, stem = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    if stem.in_channels == channels:
        return
    parent, _, attr = name.rpartition(".")
    parent_module = model.get_submodule(parent) if parent else model
    setattr(parent_module, attr, conv_like(stem, channels, stem.out_channels))


def layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The top-level children: FSDP's sharding units. Their composition is not always the
    forward (torchvision flattens between pooling and classifier in `forward`), so pipeline
    stages are refused for this kind (`PipelineConfig`)."""
    return list(model.named_children())
