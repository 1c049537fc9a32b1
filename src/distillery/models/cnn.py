"""The brief's student: conv3x3-ReLU-pool2 twice, then fc-ReLU-fc.

    spec: {"kind": "cnn", "in_shape": [C,H,W], "num_classes": K, "channels": [32, 64], "hidden": 128}
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Literal

from pydantic import Field
from torch import nn

from distillery.config import CNNConfig
from distillery.core.errors import UserError
from distillery.models.spec import Positive, Spec


class CNNSpec(Spec):
    kind: Literal["cnn"]
    channels: list[Positive] = Field(min_length=2, max_length=2)
    hidden: Positive


def make_spec(cfg: CNNConfig, base: dict[str, Any]) -> dict[str, Any]:
    scale = lambda n: max(1, round(n * cfg.width_mult))  # noqa: E731
    return {**base, "channels": [scale(32), scale(64)], "hidden": scale(128)}


class SmallCNN(nn.Sequential):
    """The brief's student: conv3x3-ReLU-pool2 twice, then fc-ReLU-fc.

    [N, C, H, W] -> [N, c1, H/2, W/2] -> [N, c2, H/4, W/4] -> [N, hidden] -> [N, K]
    """

    def __init__(self, spec: CNNSpec):
        (c_in, h, w), (c1, c2) = spec.in_shape, spec.channels
        if h < 4 or w < 4:
            raise UserError(f"cnn needs images of at least 4x4 (two 2x pools), got {h}x{w}")
        super().__init__(OrderedDict(
            conv1=nn.Conv2d(c_in, c1, 3, padding=1), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(c1, c2, 3, padding=1), relu2=nn.ReLU(), pool2=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc1=nn.Linear(c2 * (h // 4) * (w // 4), spec.hidden), relu3=nn.ReLU(),
            fc2=nn.Linear(spec.hidden, spec.num_classes),
        ))


def layers(model: SmallCNN) -> list[tuple[str, nn.Module]]:
    return list(model.named_children())
