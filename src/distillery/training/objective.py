"""What a model trains against, built in one place for every way of training.

In-process training, Ray Train workers and fine-tuning after pruning all call `objective`:
labels alone (cross-entropy), a live frozen teacher (Hinton's KD loss over targets that pack
the teacher's logits beside the labels), the teacher's cached logits (already packed in the
batches), or a teacher with hints (the student wrapped with its adapters, see `hints`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from distillery import artifacts
from distillery.config import DistillConfig, TrainConfig
from distillery.training.hints import wrap_for_hints
from distillery.training.losses import LossFn, cross_entropy, distillation, pack_target

TargetFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Objective(NamedTuple):
    model: nn.Module  # what the optimizer trains: the student, or the student with hint adapters
    loss_fn: LossFn  # loss_fn(logits, target)
    make_target: TargetFn  # make_target(x, labels) -> target, after augmentation


def labels_only(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return y


def objective(model: nn.Module, train: TrainConfig, distill: DistillConfig, *,
              teacher: nn.Module | None = None,
              cached_logits: bool = False, hints: bool = True, image_shape: list[int] | None = None,
              num_classes: int | None = None) -> Objective:
    """The objective of `model`: distilled from `teacher` (or from cached logits), with the
    configured hints unless `hints` is False (fine-tuning a pruned variant: logits only), and
    the soft term alone when `distill.soft_only`; else cross-entropy with the run's label
    smoothing."""
    alpha = 1.0 if distill.soft_only else distill.alpha  # no label reaches a soft-only student
    if cached_logits:
        return Objective(model, distillation(distill.temperature, alpha), labels_only)
    if teacher is None:
        return Objective(model, cross_entropy(train.label_smoothing), labels_only)
    if distill.hints and hints:
        assert image_shape is not None and num_classes is not None  # passed wherever hints may be on
        wrapped, make_target, loss_fn = wrap_for_hints(model, teacher, distill.hints, image_shape,
                                                       num_classes, distill.temperature, alpha)
        return Objective(wrapped, loss_fn, make_target)
    frozen = no_grad(teacher)
    return Objective(model, distillation(distill.temperature, alpha), lambda x, y: pack_target(y, frozen(x)))


def frozen_teacher(folder: str | Path, device: torch.device) -> nn.Module:
    """The teacher, frozen: eval mode, no gradients, never trained."""
    teacher, _ = artifacts.load(folder)
    return teacher.to(device).eval().requires_grad_(False)


def no_grad(fn: Callable) -> Callable:
    def call(*args):
        with torch.no_grad():
            return fn(*args)
    return call
