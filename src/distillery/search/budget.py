"""The budget a searched model must meet, and the choice among the trials that meet it.

Plain Python over measured records (as `measure.frontier` reads them). The choice reads the
validation split only: the test split is for reporting the chosen model and the runner-up.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from distillery.config.search import BudgetConfig
from distillery.measure.frontier import choice_view, same_computation


class Bound(NamedTuple):
    key: str  # the record's figure
    upper: bool  # True: at most `limit`; False: at least
    limit: float
    text: str  # "p50 at batch 1 <= 0.120 ms (as fast as student)"
    # A latency bound set by a model of the run: a model of the same computation (MACs,
    # parameters, numerics) meets it whatever the timer said, as `frontier.recommend` treats it.
    same_as: dict[str, Any] | None = None


def bounds(budget: BudgetConfig, reference: dict[str, Any] | None = None, margin: float = 0.0) -> list[Bound]:
    """The budget's bounds; `reference` is the record of `budget.as_fast_as` (timed beside the
    trials), whose p50 the trials may exceed by `margin` (the timer's noise on this machine)."""
    out = []
    if budget.max_p50_ms is not None:
        out.append(Bound("p50_ms", True, budget.max_p50_ms, f"p50 at batch 1 <= {budget.max_p50_ms:.3f} ms"))
    if budget.as_fast_as is not None and reference is not None:
        limit = reference["p50_ms"] * (1 + margin)
        same: dict[str, Any] = {k: reference[k] for k in ("macs", "params", "numerics") if k in reference}
        out.append(Bound("p50_ms", True, limit, f"p50 at batch 1 <= {limit:.3f} ms (as fast as "
                         f"{budget.as_fast_as}, {reference['p50_ms']:.3f} ms, within {margin:.0%}, or "
                         "the same network)", same))
        # A sub-millisecond p50 moves by more than the margin between timings: without this, a
        # student with twice the MACs passed once because the reference was timed slow.
        out.append(Bound("macs", True, reference["macs"],
                         f"MACs <= {reference['macs']:,} ({budget.as_fast_as}'s)"))
    if budget.min_throughput is not None:
        out.append(Bound("throughput", False, budget.min_throughput,
                         f"throughput >= {budget.min_throughput:,.0f} img/s"))
    if budget.max_size_kib is not None:
        out.append(Bound("size_bytes", True, budget.max_size_kib * 1024,
                         f"size <= {budget.max_size_kib:g} KiB"))
    if budget.min_accuracy is not None:
        out.append(Bound("val_accuracy", False, budget.min_accuracy,
                         f"validation accuracy >= {budget.min_accuracy:.2%}"))
    return out


_SHOWN = {"p50_ms": lambda v: f"p50 {v:.3f} ms", "macs": lambda v: f"{v:,.0f} MACs",
          "throughput": lambda v: f"{v:,.0f} img/s", "size_bytes": lambda v: f"{v / 1024:,.1f} KiB",
          "val_accuracy": lambda v: f"validation {v:.2%}"}


def misses(record: dict[str, Any], limits: list[Bound]) -> list[Bound]:
    def missed(b: Bound) -> bool:
        if b.same_as and same_computation(record, b.same_as):
            return False
        return record[b.key] > b.limit if b.upper else record[b.key] < b.limit
    return [b for b in limits if missed(b)]


def shortfall(record: dict[str, Any], limits: list[Bound]) -> float:
    """How far a record is from meeting the budget: the sum of its relative misses."""
    return sum(abs(record[b.key] - b.limit) / max(abs(b.limit), 1e-12) for b in misses(record, limits))


def rank_key(budget: BudgetConfig):
    """Best first: the most accurate on validation (ties: the lower validation loss, then the
    faster), or the highest throughput."""
    if budget.maximise == "throughput":
        return lambda r: (-r["throughput"], -r["val_accuracy"])
    return lambda r: (-r["val_accuracy"], r.get("val_loss", 0.0), r["p50_ms"], r["size_bytes"])


def choose(records: list[dict[str, Any]], budget: BudgetConfig, limits: list[Bound]) -> dict[str, Any]:
    """{"chosen", "runner_up": record or None, "within": names meeting the budget, "message"}.
    With none within, the message names the closest record and what it misses. Chosen on the
    records' `choice_view` (no test figure); the records returned are whole, for the report."""
    whole, records = {r["name"]: r for r in records}, choice_view(records)
    within = sorted((r for r in records if r.get("servable", True) and not misses(r, limits)),
                    key=rank_key(budget))
    budget_text = "; ".join(b.text for b in limits) or "no bound"
    if not within:
        if not records:
            return {"chosen": None, "runner_up": None, "within": [],
                    "message": "no trial finished: nothing to choose from"}
        closest = min(records, key=lambda r: shortfall(r, limits))
        missed = ", ".join(f"{_SHOWN[b.key](closest[b.key])} against {_SHOWN[b.key](b.limit)}"
                           for b in misses(closest, limits))
        return {"chosen": None, "runner_up": None, "within": [], "message":
                f"no model meets the budget ({budget_text}); the closest is {closest['name']} ({missed})"}
    within = [whole[r["name"]] for r in within]
    best = within[0]
    goal = ("highest throughput" if budget.maximise == "throughput"
            else "most accurate on the validation split")
    return {"chosen": best, "runner_up": within[1] if len(within) > 1 else None,
            "within": [r["name"] for r in within],
            "message": f"{best['name']} is the {goal} of {len(within)} model(s) within the "
            f"budget ({budget_text})"}
