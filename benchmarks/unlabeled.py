"""Distillation without labels on digits, over seeds: does a student that never sees a label
(the soft term alone) reach the labeled distillation's test accuracy?

    .venv/bin/python benchmarks/unlabeled.py [--quick] [--seeds 0 1 2 3 4]

Per seed, one run directory and one teacher, then three distilled students of the digits
preset, each in this process (`ray.workers=0`):
- labeled: the preset's loss, alpha 0.9 (soft term) + 0.1 cross-entropy on the labels;
- soft only: `distill.labels=false`, the same training images, no label reaches the student;
- unlabeled transfer set: `distill.transfer` = the digits images without labels
  (`labeled: false`); the run's val/test images are left out of it, so it is the training
  split again, read as a dataset of its own (another row order).
The teacher's fingerprint does not depend on `distill`, so all three face the same teacher.
Differences are paired on the same 360 test images (1 image = 0.28 points), with the 95%
interval from the images only one of the two got right. Figures go to
benchmarks/results/unlabeled_<machine>_<date>.json.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from common import (
    machine,
    machine_lines,
    make_config,
    mean,
    publish,
    quick_overrides,
    read_json,
    run,
    seeds_parser,
    table,
)

from distillery import artifacts, data
from distillery.measure.accuracy import paired_interval

VARIANTS = {"labeled (alpha 0.9)": [], "soft only (labels=false)": ["distill.labels=false"],
            "unlabeled transfer set": ["distill.transfer.source=digits", "distill.transfer.labeled=false"]}


def student_correct(root: Path) -> torch.Tensor:
    """Which test images the run's distilled student gets right (bool [360])."""
    x, y = data.load_split(root / "data", "test")
    model, _ = artifacts.load(root / "student")
    with torch.inference_mode():
        return model(x).argmax(1) == y


def run_seed(storage: Path, seed: int, quick: list[str]) -> dict:
    out, correct = {}, {}
    for variant, overrides in VARIANTS.items():
        print(f"\n== seed {seed}: {variant}", flush=True)
        cfg = make_config(storage, f"seed{seed}", [f"seed={seed}", "ray.workers=0", "compress.variants=[]",
                                                   "serve.enabled=false", *overrides, *quick])
        root, wall = run(cfg, ["data", *(["transfer"] if cfg.distill.transfer else []), "teacher", "student"])
        correct[variant] = student_correct(root)
        out[variant] = {"student": correct[variant].float().mean().item(), "wall_s": wall}
    out["teacher"] = read_json(root / "manifest.json")["stages"]["teacher"]["metrics"]["test_accuracy"]
    labeled = correct[next(iter(VARIANTS))]
    for variant in list(VARIANTS)[1:]:
        better = int((correct[variant] & ~labeled).sum())
        worse = int((labeled & ~correct[variant]).sum())
        out[variant]["vs_labeled"] = (better - worse) / len(labeled)
        out[variant]["vs_labeled_interval"] = paired_interval(better, worse, len(labeled))
    return out


def report(per_seed: list[dict], seeds: list[int], info: dict) -> str:
    rows = []
    for seed, r in zip(seeds, per_seed):
        rows.append([str(seed), f"{r['teacher']:.2%}", *_cells(r)])
    means = {v: {"student": mean([r[v]["student"] for r in per_seed]),
                 **({"vs_labeled": mean([r[v]["vs_labeled"] for r in per_seed])} if i else {})}
             for i, v in enumerate(VARIANTS)}
    rows.append([f"**mean of {len(seeds)}**", f"{mean([r['teacher'] for r in per_seed]):.2%}",
                 *_cells(means)])
    header = ["seed", "teacher", *VARIANTS, *(f"{v} - labeled (pts, 95% CI)" for v in list(VARIANTS)[1:])]
    return "\n".join([table(header, rows), "",
                      "Test accuracy of the distilled student on the digits test split (360 images: "
                      "1 image = 0.28 pts), one run per seed and variant, in this process "
                      "(ray.workers=0). Differences are paired on the same images; an interval that "
                      "holds 0 is a tie.", machine_lines(info)])


def _cells(r: dict) -> list[str]:
    accs = [f"{r[v]['student']:.2%}" for v in VARIANTS]
    diffs = []
    for v in list(VARIANTS)[1:]:
        lo_hi = r[v].get("vs_labeled_interval")
        ci = f" ({lo_hi[0] * 100:+.2f} to {lo_hi[1] * 100:+.2f})" if lo_hi else ""
        diffs.append(f"{r[v]['vs_labeled'] * 100:+.2f}{ci}")
    return accs + diffs


def main() -> None:
    args = seeds_parser(__doc__).parse_args()
    quick = quick_overrides(args)
    with tempfile.TemporaryDirectory(prefix="unlabeled-") as storage:
        per_seed = [run_seed(Path(storage), seed, quick) for seed in args.seeds]
    info = machine(f"in-process: {torch.get_num_threads()}")
    figures = {"machine": info, "seeds": args.seeds, "runs_per_figure": "1 run per seed and variant",
               "variants": dict(VARIANTS.items()), "per_seed": per_seed}
    publish("unlabeled", report(per_seed, args.seeds, info), figures, args.quick)


if __name__ == "__main__":
    sys.exit(main())
