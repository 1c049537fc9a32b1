"""The Ray Tune search against the hand-picked distilled student on digits, over seeds.

    .venv/bin/python benchmarks/search.py [--quick] [--seeds 0 1 2]

Per seed, in this process (`ray.workers=0`: the training loop without Ray Train's start-up):
data, teacher, the student alone and the preset's distilled student. Then, on Ray Tune (a
local Ray, one CPU per trial):

1. a search at the default student's size (width 0.5, no compression, no latency bound;
   12 trials over temperature, alpha, epochs and augmentation): the share of the
   teacher-student gap that the chosen student (chosen on validation) closes on test;
2. for the first seed only, the default search (24 trials, the whole default space and
   budget), timed, then the compress stage with the searched model on the frontier: the
   chosen model against the model the compress stage recommends without it (test accuracy
   with its 95% interval, p50 at batch 1 as served, both timed in that one stage).

Figures go to benchmarks/results/search_<machine>_<date>.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from common import machine, machine_lines, make_config, mean, publish, read_json, run, table

from distillery.measure import frontier
from distillery.measure.accuracy import with_interval

AT_STUDENT_SIZE = ["search.space.width_mult=[0.5]", "search.space.recipe=[[]]", "search.trials=12",
                   "search.budget.as_fast_as=null"]
TRAINED = ["data", "teacher", "student_scratch", "student", "evaluate"]


def gap_closed(seed: int, storage: Path, quick: list[str]) -> dict[str, Any]:
    cfg = make_config(storage, f"seed{seed}", [f"seed={seed}", "ray.workers=0", "search.enabled=true",
                                               *AT_STUDENT_SIZE, *quick])
    root, _ = run(cfg, TRAINED + ["search"])
    models = read_json(root / "results.json")["models"]
    found = read_json(root / "search" / "trials.json")
    chosen = next(r for r in found["measured"] if r["name"] == found["chosen"])
    teacher, alone = models["teacher"]["test_accuracy"], models["student_scratch"]["test_accuracy"]
    gap = teacher - alone
    # Not a choice (it reads the test split): how good the best student the search trained was.
    best = max(r["test_accuracy"] for r in found["measured"])
    return {"teacher": teacher, "alone": alone, "distilled": models["student"]["test_accuracy"],
            "searched": chosen["test_accuracy"], "searched_recipe": chosen["recipe"], "gap": gap,
            "best_trial_on_test": best, "best_gain": best - alone,
            "gain": chosen["test_accuracy"] - alone,
            "gap_closed": (chosen["test_accuracy"] - alone) / gap if gap > 0 else None,
            "test_images": chosen["test_images"], "summary": found["summary"]}


def default_search(seed: int, storage: Path, quick: list[str]) -> dict[str, Any]:
    cfg = make_config(storage, f"seed{seed}",
                      [f"seed={seed}", "ray.workers=0", "search.enabled=true", *quick])
    root, _ = run(cfg, TRAINED + ["search", "compress"])
    stages = read_json(root / "manifest.json")["stages"]
    found = read_json(root / "search" / "trials.json")
    front = read_json(root / "frontier.json")
    others = [r for r in front["variants"] if r["name"] != "searched"]
    rec = frontier.recommend(others, front["floor"], cfg.compress.speedup_margin)
    by_name = {r["name"]: r for r in front["variants"]}
    return {"search_seconds": stages["search"]["metrics"]["seconds"], "summary": found["summary"],
            "message": found["message"], "searched": by_name["searched"], "recommended": by_name[rec["name"]]}


def report(figures: dict[str, Any], info: dict) -> str:
    lines = gap_lines(figures) if figures["gap_closed"] else []
    d = figures.get("default_search")
    if d:
        lines += default_lines(d, figures["seeds"][0])
    return "\n".join([*lines, machine_lines(info)])


def gap_lines(figures: dict[str, Any]) -> list[str]:
    seeds = figures["gap_closed"]
    rows = [[s["seed"], f"{s['teacher']:.2%}", f"{s['alone']:.2%}", f"{s['distilled']:.2%}",
             f"{s['searched']:.2%}",
             f"{s['gap'] * 100:.2f}", f"{s['gap_closed']:.0%}" if s["gap_closed"] is not None else "no gap",
             f"{s['best_trial_on_test']:.2%}", s["searched_recipe"]] for s in seeds]
    m = figures["mean"]
    rows.append(["**mean**", f"{m['teacher']:.2%}", f"{m['alone']:.2%}", f"{m['distilled']:.2%}",
                 f"{m['searched']:.2%}", f"{m['gap'] * 100:.2f}",
                 f"pooled {m['gap_closed_pooled']:.0%}" if m["gap_closed_pooled"] is not None else "no gap",
                 f"{m['best_trial_on_test']:.2%} (pooled {m['best_closed_pooled']:.0%})", ""])
    lines = [table(["seed", "teacher", "student alone", "distilled (preset)", "searched (width 0.5)",
                    "gap (pts)", "gap closed", "best trial on test (not a choice)", "chosen settings"],
                   rows), "",
             "Test accuracy on the digits test split (360 images: 1 image = 0.28 pts); the searched "
             f"student is chosen on the validation split (180 images) among "
             f"{seeds[0]['summary']['trials']} trials; 'pooled' = mean gain / mean gap. 'Best trial on "
             "test' reads the test split, so it is not a choice anyone could make: it says how good the "
             "best finished student was, apart from how well 180 validation images pick it."]
    return lines


def default_lines(d: dict[str, Any], seed: int) -> list[str]:
    s, r, summ = d["searched"], d["recommended"], d["summary"]
    searched = with_interval(s["test_accuracy"], s["test_images"])
    recommended = with_interval(r["test_accuracy"], r["test_images"])
    return ["", f"Default search (seed {seed}, {summ['trials']} trials, the default space and budget): "
                  f"{d['search_seconds']:.0f} s for the search stage; {summ['completed']} completed, "
                  f"{summ['stopped_early']} stopped early, {summ['failed']} failed; "
                  f"{summ['epochs_run']:,} of "
                  f"{summ['epochs_full']:,} epochs run ({summ['epochs_saved']:.0%} saved by ASHA).",
                  f"Timed in one compress stage: searched {searched}, "
                  f"p50 {s['p50_ms']:.3f} ms ({s['best_mode']}), {s['recipe']}; the stage's recommendation "
                  f"without it, {r['name']}: {recommended}, p50 {r['p50_ms']:.3f} ms "
                  f"({r['best_mode']})."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="short schedules and 4 trials (a smoke test, not a result)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--part", choices=["both", "gap", "default"], default="both",
                        help="gap: the searches at the student's size (-> search_<machine>_<date>.json); "
                        "default: the default search of the first seed alone (-> search-default_...)")
    args = parser.parse_args()
    quick = ["teacher.train.epochs=3", "student.train.epochs=3", "search.space.epochs=[4,8]",
             "search.trials=4", "compress.bench.latency_runs=20"] if args.quick else []
    with tempfile.TemporaryDirectory(prefix="search-bench-") as storage:
        seeds = [{"seed": seed, **gap_closed(seed, Path(storage), quick)} for seed in args.seeds] \
            if args.part != "default" else []
        default = default_search(args.seeds[0], Path(storage), quick) if args.part != "gap" else None
    info = machine("1 per trial (Ray Tune); in-process training: all cores")
    figures = {"machine": info, "seeds": args.seeds, "gap_closed": seeds, "mean": summarize(seeds),
               "default_search": default, "threads": torch.get_num_threads()}
    variant = "default" if args.part == "default" else None
    publish("search", report(figures, info), figures, args.quick, variant)


def summarize(seeds: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Means over seeds; the share of the gap closed pooled: mean gain / mean gap."""
    if not seeds:
        return None
    keys = ("teacher", "alone", "distilled", "searched", "gap", "gain", "best_trial_on_test", "best_gain")
    means = {k: mean([s[k] for s in seeds]) for k in keys}
    means["gap_closed_pooled"] = means["gain"] / means["gap"] if means["gap"] > 0 else None
    means["best_closed_pooled"] = means["best_gain"] / means["gap"] if means["gap"] > 0 else None
    return means


if __name__ == "__main__":
    sys.exit(main())
