"""The architectures, built from JSON-serialisable specs, in one registry.

A spec is a plain dict saved as `arch.json` next to the weights, so a model folder can be
rebuilt without pickling any Python object. Specs carry explicit channel counts (not just
a width multiplier) so that a channel-pruned model is described by the same kind of spec.

A new architecture is one file here (its spec, its module, how a config becomes a spec, its
layers in forward order for pipeline and FSDP cuts) plus one `Architecture` entry below and
its config class in `config.ModelConfig`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from pydantic import BaseModel, ValidationError
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from distillery.core.errors import UserError
from distillery.models import cnn, resnet, standard


class Architecture(NamedTuple):
    spec: type[BaseModel]  # the spec's schema, with `kind` as its literal tag
    build: Callable[[Any], nn.Module]  # parsed spec -> untrained model
    # (config, {kind, in_shape, num_classes}) -> spec
    make_spec: Callable[[Any, dict[str, Any]], dict[str, Any]]
    layers: Callable[[Any], list[tuple[str, nn.Module]]]  # (name prefix, module) whose composition is forward


ARCHITECTURES: dict[str, Architecture] = {
    "resnet": Architecture(resnet.ResNetSpec, resnet.ResNet, resnet.make_spec, resnet.layers),
    "cnn": Architecture(cnn.CNNSpec, cnn.SmallCNN, cnn.make_spec, cnn.layers),
    "torchvision": Architecture(standard.TorchvisionSpec, standard.build, standard.make_spec,
                                standard.layers),
}


def _architecture(kind: Any) -> Architecture:
    if kind not in ARCHITECTURES:
        raise UserError(f"invalid model spec: kind {kind!r} is not one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[kind]


def make_spec(cfg: Any, in_shape: list[int], num_classes: int) -> dict[str, Any]:
    """Turn a model config (width, multiplier) into an explicit spec for this data."""
    base = {"kind": cfg.kind, "in_shape": list(in_shape), "num_classes": num_classes}
    return _architecture(cfg.kind).make_spec(cfg, base)


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Build an untrained model from its spec; a bad spec is a UserError naming the key."""
    arch = _architecture(spec.get("kind") if isinstance(spec, dict) else None)
    try:
        parsed = arch.spec.model_validate(spec)
    except ValidationError as e:
        where = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise UserError(f"invalid model spec: {where}") from None
    return arch.build(parsed)


def stage_layers(model: nn.Module, spec: dict) -> list[tuple[str, nn.Module]]:
    """The model as ordered `(full-name prefix, module)` pieces whose composition is its forward."""
    if spec.get("kind") not in ARCHITECTURES:
        raise UserError(f"cannot split a model of kind {spec.get('kind')!r} into layers")
    return ARCHITECTURES[spec["kind"]].layers(model)


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


def describe(summary: dict[str, Any]) -> str:
    """'resnet, 380,698 params, 10,055,616 MACs' from `summarize`."""
    return f"{summary['kind']}, {summary['params']:,} params, {summary['macs']:,} MACs"
