"""Cascades against the models they join, side by side in one run.

    python benchmarks/cascade.py [--run-dir runs/digits] [--repeats 5]

Every cascade variant of a finished run, its small and its large model, each loaded as a
replica loads it (`Predictor`: verified, in its served mode, 1 torch thread), answers the
run's 360 test images one at a time (batch 1, as a lone request does); the mean per-image
latency of each pass is kept, and the median over `--repeats` passes (models interleaved in
each round) is reported, with test accuracy and its 95% Wilson interval. Target: each cascade
at most one test image below its large model, at no more than half its mean latency.
Writes benchmarks/results/cascade_<machine>_<date>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from common import machine, machine_lines, median, publish, read_json, table  # noqa: E402

from distillery import data  # noqa: E402
from distillery.measure.accuracy import with_interval  # noqa: E402
from distillery.serving.predictor import Predictor, catalog  # noqa: E402


def per_image_ms(predictor: Predictor, x: torch.Tensor) -> float:
    start = time.perf_counter()
    for i in range(len(x)):
        predictor(x[i:i + 1])
    return 1e3 * (time.perf_counter() - start) / len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/digits")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    run = Path(args.run_dir)
    x, y = data.load_split(run / "data", "test")
    cascades = [r for r in read_json(run / "frontier.json")["variants"] if r.get("compared_with")]
    if not cascades:
        raise SystemExit(f"{run}: no cascade variants in its frontier")
    names = list(dict.fromkeys(n for r in cascades for n in (r["name"], r["parent"], r["compared_with"])))
    predictors = {m.name: Predictor(m) for m in catalog(run, names)}
    accuracy = {n: float((p(x).argmax(1) == y).float().mean()) for n, p in predictors.items()}
    for p in predictors.values():
        per_image_ms(p, x[:50])  # warm-up
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.repeats):
        for n, p in predictors.items():
            times[n].append(per_image_ms(p, x))
    ms = {n: median(t) for n, t in times.items()}
    rows = []
    figures = {"machine": machine("1"), "test_images": len(y), "repeats": args.repeats, "cascades": []}
    for r in cascades:
        large, small = r["compared_with"], r["parent"]
        images_below = round((accuracy[large] - accuracy[r["name"]]) * len(y))
        met = images_below <= 1 and ms[r["name"]] <= ms[large] / 2
        rows.append([r["name"], f"{small} -> {large}", with_interval(accuracy[r["name"]], len(y)),
                     with_interval(accuracy[large], len(y)), with_interval(accuracy[small], len(y)),
                     f"{r['test_escalation']:.1%}", f"{ms[r['name']]:.3f}", f"{ms[large]:.3f}",
                     f"{ms[small]:.3f}",
                     f"{ms[large] / ms[r['name']]:.1f}x", "yes" if met else "no"])
        figures["cascades"].append({"name": r["name"], "small": small, "large": large,
                                    "accuracy": accuracy[r["name"]],
                                    "large_accuracy": accuracy[large], "small_accuracy": accuracy[small],
                                    "escalation": r["test_escalation"], "mean_ms": ms[r["name"]],
                                    "large_mean_ms": ms[large], "small_mean_ms": ms[small], "target_met": met,
                                    "served_mode": predictors[r["name"]].served.mode})
    report = table(["cascade", "small -> large", "test acc (95% CI)", "large alone", "small alone",
                    "escalated", "ms/image", "large ms/image", "small ms/image", "speed-up over large",
                    "target met"], rows)
    report += (f"\n\nBatch 1 over all {len(y)} test images, median of {args.repeats} passes, each model "
               f"in its served mode, 1 torch thread. " + machine_lines(figures["machine"]))
    publish("cascade", report, figures, quick=False)


if __name__ == "__main__":
    main()
