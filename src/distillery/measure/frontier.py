"""The speed-vs-accuracy frontier of a run's variants, the one to deploy, and the report files.

Every variant (teacher, students, compressed children) is one plain record of measured figures.
The deployable choices are the Pareto front (no other variant is both at least as fast and at
least as accurate), and the recommendation for an accuracy floor is the fastest variant at
batch 1 that meets it, skipping variants that measured no faster than the model they came from.
Both are chosen on the validation split: a choice function sees a record only through
`choice_view`, which has no test field, so the test split reports and never steers (a choice
made on test figures picks the luckiest of models that tie, and reports its luck as accuracy).
The report is written four ways: JSON for programs, CSV for spreadsheets, Markdown for people,
and a PNG plot; each file atomically, so a reader never sees half a report.

Plain Python and matplotlib (Agg, no display): no Ray, no torch.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from distillery.core.files import atomic_write_bytes, atomic_write_json
from distillery.core.roles import ROLES
from distillery.measure.accuracy import interval, verdict, with_interval, within_noise

# What a choice reads, and what the report adds: the test accuracy.
CHOICE_KEYS = ("name", "parent", "recipe", "val_accuracy", "params", "macs", "size_bytes", "best_mode",
               "p50_ms", "p99_ms", "throughput", "peak_fraction", "not_faster", "role")
REQUIRED = (*CHOICE_KEYS[:4], "test_accuracy", *CHOICE_KEYS[4:])
CSV_COLUMNS = (*REQUIRED, "on_front")
# How each role is drawn: marker, legend label. Variants are the many small points.
_ROLE_STYLE = {"teacher": ("s", "teacher"), "student": ("D", "student (distilled)"),
               "student_scratch": ("^", "student (from scratch)"), "variant": ("o", "compressed variant")}


def choice_view(records: Sequence[dict]) -> list[dict]:
    """The records as a choice sees them: copies without any test figure (`test_*`), so a
    choice that reads one fails instead of steering by the split that reports."""
    return [{k: v for k, v in r.items() if not k.startswith("test_")} for r in records]


def validate(records: Sequence[dict], keys: Sequence[str] = REQUIRED) -> None:
    """Raise ValueError naming the record and the problem: a missing key, an unknown role, a repeated name."""
    _require(records, keys)
    seen: set[str] = set()
    for r in records:
        if r["role"] not in ROLES:
            raise ValueError(f"variant record {r['name']!r}: role {r['role']!r} is not one of {ROLES}")
        if r["name"] in seen:
            raise ValueError(f"variant record {r['name']!r}: name used twice; names identify variants")
        seen.add(r["name"])


def _require(records: Sequence[dict], keys: Sequence[str]) -> None:
    for i, record in enumerate(records):
        missing = [key for key in keys if key not in record]
        if missing:
            label = repr(record.get("name", f"#{i}"))
            raise ValueError(f"variant record {label}: missing key {missing[0]!r} (needs {', '.join(keys)})")


def pareto_front(records: Sequence[dict], *, x: str = "p50_ms", y: str = "val_accuracy") -> list[str]:
    """Names of the records that no other record dominates (lower-or-equal `x` AND higher-or-equal
    `y`, one of them strictly), sorted by `x`. Equal points do not dominate each other. On a
    latency axis, two records of the same computation (`same_computation`) are equally fast
    whatever the timer said, so the more accurate one dominates."""
    _require(records, ("name", x, y))
    def dominates(a: dict, b: dict) -> bool:
        if x.endswith("_ms") and same_computation(a, b):
            return a[y] > b[y]
        return a[x] <= b[x] and a[y] >= b[y] and (a[x] < b[x] or a[y] > b[y])

    records = [r for r in records if r.get("servable", True)]  # only what a replica can run is on offer
    front = [r for r in records if not any(dominates(other, r) for other in records)]
    return [r["name"] for r in sorted(front, key=lambda r: (r[x], -r[y], r["name"]))]


def same_computation(a: dict, b: dict) -> bool:
    """The same MACs, parameters and arithmetic (`numerics`, which compress records): the same
    work for the CPU, unstructured zeros included (dense kernels multiply them too)."""
    return all(k in a and k in b for k in ("macs", "params", "numerics")) and \
        all(a[k] == b[k] for k in ("macs", "params", "numerics"))


def recommend(records: Sequence[dict], floor: float, margin: float = 0.0) -> dict | None:
    """The record to deploy for accuracy floor `floor`, chosen on validation: among records with
    val_accuracy >= floor that are not `not_faster`, the lowest p50 latency at batch 1 (ties:
    higher throughput, then smaller size). Records within `margin` (a fraction) of that p50
    count as equally fast, and so do records of the same computation as the fastest (same MACs,
    parameters and `numerics`: unstructured zeros do not speed up dense kernels either),
    whatever the timer said; the most accurate of them on validation wins. Timing noise must
    not pick the less accurate of two equal networks: fresh runs timed the student trained
    alone 6.5%, and its 50%-sparse copy 12%, faster than the identical distilled student.
    Returns {"name", "floor", "val_accuracy", "val_images", "chosen_on", "reason"} or None
    when nothing meets the floor."""
    records = choice_view(records)
    validate(records, CHOICE_KEYS)
    candidates = [r for r in records
                  if r["val_accuracy"] >= floor and not r["not_faster"] and r.get("servable", True)]
    if not candidates:
        return None
    fastest = min(candidates, key=lambda r: r["p50_ms"])
    tied = [r for r in candidates if r["p50_ms"] <= fastest["p50_ms"] * (1 + margin) or
            (margin and same_computation(r, fastest))]
    best = min(tied, key=lambda r: (-r["val_accuracy"] if margin else 0, r["p50_ms"], -r["throughput"],
                                    r["size_bytes"]))
    lead = "the fastest" if len(tied) == 1 else \
        f"the most accurate of the {len(tied)} equally fast (within {margin:.0%}, or the same network)"
    reason = (f"{best['name']} is {lead} of {len(candidates)} variant(s) with validation accuracy >= "
              f"{floor:.2%}: p50 {best['p50_ms']:.3f} ms (p99 {best['p99_ms']:.3f} ms) at batch 1, "
              f"{best['throughput']:,.0f} img/s, validation accuracy {best['val_accuracy']:.2%}, "
              f"{best['size_bytes'] / 1024:.1f} KiB, run {best['best_mode']}.{_ties(best, candidates)} "
              "Chosen on validation.")
    return {"name": best["name"], "floor": floor, "val_accuracy": best["val_accuracy"],
            "val_images": best.get("val_images"), "chosen_on": "validation", "reason": reason}


def _ties(best: dict, candidates: Sequence[dict]) -> str:
    """' Its validation accuracy ties with ...': the candidates whose validation accuracy is not
    distinguishable from the recommended one's, so that accuracy alone does not rank them."""
    n = best.get("val_images")
    ties = [r["name"] for r in candidates
            if r is not best and within_noise(r["val_accuracy"], best["val_accuracy"], n)]
    if not ties or not n:
        return ""
    return (f" Its validation accuracy ties with that of {', '.join(ties)}: within the 95% noise of {n} "
            f"validation images (one image is {100 / n:.2f} points).")


def write_frontier(out_dir: Path, records: list[dict], *, floor: float, machine: dict,
                   settings: dict, margin: float = 0.0, refused: Sequence[dict] = ()) -> list[Path]:
    """Write frontier.json, frontier.csv, frontier.md and frontier.png into `out_dir`; return their paths.

    `machine` is bench.machine_info(), `settings` the bench settings as a dict (both are the
    evidence a reader needs to trust the figures); `refused`: the variants whose steps do not
    apply to their model ({name, recipe, reason}), listed with the reason.
    """
    validate(records)
    if not records:
        raise ValueError("no variant records to report")
    out_dir = Path(out_dir)
    front, rec = pareto_front(records), recommend(records, floor, margin)
    paths = [out_dir / f"frontier.{ext}" for ext in ("json", "csv", "md", "png")]
    atomic_write_json(paths[0], {"machine": machine, "settings": settings, "chosen_on": "validation",
                                 "floor": floor, "recommended": rec, "pareto": front, "variants": records,
                                 "refused": list(refused)})
    atomic_write_bytes(paths[1], _csv(records, front).encode())
    atomic_write_bytes(paths[2], _markdown(records, front, rec, floor, machine, settings, refused).encode())
    atomic_write_bytes(paths[3], plot_png(records, front, rec, floor))
    return paths


def _csv(records: Sequence[dict], front: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in records:
        writer.writerow([*(r[key] for key in REQUIRED), r["name"] in front])
    return buf.getvalue()


_MD_HEADER = ("name", "recipe", "val acc", "test acc (95% CI)", "params", "MACs", "size KiB", "served mode",
              "p50 ms", "p99 ms", "img/s", "% of peak", "on front", "note")
_COMPILED = "compiled p50 ms (not served)"  # a column only when `compress.bench.modes` asked for compile


def _md_row(r: dict, on_front: bool) -> list[str]:
    slower = (f"not faster than {r['compared_with']}" if r.get("compared_with")
              else "not faster than its parent")
    note = "; ".join(n for n, on in ((slower, r["not_faster"]),
                                     ("no servable mode ran", not r.get("servable", True)),
                                     (paired_note(r.get("test_paired")), bool(r.get("test_paired")))) if on)
    return [r["name"], r["recipe"], f"{r['val_accuracy']:.2%}",
            with_interval(r["test_accuracy"], r.get("test_images")), f"{r['params']:,}", f"{r['macs']:,}",
            f"{r['size_bytes'] / 1024:.1f}", r["best_mode"], f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}",
            f"{r['throughput']:,.0f}", f"{r['peak_fraction']:.1%}", "yes" if on_front else "", note]


def _compiled_cell(r: dict) -> str:
    compiled = r.get("modes", {}).get("compile", {}).get("p50_ms")
    return f"{compiled:.3f}" if compiled else "-"


def md_cell(value: str) -> str:
    """A Markdown table cell: a pipe (in a recipe or an error) would split the row."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _markdown(records: Sequence[dict], front: list[str], rec: dict | None, floor: float, machine: dict,
              settings: dict, refused: Sequence[dict] = ()) -> str:
    compiled = "compile" in settings.get("modes", [])
    header = [*_MD_HEADER[:-2], *([_COMPILED] if compiled else []), *_MD_HEADER[-2:]]
    lines = ["# Speed vs accuracy", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        row = _md_row(r, r["name"] in front)
        row[-2:-2] = [_compiled_cell(r)] if compiled else []
        lines.append("| " + " | ".join(md_cell(c) for c in row) + " |")
    verdict = f"**Recommended** ({rec['name']}): {rec['reason']}" if rec else \
        f"**No variant** reaches the validation accuracy floor of {floor:.2%}."
    not_built = [f"- {md_cell(r['name'])} ({md_cell(r['recipe'])}): {md_cell(r['reason'])}" for r in refused]
    return "\n".join([*lines, "", _splits_line(records), *_cascade_lines(records),
                      *(["", "Refused (not built):", "", *not_built] if not_built else []),
                      "", verdict, "", _evidence_line(machine, settings), ""])


def _splits_line(records: Sequence[dict]) -> str:
    """What the two accuracy columns are, and what one image is worth on each, said once."""
    counts = {split: next((r[f"{split}_images"] for r in records if r.get(f"{split}_images")), None)
              for split in ("val", "test")}
    worth = ", ".join(f"{n} {split} images (one is {100 / n:.2f} points)" for split, n in counts.items() if n)
    return ("Every choice here (the Pareto front, the floor, the recommendation, cascade thresholds) was "
            f"made on the validation split; the test split only reports{f': {worth}' if worth else ''}. "
            "Differences inside a 95% interval are ties.")


def paired_note(paired: dict | None) -> str:
    """'vs student on the same 360 test images: -0.3 points (95% CI -1.2 to +0.7; ...), a tie within
    the noise'."""
    if not paired:
        return ""
    if not paired["better"] and not paired["worse"]:
        return f"the same answers as {paired['with']} on all {paired['images']} test images"
    lo, hi = paired["interval"]
    diff = (paired["better"] - paired["worse"]) / paired["images"]
    return (f"vs {paired['with']} on the same {paired['images']} test images: {100 * diff:+.1f} points "
            f"(95% CI {100 * lo:+.1f} to {100 * hi:+.1f}; right where it was wrong on {paired['better']}, "
            f"the reverse on {paired['worse']}), {verdict(lo, hi)}")


def _cascade_lines(records: Sequence[dict]) -> list[str]:
    """What each cascade escalated, and the accuracy it was asked to reach."""
    by_name, lines = {r["name"]: r for r in records}, []
    for r in records:
        step = next((s for s in r.get("steps", []) if s.get("kind") == "cascade"), None)
        if step is None:
            continue
        large = by_name.get(step["to"], {})
        lines.append(f"- {r['name']}: {r['parent']} answers when its {step['confidence']} is >= "
                     f"{step['threshold']:.4f}, else {step['to']}; chosen on the validation split to reach "
                     f"{step['target_accuracy']:.2%} ({step['val_accuracy']:.2%} with "
                     f"{step['val_escalation']:.1%} "
                     f"escalated{'' if step['val_reached'] else ', target not reached'}); on the test images "
                     f"it escalated {r['test_escalation']:.1%}: {r['test_accuracy']:.2%} against "
                     f"{large.get('test_accuracy', float('nan')):.2%} for {step['to']} alone; batch-1 mean "
                     f"{r.get('mean_ms', float('nan')):.3f} ms against "
                     f"{large.get('mean_ms', float('nan')):.3f} ms (MACs in the table: the average per "
                     "validation image).")
    return ["", "Cascades:", "", *lines] if lines else []


def _evidence_line(machine: dict, settings: dict) -> str:
    m, s = machine, settings
    compiled = ("; compiled graphs are timed for comparison, not served"
                if "compile" in s.get("modes", []) else "")
    return (f"Measured on {m.get('cpu', 'an unknown CPU')} ({m.get('logical_cores', '?')} logical cores, "
            f"torch {m.get('torch', '?')}) with {s.get('threads', '?')} thread(s): p50/p99 over "
            f"{s.get('latency_runs', '?')} batch-1 runs after {s.get('warmup', '?')} warm-up runs, "
            f"throughput at batch {s.get('throughput_batch', '?')} (median of "
            f"{s.get('throughput_runs', '?')} runs); each variant in its fastest mode that a Serve replica "
            f"runs (eager or channels_last{compiled}).")


def plot_png(records: Sequence[dict], front: list[str], rec: dict | None, floor: float | None, *,
             max_ms: float | None = None, chosen: str = "recommended") -> bytes:
    """The frontier plot: every record, the Pareto front, the accuracy floor and, for a
    search, its latency budget; `rec` ({"name"}) circled as `chosen`."""
    fig = Figure(figsize=(9, 6), layout="constrained")
    FigureCanvasAgg(fig)  # render with Agg explicitly: no display, no global pyplot state
    ax = fig.subplots()
    _plot_points(ax, records)
    _plot_front(ax, records, front)
    if floor is not None:
        ax.axhline(floor * 100, color="grey", linestyle=":", linewidth=1,
                   label=f"validation accuracy floor {floor:.1%}")
    if max_ms is not None:
        ax.axvline(max_ms, color="red", linestyle="--", linewidth=1, label=f"latency budget {max_ms:.3g} ms")
    if rec:
        r = next(r for r in records if r["name"] == rec["name"])
        ax.scatter([r["p50_ms"]], [r["test_accuracy"] * 100], s=500, facecolors="none", edgecolors="red",
                   linewidths=2, label=f"{chosen}: {r['name']}", zorder=4)
    _log_latency_axis(ax, [r["p50_ms"] for r in records])
    fig.draw_without_rendering()  # the layout and axes final: labels are placed in display points
    _label(ax, records)
    ax.set_xlabel("p50 latency at batch 1 (ms, log scale)")
    ax.set_ylabel("test accuracy (%), 95% interval")
    ax.set_title("Speed vs accuracy (marker area ~ model size; chosen on validation, reported on test)")
    ax.grid(True, which="both", alpha=0.3)
    legend = ax.legend(loc="lower right", fontsize="small")
    for handle in legend.legend_handles:  # one marker size in the legend: there size means nothing
        if isinstance(handle, PathCollection):
            handle.set_sizes([40])
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _log_latency_axis(ax, latencies: list[float]) -> None:
    ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # "0.3", not "3x10^-1"
    ax.xaxis.set_major_formatter(plain)
    # Within about a decade there are one or two major ticks: label the minor ones too.
    ax.xaxis.set_minor_formatter(plain if max(latencies) < 20 * min(latencies) else NullFormatter())


def _plot_points(ax, records: Sequence[dict]) -> None:
    biggest = max(r["size_bytes"] for r in records) or 1
    for role, (marker, label) in _ROLE_STYLE.items():
        group = [r for r in records if r["role"] == role]
        if not group:
            continue
        # Area proportional to size; a floor keeps the smallest models visible.
        sizes = [max(12.0, 400.0 * r["size_bytes"] / biggest) for r in group]
        points = ax.scatter([r["p50_ms"] for r in group], [r["test_accuracy"] * 100 for r in group], s=sizes,
                            marker=marker, alpha=0.7, label=label, zorder=3)
        # Each accuracy's 95% interval: points whose bars overlap are not ranked by the data.
        low, high = zip(*(_bar(r) for r in group))
        ax.errorbar([r["p50_ms"] for r in group], [r["test_accuracy"] * 100 for r in group], yerr=[low, high],
                    fmt="none", ecolor=points.get_facecolor()[0], alpha=0.5, capsize=2, zorder=2)


def _bar(r: dict) -> tuple[float, float]:
    """(below, above) the test accuracy, in points: its 95% Wilson interval (none when n is unknown)."""
    n, acc = r.get("test_images"), r["test_accuracy"]
    if not n or acc != acc:  # unknown n, or a model that could not be scored (nan)
        return 0.0, 0.0
    lo, hi = interval(acc, n)
    return 100 * max(acc - lo, 0.0), 100 * max(hi - acc, 0.0)  # at 0% or 100%, rounding may cross the point


def _label(ax, records: Sequence[dict], fontsize: float = 7) -> None:
    """Each point's name beside it; a label that would cover one placed before moves up a line
    at a time (ties put several points on one spot, and their names on one another)."""
    placed: list[tuple[float, float, float, float]] = []  # boxes in display points
    scale = ax.figure.dpi / 72
    for r in sorted(records, key=lambda r: (r["test_accuracy"], r["p50_ms"])):
        x, y = ax.transData.transform((r["p50_ms"], r["test_accuracy"] * 100)) / scale
        width, height = 0.6 * fontsize * len(r["name"]), 1.2 * fontsize
        dy = 4.0
        while any(x + 5 < bx + bw and bx < x + 5 + width and y + dy < by + bh and by < y + dy + height
                  for bx, by, bw, bh in placed):
            dy += height
        placed.append((x + 5, y + dy, width, height))
        ax.annotate(r["name"], (r["p50_ms"], r["test_accuracy"] * 100), xytext=(5, dy),
                    textcoords="offset points", fontsize=fontsize,
                    arrowprops={"arrowstyle": "-", "lw": 0.4, "alpha": 0.5} if dy > 4 else None)


def _plot_front(ax, records: Sequence[dict], front: list[str]) -> None:
    # The front was chosen on validation; drawn at the test accuracies the report gives, it
    # need not rise step by step, so a plain line joins its points in latency order.
    by_name = {r["name"]: r for r in records}
    xs = [by_name[n]["p50_ms"] for n in front]
    ys = [by_name[n]["test_accuracy"] * 100 for n in front]
    ax.plot(xs, ys, color="black", linewidth=1, linestyle="--", label="Pareto front (chosen on validation)",
            zorder=2)
