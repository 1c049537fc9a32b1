"""The training loop: plain PyTorch, no Ray.

Every way of training runs `run_epochs` (Ray Train workers too); it takes iterables of
`(x, target)` batches so the same loop reads in-memory tensors here and Ray Data shards
there, and a `step` function so a parallelism strategy (DDP, FSDP, pipeline) swaps in its
own optimizer step without touching the loop. Losses are `loss_fn(logits, target)`
(see `losses`), so distillation changes the target, not the loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from distillery.config import TrainConfig
from distillery.core import console
from distillery.core.errors import UserError
from distillery.training.augment_views import apply_views, draw_views, identity_view, random_shift
from distillery.training.losses import LossFn, cross_entropy, pack_target
from distillery.training.objective import TargetFn, labels_only

Batch = tuple[torch.Tensor, torch.Tensor]
StepFn = Callable[[torch.Tensor, torch.Tensor], "float | None"]


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *,
            shuffle: bool = False, generator: torch.Generator | None = None) -> Iterator[Batch]:
    """Yield `(x[i:i+B], y[i:i+B])`; a seeded permutation first when shuffling."""
    order = torch.randperm(len(x), generator=generator) if shuffle else torch.arange(len(x))
    order = order.to(x.device)
    for start in range(0, len(x), batch_size):
        idx = order[start:start + batch_size]
        yield x[idx], y[idx]


def pick_device(use_gpu: bool) -> torch.device:
    """The GPU when asked for (and present), else the CPU."""
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("ray.use_gpu is true but this process sees no CUDA device")
    return torch.device("cuda", torch.cuda.current_device())


def with_autocast(step: StepFn, device: torch.device, bf16: bool) -> StepFn:
    """`step` under bf16 autocast on CUDA when `bf16`; unchanged otherwise (and on CPU)."""
    if not (bf16 and device.type == "cuda"):
        return step

    def autocast_step(x: torch.Tensor, target: torch.Tensor) -> float | None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return step(x, target)
    return autocast_step


def optimizer_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, loss_fn: LossFn,
                   opt: torch.optim.Optimizer) -> float:
    """One plain step: forward, loss, backward, update. Returns the batch's mean loss."""
    loss = loss_fn(model(x), target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=True)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    total = max(1, cfg.epochs * steps_per_epoch)
    shapes = {"onecycle": _one_cycle, "cosine": _cosine, "constant": lambda p: 1.0}
    # A factor of training progress, clamped at 1: a worker whose data shard holds a batch
    # more than the estimate in steps_per_epoch must not crash the schedule (OneCycleLR would).
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: shapes[cfg.schedule](min(step / total, 1.0)))


def _cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _one_cycle(progress: float, warmup: float = 0.3) -> float:
    """OneCycleLR's shape: lr/25 rising to lr over 30% of training, then cosine to ~0."""
    if progress < warmup:
        return 0.04 + 0.96 * progress / warmup
    return 1e-4 + (1.0 - 1e-4) * _cosine((progress - warmup) / (1.0 - warmup))


def train_epoch(model: nn.Module, data: Iterable[Batch], step: StepFn,
                sched: torch.optim.lr_scheduler.LRScheduler) -> dict[str, float]:
    """One pass over `data` with `step(x, target) -> loss or None`; returns the mean loss
    (nan where this rank computes none, e.g. early pipeline stages), samples and samples/s."""
    model.train()
    total, seen, with_loss, start = 0.0, 0, 0, time.perf_counter()
    for x, target in data:
        loss = step(x, target)
        sched.step()
        seen += len(x)
        if loss is not None:
            total += loss * len(x)
            with_loss += len(x)
    seconds = time.perf_counter() - start
    return {"loss": total / with_loss if with_loss else math.nan, "samples": seen,
            "samples_per_s": seen / max(seconds, 1e-9), "seconds": seconds}


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


def progress_line(which: str, epochs: int, m: dict) -> str:
    """One epoch's metrics as the line shown while training (Ray runs add per-worker figures)."""
    val = f"  val_acc {m['val_accuracy']:.2%}" if "val_accuracy" in m else ""
    line = (f"[{which}] epoch {m['epoch']}/{epochs}  loss {m['loss']:.4f}{val}  "
            f"{m['samples_per_s']:,.0f} samples/s")
    if "samples_per_s_per_worker" in m:
        line += f" ({', '.join(f'{v:,.0f}' for v in m['samples_per_s_per_worker'])} per worker)"
    if "epoch_seconds" in m:
        line += f"  {m['epoch_seconds']:.2f} s"
    return line


def epoch_lines(which: str, epochs: int, advance: Callable[..., None]) -> Callable[[dict], None]:
    """An `on_epoch` that writes the epoch's line to the run's log (the console with --verbose)
    and moves the stage's progress on by one epoch."""
    def on_epoch(m: dict) -> None:
        if "resumed_from" in m:
            console.say(f"[{which}] resumed from the checkpoint of epoch {m['resumed_from']}")
        console.detail(progress_line(which, epochs, m))
        advance(1, note=f"val {m['val_accuracy']:.1%}" if "val_accuracy" in m else "")
    return on_epoch


def fit(model: nn.Module, train: Batch, val: Batch | None, cfg: TrainConfig, *, seed: int,
        flip: bool = False, loss_fn: LossFn | None = None, make_target: TargetFn = labels_only,
        device: torch.device = torch.device("cpu"),
        on_epoch: Callable[[dict], None] = lambda m: None,
        on_epoch_start: Callable[[int], None] = lambda epoch: None,
        after_step: Callable[[], None] | None = None, view_logits: torch.Tensor | None = None) -> list[dict]:
    """Train in one process on tensors `train` = (x, y) on `device`; `make_target(x, y)` builds
    each batch's target after augmentation (distillation packs the teacher's logits in), or,
    given the teacher's logits of every view [V, N, K] (`view_logits`), each image's target packs the
    logits of the very view it is shown (`loss_fn` then a distillation loss); call
    `on_epoch` with each epoch's metrics; return them all. `on_epoch_start(epoch)` and
    `after_step()` (after every optimizer step) let pruning keep its zeros."""
    gen = seed_everything(seed)
    model.to(device)
    train = (train[0].to(device), train[1].to(device))  # small in-memory splits: move them once
    val = (val[0].to(device), val[1].to(device)) if val is not None else None
    view_logits = view_logits.to(device) if view_logits is not None else None
    loss_fn = loss_fn or cross_entropy(cfg.label_smoothing)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, math.ceil(len(train[0]) / cfg.batch_size))
    step = with_autocast(lambda x, target: optimizer_step(model, x, target, loss_fn, opt), device, cfg.bf16)
    if after_step is not None:
        opt.register_step_post_hook(lambda *_: after_step())

    def epoch_batches(epoch: int) -> Iterator[Batch]:
        if view_logits is not None:
            x, y = shown_views(train, view_logits, cfg.augment, gen, flip)
        else:
            x, y = (random_shift(train[0], gen, flip=flip) if cfg.augment else train[0]), train[1]
        return ((xb, make_target(xb, yb))
                for xb, yb in batches(x, y, cfg.batch_size, shuffle=True, generator=gen))

    def score(epoch: int, stats: dict[str, float]) -> dict:
        metrics = {"epoch": epoch, **stats}
        if val is not None and len(val[0]):
            metrics.update({f"val_{k}": v for k, v in evaluate(model, batches(*val, 1024)).items()
                            if k != "samples"})
        return metrics
    return run_epochs(model, step, sched, range(1, cfg.epochs + 1), epoch_batches, score,
                      on_epoch_start=on_epoch_start, on_epoch=on_epoch)


def shown_views(train: Batch, view_logits: torch.Tensor, augment: bool, generator: torch.Generator,
                flip: bool) -> Batch:
    """One epoch's images (a random view each when augmenting, else as stored) and their
    targets: the label and the teacher's logits for that view, packed."""
    n = len(train[0])
    views = draw_views(n, generator, flip=flip) if augment else torch.full((n,), identity_view())
    logits = view_logits[views.to(view_logits.device), torch.arange(n, device=view_logits.device)]
    return apply_views(train[0], views), pack_target(train[1], logits)


def run_epochs(model: nn.Module, step: StepFn, sched: torch.optim.lr_scheduler.LRScheduler, epochs: range,
               epoch_batches: Callable[[int], Iterable[Batch]],
               score: Callable[[int, dict[str, float]], dict], *,
               history: list[dict] | None = None, on_epoch_start: Callable[[int], None] = lambda epoch: None,
               on_epoch: Callable[[dict], None] = lambda m: None) -> list[dict]:
    """The epoch loop of every way of training (in process here, on Ray Train workers, fine-
    tuning after pruning): per epoch, `train_epoch` over `epoch_batches(epoch)`, then
    `score(epoch, stats)` -> the epoch's metrics (validation, gathering over workers), appended
    to `history` (a resumed run passes the epochs it already has) and handed to `on_epoch`."""
    history = [] if history is None else history
    for epoch in epochs:
        on_epoch_start(epoch)
        metrics = score(epoch, train_epoch(model, epoch_batches(epoch), step, sched))
        history.append(metrics)
        on_epoch(metrics)
    return history
