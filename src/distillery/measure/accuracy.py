"""The evaluate stage's figures: each trained model's accuracy and what distillation gained."""

from __future__ import annotations

import math
from typing import Any

from distillery.core.roles import TRAINED


def distillation_gain(models: dict[str, dict[str, Any]],
                      correct: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Test-accuracy gain of the distilled student over the same student trained alone, and
    the share of the teacher-student gap it closed (None when there is no gap to close). With
    `correct` ({model: per-test-image bool tensor}) also the gain's 95% interval, paired on
    the same images, and on how many images the distilled student was right and the student
    alone wrong (`better`) or the reverse (`worse`). None without the student alone (a run
    with `distill.baseline: false`): nothing to measure a gain against."""
    if "student_scratch" not in models:
        return None
    teacher, alone, distilled = (models[m]["test_accuracy"] for m in TRAINED)
    gap = teacher - alone
    gain = {"gain": distilled - alone, "gap": gap,
            "gap_closed": (distilled - alone) / gap if gap > 0 else None}
    if correct is not None:
        p = paired(correct["student"], correct["student_scratch"])
        gain.update(better=p["better"], worse=p["worse"], test_images=p["images"],
                    gain_interval=p["interval"])
    return gain


def paired(a: Any, b: Any) -> dict[str, Any]:
    """Model `a` against model `b` from their per-image outcomes on the same images (bool
    tensors or arrays): on how many only `a` was right (`better`), only `b` (`worse`), and the
    accuracy difference's 95% paired interval."""
    better, worse, n = int((a & ~b).sum()), int((~a & b).sum()), len(a)
    return {"better": better, "worse": worse, "images": n,
            "interval": paired_interval(better, worse, n) if n else (0.0, 0.0)}


def verdict(low: float, high: float) -> str:
    """What the 95% interval of a difference says: a tie when it holds zero."""
    return "a tie within the noise" if low <= 0 <= high else ("a real gain" if low > 0 else "a real loss")


def paired_interval(better: int, worse: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval of the accuracy difference of two models scored on the same `n` images,
    from the images only one of them got right (the normal approximation for paired
    proportions, as McNemar's test uses)."""
    diff = (better - worse) / n
    half = z * math.sqrt(max(better + worse - (better - worse) ** 2 / n, 0.0)) / n
    return diff - half, diff + half


def within_noise(a: float, b: float, n: int | None, z: float = 1.96) -> bool:
    """True when accuracies `a` and `b`, each on the same `n` test images, differ by less than
    the 95% margin of their difference (unpaired: conservative, as the images are shared)."""
    if not n:
        return a == b
    return abs(a - b) <= z * math.sqrt((a * (1 - a) + b * (1 - b)) / n)


def results_table(results: dict[str, Any]) -> str:
    rows = ["| model | params | MACs | weights (KiB) | val acc | test acc |",
            "|---|---:|---:|---:|---:|---:|"]
    for name, r in results["models"].items():
        rows.append(f"| {name} | {r['params']:,} | {r['macs']:,} | {r['weights_bytes'] / 1024:,.1f} "
                    f"| {r['val_accuracy']:.2%} | {r['test_accuracy']:.2%} |")
    kd = results["distillation"]
    if kd is None:
        return "\n".join(rows) + "\n\nDistillation: no gain measured (distill.baseline: false: no student " \
            "trained alone to compare with).\n"
    closed = f"{kd['gap_closed']:.0%} of the {kd['gap']:.2%} teacher-student gap" \
        if kd["gap_closed"] is not None else "no teacher-student gap to close"
    rows.append(f"\nDistillation: student {kd['gain']:+.2%} test accuracy over training alone "
                f"({closed}){_noise(kd)}; one seed.")
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


def _noise(kd: dict[str, Any]) -> str:
    """'; 95% CI -0.9 to +1.5 points, better on 5 and worse on 4 of 360 test images: a tie'."""
    if "gain_interval" not in kd:
        return ""
    lo, hi = kd["gain_interval"]
    return (f"; 95% CI {100 * lo:+.1f} to {100 * hi:+.1f} points, right where the student alone was wrong on "
            f"{kd['better']} and the reverse on {kd['worse']} of {kd['test_images']} test images: "
            f"{verdict(lo, hi)}")
