"""Losses as pure functions of tensors, shapes in the docstrings.

Every training loss has the signature `loss_fn(logits [N, K], target) -> scalar`, where
`target` is either labels (int64 [N]) or, for distillation, labels and teacher logits packed
into one float tensor [N, 1 + K]. One tensor keeps the same plumbing working for every
parallelism: a pipeline schedule hands its last stage exactly one target per micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def pack_target(labels: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """labels int64 [N], teacher_logits [N, K] -> float32 [N, 1 + K] (exact for labels < 2^24)."""
    return torch.cat([labels.float()[:, None], teacher_logits.float()], dim=1)


def unpack_target(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, 1 + K] -> (labels int64 [N], teacher_logits [N, K])."""
    return target[:, 0].long(), target[:, 1:]


def cross_entropy(label_smoothing: float = 0.0) -> LossFn:
    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    return loss


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float, alpha: float) -> torch.Tensor:
    """Hinton et al. (2015): alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y).

    student_logits, teacher_logits: [N, K]; labels: int64 [N]. The T^2 factor keeps the soft
    term's gradients the same size as the hard term's when T changes.
    """
    t = temperature
    soft = F.kl_div(F.log_softmax(student_logits / t, dim=1),
                    F.log_softmax(teacher_logits.detach() / t, dim=1),
                    reduction="batchmean", log_target=True)
    if alpha == 1.0:  # the soft term alone: labels unused (-1 where the data has none)
        return t * t * soft
    hard = F.cross_entropy(student_logits, labels)
    return alpha * t * t * soft + (1.0 - alpha) * hard


def distillation(temperature: float, alpha: float) -> LossFn:
    """A loss_fn over packed targets (see `pack_target`)."""
    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels, teacher_logits = unpack_target(target)
        return kd_loss(logits, teacher_logits, labels, temperature, alpha)
    return loss
