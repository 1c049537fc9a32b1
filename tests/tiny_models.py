"""Small seeded models shared by the parallelism tests (in process and across processes)."""

import torch

from distillery.config import CNNConfig, ResNetConfig
from distillery.models.architectures import build_model, make_spec

CONFIGS = {"cnn": CNNConfig(width_mult=0.25), "resnet": ResNetConfig(width=8, blocks=[1, 1])}


def spec_of(kind: str) -> dict:
    return make_spec(CONFIGS[kind], [1, 8, 8], 4)


def model_of(kind: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(spec_of(kind))


def fixed_data(n: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [n,1,8,8], labels [n], packed distillation target [n, 1+4] (label, teacher logits)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)
    packed = torch.cat([y.float()[:, None], torch.randn(n, 4, generator=g)], dim=1)
    return x, y, packed


def assert_same_state(got: dict, want: dict, atol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=1e-4, msg=k)
