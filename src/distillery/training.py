"""The training loop: plain PyTorch, no Ray.

Later stages run exactly these functions inside Ray Train workers; they take iterables of
`(x, y)` batches so the same loop reads in-memory tensors here and Ray Data shards there.
`compute_loss(model, x, y) -> scalar` is the hook through which distillation swaps in
its loss without touching the loop.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from distillery.config import TrainConfig

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *,
            shuffle: bool = False, generator: torch.Generator | None = None) -> Iterator[Batch]:
    """Yield `(x[i:i+B], y[i:i+B])`; a seeded permutation first when shuffling."""
    order = torch.randperm(len(x), generator=generator) if shuffle else torch.arange(len(x))
    for start in range(0, len(x), batch_size):
        idx = order[start:start + batch_size]
        yield x[idx], y[idx]


def random_shift(x: torch.Tensor, generator: torch.Generator | None = None, pad: int = 1,
                 flip: bool = False) -> torch.Tensor:
    """Shift each image by up to `pad` pixels (zero fill), optionally flip left-right.

    x: [N, C, H, W] -> [N, C, H, W]. One gather for the whole batch, no Python loop.
    """
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # [N, 1, H, 1]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # [N, 1, 1, W]
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    if flip:
        mirror = torch.rand(n, generator=generator) < 0.5
        out[mirror] = out[mirror].flip(-1)
    return out


def cross_entropy(label_smoothing: float = 0.0) -> LossFn:
    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
    return loss


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def train_epoch(model: nn.Module, data: Iterable[Batch], opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.LRScheduler, compute_loss: LossFn) -> dict[str, float]:
    """One pass over `data`; returns mean loss, samples seen and samples/s."""
    model.train()
    total, seen, start = 0.0, 0, time.perf_counter()
    for x, y in data:
        loss = compute_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item() * len(y)
        seen += len(y)
    seconds = time.perf_counter() - start
    return {"loss": total / max(seen, 1), "samples": seen, "samples_per_s": seen / max(seconds, 1e-9)}


@torch.no_grad()
def evaluate(model: nn.Module, data: Iterable[Batch]) -> dict[str, float]:
    """Accuracy and mean cross-entropy over `data`."""
    model.eval()
    correct, loss, n = 0, 0.0, 0
    for x, y in data:
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        n += len(y)
    if n == 0:
        return {"accuracy": math.nan, "loss": math.nan, "samples": 0}
    return {"accuracy": correct / n, "loss": loss / n, "samples": n}


def fit(model: nn.Module, train: Batch, val: Batch | None, cfg: TrainConfig, *, seed: int,
        flip: bool = False, compute_loss: LossFn | None = None,
        on_epoch: Callable[[dict], None] = lambda m: None) -> list[dict]:
    """Train in-process on tensors; call `on_epoch` with each epoch's metrics; return them all."""
    gen = seed_everything(seed)
    compute_loss = compute_loss or cross_entropy(cfg.label_smoothing)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, math.ceil(len(train[0]) / cfg.batch_size))
    history = []
    for epoch in range(1, cfg.epochs + 1):
        x = random_shift(train[0], gen, flip=flip) if cfg.augment else train[0]
        metrics = {"epoch": epoch, **train_epoch(model, batches(x, train[1], cfg.batch_size, shuffle=True, generator=gen),
                                                 opt, sched, compute_loss)}
        if val is not None and len(val[0]):
            metrics.update({f"val_{k}": v for k, v in evaluate(model, batches(*val, 1024)).items() if k != "samples"})
        on_epoch(metrics)
        history.append(metrics)
    return history
