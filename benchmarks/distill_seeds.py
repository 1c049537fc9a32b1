"""Distillation vs training alone on digits, over seeds: does the distilled student beat the
same student trained alone, and what share of the teacher-student gap does it close?

    .venv/bin/python benchmarks/distill_seeds.py [--quick] [--ray]

Each seed runs the whole pipeline (data, teacher, student alone, distilled student, evaluate)
in this process (`ray.workers=0`: the same loop Ray's workers run, without Ray), then again
with `student.train.augment=true`; that second run reuses the seed's teacher (its fingerprint
is unchanged), so the two student variants face the same teacher. `--ray` adds both variants
on Ray Train with 2 DDP workers. Accuracies are on the test split, read from results.json.
Figures go to benchmarks/results/distill_seeds_<machine>_<date>.json (distill_seeds-ray_... with --ray).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from common import (
    machine,
    machine_lines,
    make_config,
    mean,
    mean_interval,
    publish,
    quick_overrides,
    read_json,
    run,
    seeds_parser,
    table,
)

from distillery.core.roles import TRAINED
from distillery.measure.accuracy import verdict

MODELS = ("teacher", "student_scratch", "student")
STUDENT_VARIANTS = {"no augmentation (preset)": [], "augment=true": ["student.train.augment=true"]}


def run_seed(storage: Path, seed: int, backend: list[str], quick: list[str]) -> dict[str, dict[str, Any]]:
    """Both student variants for one seed on one backend: {variant: accuracies and gain}."""
    name = f"seed{seed}-{'ray' if 'ray.workers=2' in backend else 'local'}"
    out = {}
    for variant, overrides in STUDENT_VARIANTS.items():
        print(f"\n== seed {seed}, {' '.join(backend)}, {variant}", flush=True)
        cfg = make_config(storage, name, [f"seed={seed}", *backend, *overrides, *quick])
        root, wall = run(cfg, ["data", *TRAINED, "evaluate"])  # up to evaluate: nothing compressed or served
        results = read_json(root / "results.json")
        out[variant] = {**{m: results["models"][m]["test_accuracy"] for m in MODELS},
                        **results["distillation"], "wall_s": wall}
    return out


def summarize(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over seeds. The share of the gap closed: the mean of the seeds' shares (over seeds
    that had a gap) and, steadier when a seed's gap is one or two images, mean gain / mean gap."""
    closed = [s["gap_closed"] for s in per_seed if s["gap_closed"] is not None]
    means = {k: mean([s[k] for s in per_seed]) for k in (*MODELS, "gain", "gap")}
    _, low, high = mean_interval([s["gain"] for s in per_seed])  # seeds draw their own splits and inits
    return {**means, "mean_gain_interval": [low, high], "mean_gain_verdict": verdict(low, high),
            "gap_closed": mean(closed) if closed else None,
            "gap_closed_pooled": means["gain"] / means["gap"] if means["gap"] > 0 else None,
            "seeds_with_gap": len(closed), "seeds": len(per_seed)}


def rows_for(backend: str, variant: str, seeds: list[int], per_seed: list[dict], summary: dict) -> list[list]:
    def row(label: str, r: dict) -> list:
        closed = f"{r['gap_closed']:.0%}" if r["gap_closed"] is not None else "no gap"
        if r.get("gap_closed_pooled") is not None:
            closed += f" (pooled {r['gap_closed_pooled']:.0%})"
        gain = f"{r['gain'] * 100:+.2f}"
        if "mean_gain_interval" in r:  # the mean over seeds: its 95% interval and what it says
            low, high = r["mean_gain_interval"]
            gain += f" (95% CI {low * 100:+.2f} to {high * 100:+.2f}: {r['mean_gain_verdict']})"
        return [backend, variant, label, *(f"{r[m]:.2%}" for m in MODELS), gain, f"{r['gap'] * 100:.2f}",
                closed]
    return [row(str(s), r) for s, r in zip(seeds, per_seed)] + [row(f"**mean of {len(seeds)}**", summary)]


def report(figures: dict[str, Any], seeds: list[int], info: dict) -> str:
    header = ["backend", "student", "seed", "teacher", "student alone", "distilled", "gain (pts)",
              "gap (pts)", "gap closed"]
    rows = [row for backend, variants in figures["results"].items() for variant, r in variants.items()
            for row in rows_for(backend, variant, seeds, r["per_seed"], r["mean"])]
    return "\n".join([table(header, rows), "",
        f"Test accuracy on the digits test split (360 images: 1 image = 0.28 pts), one run per seed and "
        f"variant; means over {len(seeds)} seeds ({', '.join(map(str, seeds))}); 'gap closed' = gain / "
        "(teacher - student alone), averaged over the seeds that had a gap; 'pooled' = mean gain / "
        "mean gap; the mean gain's 95% interval is Student's t over the seeds (each seed draws its own "
        "splits and initial weights), a tie when it holds zero. Within a seed both student "
        "variants are distilled from the same teacher. 'in-process' = ray.workers=0: no Ray, the same "
        f"training loop, torch threads = {figures['in_process_threads']} (all cores).",
        machine_lines(info)])


def main() -> None:
    parser = seeds_parser(__doc__)
    parser.add_argument("--ray", action="store_true", help="also run on Ray Train with 2 DDP workers")
    args = parser.parse_args()
    quick = quick_overrides(args)
    backends = {"in-process": ["ray.workers=0"],
                **({"Ray, 2 workers": ["ray.workers=2"]} if args.ray else {})}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="distill_seeds-") as storage:
        for backend, overrides in backends.items():
            runs = [run_seed(Path(storage), seed, overrides, quick) for seed in args.seeds]
            results[backend] = {v: {"per_seed": [r[v] for r in runs], "mean": summarize([r[v] for r in runs])}
                                for v in STUDENT_VARIANTS}
    info = machine(f"in-process: {torch.get_num_threads()}" + ("; Ray: 1 per worker" if args.ray else ""))
    figures = {"machine": info, "seeds": args.seeds,
               "runs_per_figure": f"mean of {len(args.seeds)} seeds, 1 run each",
               "in_process_threads": torch.get_num_threads(), "results": results}
    variant = "ray" if args.ray else None
    publish("distill_seeds", report(figures, args.seeds, info), figures, args.quick, variant)


if __name__ == "__main__":
    sys.exit(main())
