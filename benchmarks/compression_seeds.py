"""What compression costs in accuracy on digits, over seeds: each variant's test accuracy
against its parent's, and the recommended model's against the teacher's.

    .venv/bin/python benchmarks/compression_seeds.py [--quick] [--seeds 0 1 2 3 4]

Each seed runs the pipeline in this process up to the compress stage (`ray.workers=0`: the same
training loop without Ray; each seed draws its own splits and initial weights). Speed is not
what this script reports (`benchmarks/compression.py` times the variants side by side), so
every variant is timed briefly, eager only: the recommendation still follows the run's own
rule (validation accuracy within the floor, then speed). A variant's drop is its test accuracy
minus its parent's on the same images; its mean over seeds comes with a Student-t 95% interval
and is a tie when that holds zero. Figures go to benchmarks/results/compression_seeds_<machine>_<date>.json.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from common import (
    machine,
    machine_lines,
    make_config,
    mean_interval,
    publish,
    quick_overrides,
    read_json,
    run,
    seeds_parser,
    table,
)

from distillery.core.roles import TRAINED, VARIANT
from distillery.measure.accuracy import verdict

BRIEF_TIMING = ["compress.bench.latency_runs=20", "compress.bench.throughput_runs=1",
                "compress.bench.modes=[eager]"]


def run_seed(storage: Path, seed: int, quick: list[str]) -> dict[str, Any]:
    """One seed up to compress: each variant's parent, test accuracies, and the recommendation."""
    print(f"\n== seed {seed}", flush=True)
    cfg = make_config(storage, f"seed{seed}", [f"seed={seed}", "ray.workers=0", *BRIEF_TIMING, *quick])
    root, wall = run(cfg, ["data", *TRAINED, "evaluate", "compress"])
    front = read_json(root / "frontier.json")
    records = {r["name"]: r for r in front["variants"]}
    drops = {name: {"parent": r["test_paired"]["with"],
                    "drop": r["test_accuracy"] - records[r["test_paired"]["with"]]["test_accuracy"],
                    "better": r["test_paired"]["better"], "worse": r["test_paired"]["worse"]}
             for name, r in records.items() if r["role"] == VARIANT}  # what compress built
    chosen = front["recommended"]["name"]
    return {"drops": drops, "recommended": chosen, "test_images": records["teacher"]["test_images"],
            "recommended_vs_teacher": records[chosen]["test_accuracy"] - records["teacher"]["test_accuracy"],
            "wall_s": wall}


def summarize(per_seed: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per variant, and for the recommended model against the teacher: the mean difference
    over seeds, its 95% interval and what it says."""
    series = {name: [s["drops"][name]["drop"] for s in per_seed] for name in per_seed[0]["drops"]}
    series["recommended vs teacher"] = [s["recommended_vs_teacher"] for s in per_seed]
    out = {}
    for name, values in series.items():
        m, low, high = mean_interval(values)
        out[name] = {"mean": m, "interval": [low, high], "verdict": verdict(low, high), "per_seed": values}
    return out


def report(figures: dict[str, Any], info: dict[str, Any]) -> str:
    seeds, per_seed = figures["seeds"], figures["per_seed"]
    header = ["variant", "compared with", *(f"seed {s}" for s in seeds), "mean (pts)", "95% CI (pts)",
              "verdict"]
    rows = []
    for name, r in figures["summary"].items():
        parent = per_seed[0]["drops"][name]["parent"] if name in per_seed[0]["drops"] else "teacher"
        low, high = r["interval"]
        rows.append([name, parent, *(f"{v * 100:+.2f}" for v in r["per_seed"]), f"{r['mean'] * 100:+.2f}",
                     f"{low * 100:+.2f} to {high * 100:+.2f}", r["verdict"]])
    chosen = ", ".join(f"seed {s}: {r['recommended']}" for s, r in zip(seeds, per_seed))
    n = per_seed[0]["test_images"]
    return "\n".join([table(header, rows), "",
        f"Test accuracy difference in points (variant minus the model it was built from), digits test split "
        f"({n} images: 1 image = {100 / n:.2f} pts), one run per seed; the mean's 95% interval is "
        f"Student's t over {len(seeds)} seeds (each draws its own splits and initial weights), a tie "
        f"when it holds zero. "
        f"Recommended (chosen on validation): {chosen}.",
        machine_lines(info)])


def main() -> None:
    args = seeds_parser(__doc__).parse_args()
    quick = quick_overrides(args)
    with tempfile.TemporaryDirectory(prefix="compression_seeds-") as storage:
        per_seed = [run_seed(Path(storage), seed, quick) for seed in args.seeds]
    info = machine("in-process: all cores for training; 1 while timing")
    figures = {"machine": info, "seeds": args.seeds,
               "runs_per_figure": f"mean of {len(args.seeds)} seeds, 1 run each",
               "per_seed": per_seed, "summary": summarize(per_seed)}
    publish("compression_seeds", report(figures, info), figures, args.quick)


if __name__ == "__main__":
    sys.exit(main())
