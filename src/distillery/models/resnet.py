"""The teacher: a ResNet-style CNN (stem, stages of basic blocks, global average pool, fc).

    spec: {"kind": "resnet", "in_shape": [C,H,W], "num_classes": K, "stem": 32,
           "stages": [[32], [64, 64]]}   # out-channels per basic block, per stage
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from distillery.config import ResNetConfig
from distillery.models.spec import Positive, Spec


class ResNetSpec(Spec):
    kind: Literal["resnet"]
    stem: Positive
    stages: list[list[Positive]] = Field(min_length=1)


def make_spec(cfg: ResNetConfig, base: dict[str, Any]) -> dict[str, Any]:
    return {**base, "stem": cfg.width, "stages": [[cfg.width * 2**i] * n for i, n in enumerate(cfg.blocks)]}


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a (projected, if shapes differ) shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-style teacher: stem, stages of basic blocks (stride 2 from the second stage), GAP, fc.

    [N, C, H, W] -> stem [N, s, H, W] -> stage i [N, c_i, H/2^i, W/2^i] -> [N, K]
    """

    def __init__(self, spec: ResNetSpec):
        super().__init__()
        c_in = spec.in_shape[0]
        self.stem = nn.Sequential(nn.Conv2d(c_in, spec.stem, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(spec.stem), nn.ReLU())
        blocks, c = [], spec.stem
        for i, stage in enumerate(spec.stages):
            for j, c_out in enumerate(stage):
                blocks.append(BasicBlock(c, c_out, stride=2 if i > 0 and j == 0 else 1))
                c = c_out
        self.stages = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))))


def layers(model: ResNet) -> list[tuple[str, nn.Module]]:
    blocks = [(f"stages.{i}", block) for i, block in enumerate(model.stages)]
    return [("stem", model.stem), *blocks, ("pool", model.pool), ("fc", model.fc)]
