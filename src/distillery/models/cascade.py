"""A confidence cascade as a model: a small network answers the rows it is sure of, a larger
one the rest (within a batch the larger one runs on the unsure rows alone). Plain PyTorch: a
replica holds both networks in one module. How the threshold is chosen is compression's
(`compression.cascade`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

Confidence = Literal["max_prob", "margin"]
ESCALATE_ALL = 2.0  # above any confidence (both kinds lie in [0, 1])


def confidence(logits: Tensor, kind: Confidence) -> Tensor:
    """[N, K] logits -> [N] confidence: the top softmax probability, or its margin over the second."""
    probs = torch.softmax(logits.float(), dim=1)
    if kind == "max_prob":
        return probs.max(dim=1).values
    top2 = probs.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


class Cascade(nn.Module):
    """`small` answers the rows whose confidence is >= `threshold`, `large` the others."""

    def __init__(self, small: nn.Module, large: nn.Module, threshold: float, kind: Confidence = "max_prob"):
        super().__init__()
        self.small, self.large, self.threshold, self.kind = small, large, float(threshold), kind
        self.rows = self.escalated = 0  # rows answered, and of them sent on to `large` (a replica's metrics)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.small(x)
        unsure = confidence(logits, self.kind) < self.threshold
        unsure_rows = int(unsure.sum())
        self.rows, self.escalated = self.rows + len(x), self.escalated + unsure_rows
        if unsure_rows:
            logits = logits.float().clone()
            logits[unsure] = self.large(x[unsure]).float()
        return logits
