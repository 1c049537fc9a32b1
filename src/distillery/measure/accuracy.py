"""The evaluate stage's figures: each trained model's accuracy and what distillation gained."""

from __future__ import annotations

import math
from typing import Any

from distillery.roles import TRAINED


def distillation_gain(models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Test-accuracy gain of the distilled student over the same student trained alone, and
    the share of the teacher-student gap it closed (None when there is no gap to close)."""
    teacher, alone, distilled = (models[m]["test_accuracy"] for m in TRAINED)
    gap = teacher - alone
    return {"gain": distilled - alone, "gap": gap, "gap_closed": (distilled - alone) / gap if gap > 0 else None}


def results_table(results: dict[str, Any]) -> str:
    rows = ["| model | params | MACs | weights (KiB) | val acc | test acc |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in results["models"].items():
        rows.append(f"| {name} | {r['params']:,} | {r['macs']:,} | {r['weights_bytes'] / 1024:,.1f} "
                    f"| {r['val_accuracy']:.2%} | {r['test_accuracy']:.2%} |")
    kd = results["distillation"]
    closed = f"{kd['gap_closed']:.0%} of the {kd['gap']:.2%} teacher-student gap" if kd["gap_closed"] is not None \
        else "no teacher-student gap to close"
    rows.append(f"\nDistillation: student {kd['gain']:+.2%} test accuracy over training alone ({closed}); one seed.")
    return "\n".join(rows) + "\n"


def interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of an accuracy measured on `n` images (sound near 100%,
    where the normal approximation runs past it)."""
    if n <= 0:
        return 0.0, 1.0
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def with_interval(accuracy: float, n: int | None) -> str:
    """"98.61% (96.8-99.4)": the accuracy and its 95% interval, when `n` is known."""
    if not n:
        return f"{accuracy:.2%}"
    lo, hi = interval(accuracy, n)
    return f"{accuracy:.2%} ({100 * lo:.1f}-{100 * hi:.1f})"
