"""The search's report: every trial (finished, stopped early or failed, with its reason), the
finished ones measured as served on one frontier with the run's own models, the budget, the
chosen model and the runner-up. Written as trials.json, frontier.md and frontier.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distillery.core.files import atomic_write_bytes, atomic_write_json
from distillery.measure import frontier
from distillery.measure.accuracy import with_interval
from distillery.search.budget import Bound, misses


def write(out: Path, outcomes: list[dict], records: list[dict], reference: list[dict], choice: dict[str, Any],
          limits: list[Bound], summary: dict[str, Any]) -> list[Path]:
    everything = [*reference, *records]
    front = frontier.pareto_front(everything)
    chosen = choice["chosen"]
    paths = [out / "frontier.md", out / "frontier.png", out / "trials.json"]
    atomic_write_bytes(paths[0], markdown(outcomes, records, reference, choice, limits, summary).encode())
    max_ms = min((b.limit for b in limits if b.key == "p50_ms"), default=None)
    atomic_write_bytes(paths[1], frontier.plot_png(everything, front, chosen, None, max_ms=max_ms,
                                                   chosen="chosen"))
    atomic_write_json(paths[2], {"summary": summary, "budget": [b._asdict() for b in limits], "pareto": front,
                                 "chosen": chosen and chosen["name"],
                                 "runner_up": choice["runner_up"] and choice["runner_up"]["name"],
                                 "message": choice["message"], "trials": outcomes,
                                 "measured": records, "reference": reference})
    return paths


def markdown(outcomes: list[dict], records: list[dict], reference: list[dict], choice: dict[str, Any],
             limits: list[Bound], summary: dict[str, Any]) -> str:
    by_trial = {r["trial"]: r for r in records}
    header = ["model", "settings", "status", "epochs run", "val acc", "test acc (95% CI)", "p50 ms", "img/s",
              "size KiB", "within budget"]
    rows = [_row(o, by_trial.get(o["trial"]), limits) for o in outcomes]
    rows += [[r["name"], "(this run's)", "", "", f"{r['val_accuracy']:.2%}",
              with_interval(r["test_accuracy"], r.get("test_images")), f"{r['p50_ms']:.3f}",
              f"{r['throughput']:,.0f}", f"{r['size_bytes'] / 1024:.1f}",
              "no" if misses(r, limits) else "yes"] for r in reference]
    lines = ["# Search: the best model under a budget", "",
             f"Budget: {'; '.join(b.text for b in limits) or 'none'}. Chosen on the "
             "validation split; test accuracy reported, not used to "
             "choose.", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             *("| " + " | ".join(frontier.md_cell(c) for c in row) + " |" for row in rows), "",
             f"{summary['trials']} trials: {summary['completed']} completed, {summary['stopped_early']} "
             f"stopped early by ASHA, {summary['failed']} failed; {summary['epochs_run']:,} of the "
             f"{summary['epochs_full']:,} epochs a search without early stopping would train "
             f"({summary['epochs_saved']:.0%} saved).", ""]
    lines.append(f"**{choice['message']}.**")
    for label, r in (("Chosen", choice["chosen"]), ("Runner-up", choice["runner_up"])):
        if r is not None:
            lines.append(f"- {label}: {r['name']} ({r['recipe']}): validation {r['val_accuracy']:.2%}, "
                         f"test {with_interval(r['test_accuracy'], r.get('test_images'))}, p50 "
                         f"{r['p50_ms']:.3f} ms ({r['best_mode']}), {r['throughput']:,.0f} img/s, "
                         f"{r['size_bytes'] / 1024:.1f} KiB")
    return "\n".join(lines) + "\n"


def _row(outcome: dict, record: dict | None, limits: list[Bound]) -> list[str]:
    status = outcome["status"] + (f": {outcome['error']}" if outcome.get("error") else "")
    val = outcome["metrics"].get("val_accuracy")
    base = [f"trial-{outcome['trial']}", outcome["recipe"], status, str(outcome["epochs_run"]),
            f"{val:.2%}" if val is not None else "-"]
    if record is None:
        return [*base, "-", "-", "-", "-", "-"]
    return [*base, with_interval(record["test_accuracy"], record.get("test_images")),
            f"{record['p50_ms']:.3f}", f"{record['throughput']:,.0f}", f"{record['size_bytes'] / 1024:.1f}",
            "no" if misses(record, limits) else "yes"]
