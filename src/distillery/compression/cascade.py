"""A confidence cascade: a small model answers first, a larger one answers what it is unsure of.

The small model's confidence in each row (its top softmax probability, or the margin of the
top one over the second) is compared with a threshold; rows below it go on to the larger
model, and only those: within a batch the larger model runs on the unsure rows alone. The
threshold is chosen on the validation split (`choose_threshold`): the fewest escalations whose
accuracy reaches a target. Plain PyTorch, no Ray: a replica holds both networks in one module.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# The cascade's API, handed on (F401)
from distillery.models.cascade import ESCALATE_ALL, Cascade, Confidence, confidence  # noqa: F401


def choose_threshold(conf: Tensor, small_correct: Tensor, large_correct: Tensor, target: float) -> dict:
    """The threshold with the lowest escalation rate whose accuracy (small where confident, else
    large) reaches `target`, from per-row confidences and correctness on a held-out split.
    Returns {"threshold", "accuracy", "escalation", "reached"}; when no threshold reaches the
    target, the most accurate one (fewest escalations among equals) with "reached": False.

    Escalating the k least confident rows is possible only where the k-th and (k+1)-th
    confidences differ (a threshold cannot split ties); the threshold is the midpoint there.
    """
    n = len(conf)
    if n == 0:
        raise ValueError("choose_threshold needs at least one row")
    order = torch.argsort(conf, stable=True)
    c, small, large = conf[order].double(), small_correct[order].double(), large_correct[order].double()
    zero = torch.zeros(1, dtype=torch.float64)
    # accuracy[k]: the k least confident rows escalated, k = 0..n
    escalated_right = torch.cat([zero, large.cumsum(0)])
    kept_right = small.sum() - torch.cat([zero, small.cumsum(0)])
    accuracy = (escalated_right + kept_right) / n
    valid = [0] + [k for k in range(1, n) if c[k - 1] < c[k]] + [n]
    reached = [k for k in valid if accuracy[k] >= target - 1e-12]
    k = reached[0] if reached else max(valid, key=lambda k: (float(accuracy[k]), -k))
    threshold = 0.0 if k == 0 else ESCALATE_ALL if k == n else float((c[k - 1] + c[k]) / 2)
    return {"threshold": threshold, "accuracy": float(accuracy[k]), "escalation": k / n,
            "reached": bool(reached)}


@torch.inference_mode()
def outcomes(small: nn.Module, large: nn.Module, x: Tensor, y: Tensor, kind: Confidence,
             batch: int = 1024) -> tuple[Tensor, Tensor, Tensor]:
    """(small's confidence, small correct, large correct) per row of (x, y)."""
    conf, small_ok, large_ok = [], [], []
    for i in range(0, len(x), batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        s = small(xb)
        conf.append(confidence(s, kind))
        small_ok.append(s.argmax(1) == yb)
        large_ok.append(large(xb).argmax(1) == yb)
    return torch.cat(conf), torch.cat(small_ok), torch.cat(large_ok)
