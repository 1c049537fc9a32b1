"""Small seeded models, their inputs and recipe lists, shared by the compression tests (variant
storage, pruning, recipe checks): in this process, without Ray or training loops."""

import torch

from distillery.compression import prune
from distillery.config import CNNConfig, ResNetConfig, from_dict
from distillery.config.compress import VariantConfig
from distillery.models.architectures import build_model, make_spec

IN_SHAPE = [1, 8, 8]
SPECS = {"cnn": make_spec(CNNConfig(width_mult=0.5), IN_SHAPE, 10),
         "resnet": make_spec(ResNetConfig(width=8, blocks=[1, 1]), IN_SHAPE, 10)}


def seeded_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(SPECS[arch]).eval()
    if arch == "resnet":  # non-trivial batch-norm statistics, so folding them is exercised
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
    return model


def inputs(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *IN_SHAPE, generator=torch.Generator().manual_seed(seed))


def base_shapes(arch: str) -> dict:
    return prune.layer_shapes(build_model(SPECS[arch]))


def variant_configs(*variants: dict) -> list[VariantConfig]:
    return list(from_dict({"compress": {"variants": list(variants)}}).compress.variants)


# What recipes are checked against, untrained: the checks read their layers, never their outputs.
BASES = {"student": build_model(SPECS["cnn"]), "teacher": build_model(SPECS["resnet"])}
