"""The evaluate stage's figures: each trained model's accuracy and what distillation gained."""

from __future__ import annotations

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
