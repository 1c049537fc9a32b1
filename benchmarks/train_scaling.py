"""Ray Train speed on digits: 1 vs 2 DDP workers, Ray vs a plain process, DDP vs FSDP vs pipeline.

    .venv/bin/python benchmarks/train_scaling.py [--quick]

Trains only the teacher (stages data, teacher) once per variant, each with the preset's
epochs (30; 3 with --quick), so the same runs give both the epoch times and the test
accuracy each strategy reached. Epoch times are medians over the epochs after the first
(which pays for warm-up) of one run per variant, read from the teacher's metrics.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import machine, machine_lines, make_config, median, publish, read_json, run, table

# Variant name -> config overrides. "plain" trains in this process (`ray.workers=0`), the
# same loop Ray's workers run; its 1-thread row matches a Ray worker's 1 thread per CPU.
VARIANTS: dict[str, list[str]] = {
    "plain process, 1 thread": ["ray.workers=0", "threads=1"],
    "plain process, 2 threads": ["ray.workers=0", "threads=2"],
    "Ray, 1 worker (ddp)": ["ray.workers=1"],
    "Ray, 2 workers, ddp": ["ray.workers=2", "teacher.train.parallelism=ddp"],
    "Ray, 2 workers, fsdp": ["ray.workers=2", "teacher.train.parallelism=fsdp"],
    "Ray, 2 workers, pipeline": ["ray.workers=2", "teacher.train.parallelism=pipeline"],
}
PLAIN, RAY1, DDP2 = "plain process, 1 thread", "Ray, 1 worker (ddp)", "Ray, 2 workers, ddp"
RAY_GATE = 1.15  # Ray's own release gate: Ray Train per-epoch time <= 1.15x plain PyTorch


def measure(storage: Path, label: str, overrides: list[str]) -> dict[str, Any]:
    """Train the teacher of one variant; return its timings and test accuracy."""
    name = "v" + str(list(VARIANTS).index(label))
    cfg = make_config(storage, name, overrides)
    load = os.getloadavg()[0]  # other work on the shared machine shows up here
    print(f"\n== {label}: {' '.join(overrides)}", flush=True)
    root, _ = run(cfg, ["data", "teacher"])
    manifest, metrics = read_json(root / "manifest.json"), read_json(root / "teacher" / "metrics.json")
    rows = manifest["stages"]["data"]["metrics"]["counts"]["train"]
    wall = manifest["stages"]["teacher"]["metrics"]["seconds"]
    return {"overrides": overrides, "workers": cfg.ray.workers, "threads": _threads(cfg),
            "epochs": metrics["epochs"], **timings(metrics["history"], rows, wall, cfg),
            "test_accuracy": metrics["test_accuracy"], "load_avg_1min_before": load}


def timings(history: list[dict], rows: int, wall: float, cfg) -> dict[str, Any]:
    """Per-epoch medians and minima over the epochs after the first (which pays for warm-up),
    and the stage time spent outside the epochs (Ray: start, data read, checkpoints; plain:
    val, test). On a shared machine other work only adds time, so the fastest epoch is the
    best estimate of the uncontended speed, the median of the typical one."""
    loop = [_train_loop_seconds(e, rows, cfg) for e in history]
    epoch = [e["epoch_seconds"] for e in history] if cfg.ray.workers else None
    later = slice(1, None) if len(history) > 1 else slice(None)
    return {"epochs_timed": len(loop[later]), "train_loop_s": median(loop[later]),
            "fastest_train_loop_s": min(loop[later]),
            "epoch_s": median(epoch[later]) if epoch else None,
            "fastest_epoch_s": min(epoch[later]) if epoch else None,
            "stage_wall_s": wall, "outside_epochs_s": wall - sum(epoch or loop),
            "per_epoch_train_loop_s": [round(t, 4) for t in loop], "per_epoch_s": epoch}


def _threads(cfg) -> int:
    # A Ray worker sets 1 thread per CPU it holds (training.on_ray.train_worker); a plain run, cfg.threads.
    return max(1, int(cfg.ray.cpus_per_worker)) if cfg.ray.workers else cfg.threads


def _train_loop_seconds(epoch: dict, rows: int, cfg) -> float:
    """Seconds in `train_epoch` alone (no validation, no checkpoint). The plain loop records
    them; a Ray worker records its samples/s, so: its rows / its samples/s, slowest worker
    (data-parallel workers each get rows / workers; every pipeline stage sees all rows)."""
    if not cfg.ray.workers:
        return epoch["seconds"]
    split = cfg.teacher.train.parallelism != "pipeline"
    per_worker = rows / cfg.ray.workers if split else rows
    return per_worker / min(epoch["samples_per_s_per_worker"])


def ray_startup(storage: Path) -> float:
    """Seconds to start the local Ray instance the Ray variants share (paid once per process)."""
    from distillery.run.cluster import ensure_ray

    start = time.perf_counter()
    ensure_ray(make_config(storage, "startup", ["ray.workers=2"]))
    return time.perf_counter() - start


def ratios(v: dict[str, dict], stat: str) -> dict[str, float]:
    """The comparisons, from per-epoch medians (stat "") or fastest epochs (stat "fastest_")."""
    def per_epoch(label: str, key: str) -> float:
        return v[label][stat + key]
    return {
        "ddp_speedup_2_vs_1_workers": per_epoch(RAY1, "epoch_s") / per_epoch(DDP2, "epoch_s"),
        "ray1_vs_plain_train_loop": per_epoch(RAY1, "train_loop_s") / per_epoch(PLAIN, "train_loop_s"),
        "ray1_vs_plain_stage_wall": v[RAY1]["stage_wall_s"] / v[PLAIN]["stage_wall_s"],
        "fsdp_vs_ddp_epoch": per_epoch("Ray, 2 workers, fsdp", "epoch_s") / per_epoch(DDP2, "epoch_s"),
        "pipeline_vs_ddp_epoch": per_epoch("Ray, 2 workers, pipeline", "epoch_s")
        / per_epoch(DDP2, "epoch_s"),
    }


COMPARISONS = {
    "ddp_speedup_2_vs_1_workers": "DDP speed-up, 2 workers vs 1 (epoch time 1w / 2w)",
    "ray1_vs_plain_train_loop":
        f"Ray 1 worker / plain 1 thread, train loop per epoch (Ray's gate <= {RAY_GATE}x)",
    "ray1_vs_plain_stage_wall": "Ray 1 worker / plain 1 thread, whole teacher stage wall time (one figure)",
    "fsdp_vs_ddp_epoch": "FSDP / DDP, 2 workers, epoch time",
    "pipeline_vs_ddp_epoch": "pipeline / DDP, 2 workers, epoch time",
}


def report(v: dict[str, dict], r: dict[str, dict], startup: float, info: dict) -> str:
    base = v[RAY1]["test_accuracy"]
    pair = lambda mid, low: f"{mid:.3f} ({low:.3f})" if mid is not None else "n/a"  # noqa: E731
    rows = [[label, f"{m['workers'] or 'in-process'} x {m['threads']}",
             pair(m["train_loop_s"], m["fastest_train_loop_s"]), pair(m["epoch_s"], m["fastest_epoch_s"]),
             f"{m['stage_wall_s']:.1f}",
             f"{m['outside_epochs_s']:.1f}", f"{m['test_accuracy']:.2%}",
             f"{(m['test_accuracy'] - base) * 100:+.2f}"]
            for label, m in v.items()]
    any_m = next(iter(v.values()))
    header = ["teacher on digits", "workers x threads", "train loop s/epoch: median (fastest)",
              "epoch s incl. val: median (fastest)", "stage wall s", "outside epochs s", "test acc",
              "vs Ray 1 worker (pts)"]
    ratio_rows = [[text, f"{r['median'][key]:.2f}x", f"{r['fastest'][key]:.2f}x"]
                  for key, text in COMPARISONS.items()]
    return "\n".join([
        table(header, rows), "", table(["comparison", "from medians", "from fastest epochs"], ratio_rows), "",
        f"Ray start-up (local instance, once per process, not in any stage time): {startup:.1f} s.",
        f"One run per variant, {any_m['epochs']} epochs each, same seed; per-epoch figures are the median "
        f"and the fastest of the {any_m['epochs_timed']} epochs after the first. 'train loop' is "
        "train_epoch alone (plain: its recorded seconds; Ray: rows per worker / the slowest worker's "
        "samples/s); 'epoch s' adds validation (only Ray records it); 'stage wall' is the whole teacher "
        "stage from manifest.json (Ray: data read, worker start, a checkpoint per epoch, test); 'outside "
        "epochs' is stage wall minus the epochs' own time (Ray: epoch s; plain: train loop). Test "
        "accuracy: digits test split (360 images, 1 image = 0.28 pts).",
        "1-minute load average before each run (2 cores; above ~1-2 means other work shared them): "
        + ", ".join(f"{m['load_avg_1min_before']:.1f}" for m in v.values()) + ".",
        machine_lines(info)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="3 epochs per variant (a smoke test, not a result)")
    args = parser.parse_args()
    epochs = ["teacher.train.epochs=3"] if args.quick else []  # else the preset's 30
    with tempfile.TemporaryDirectory(prefix="train_scaling-") as storage:
        # The plain runs first, so Ray's idle daemons do not share the 2 cores with them.
        plain = {label: o for label, o in VARIANTS.items() if "ray.workers=0" in o}
        variants = {label: measure(Path(storage), label, [*o, *epochs]) for label, o in plain.items()}
        startup = ray_startup(Path(storage))
        variants |= {label: measure(Path(storage), label, [*o, *epochs])
                     for label, o in VARIANTS.items() if label not in plain}
    r = {"median": ratios(variants, ""), "fastest": ratios(variants, "fastest_")}
    info = machine("1 per Ray worker (1 CPU each); plain process as its row says")
    figures = {"machine": info, "runs_per_figure": 1, "ray_startup_s": startup, "variants": variants,
               "ratios": r,
               "note": "per-epoch figures: median and min over epochs 2..N of one run"}
    publish("train_scaling", report(variants, r, startup, info), figures, args.quick)


if __name__ == "__main__":
    sys.exit(main())
