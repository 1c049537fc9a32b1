"""The model zoo, built from JSON-serialisable specs.

A spec is a plain dict saved as `arch.json` next to the weights, so a model folder can be
rebuilt without pickling any Python object. Specs carry explicit channel counts (not just
a width multiplier) so that a channel-pruned model is described by the same kind of spec.

    teacher: {"kind": "resnet", "in_shape": [C,H,W], "num_classes": K, "stem": 32,
              "stages": [[32], [64, 64]]}            # out-channels per basic block, per stage
    student: {"kind": "cnn", "in_shape": [C,H,W], "num_classes": K,
              "channels": [32, 64], "hidden": 128}   # the brief's conv-relu-pool x2, fc, fc
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Annotated, Any, Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from distillery.config import CNNConfig, ResNetConfig
from distillery.errors import UserError

_Pos = Annotated[int, Field(ge=1)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    in_shape: list[_Pos] = Field(min_length=3, max_length=3)
    num_classes: int = Field(ge=2)


class ResNetSpec(_Spec):
    kind: Literal["resnet"]
    stem: _Pos
    stages: list[list[_Pos]] = Field(min_length=1)


class CNNSpec(_Spec):
    kind: Literal["cnn"]
    channels: list[_Pos] = Field(min_length=2, max_length=2)
    hidden: _Pos


_SPEC = TypeAdapter(Annotated[Union[ResNetSpec, CNNSpec], Field(discriminator="kind")])


def make_spec(cfg: ResNetConfig | CNNConfig, in_shape: list[int], num_classes: int) -> dict[str, Any]:
    """Turn a config (width, multiplier) into an explicit spec for this data."""
    base = {"kind": cfg.kind, "in_shape": list(in_shape), "num_classes": num_classes}
    if isinstance(cfg, ResNetConfig):
        stages = [[cfg.width * 2**i] * n for i, n in enumerate(cfg.blocks)]
        return {**base, "stem": cfg.width, "stages": stages}
    scale = lambda n: max(1, round(n * cfg.width_mult))  # noqa: E731
    return {**base, "channels": [scale(32), scale(64)], "hidden": scale(128)}


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Build an untrained model from its spec; a bad spec is a UserError naming the key."""
    try:
        parsed = _SPEC.validate_python(spec)
    except ValidationError as e:
        where = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise UserError(f"invalid model spec: {where}") from None
    if isinstance(parsed, ResNetSpec):
        return ResNet(parsed)
    return SmallCNN(parsed)


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


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a (projected, if shapes differ) shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

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


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, in_shape: list[int]) -> int:
    """Multiply-accumulates of one forward pass on one image (FLOPs / 2, torch's own counter)."""
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *in_shape, device=next((p.device for p in model.parameters()), None)))
    model.train(was_training)
    return counter.get_total_flops() // 2


def summarize(model: nn.Module, spec: dict[str, Any]) -> dict[str, Any]:
    return {"kind": spec["kind"], "params": count_params(model), "macs": count_macs(model, spec["in_shape"])}
