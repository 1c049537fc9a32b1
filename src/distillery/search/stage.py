"""The search stage: the teacher's logits of every view once, the trials on Ray Tune
(`on_tune`), then every finished trial's saved model scored and timed one after another in
this process (nothing training meanwhile: a trial timed while others train would be timed on
a busy CPU), the budget applied on the validation split, the search's frontier written, and
the chosen model saved as the variant `searched`, which the compress stage puts on the run's
frontier and serving serves.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from distillery import artifacts
from distillery.compression.stage import measure, measure_trained
from distillery.compression.steps import Context
from distillery.config import PipelineConfig
from distillery.core import console
from distillery.core.errors import UserError
from distillery.core.files import atomic_write_json
from distillery.core.roles import SEARCHED, VARIANT
from distillery.measure import timing
from distillery.measure.accuracy import with_interval
from distillery.models.architectures import count_macs
from distillery.run.rundir import RunDir, fingerprint
from distillery.search import budget, report
from distillery.search.trial import COMPLETED, FAILED, STOPPED, TrialData, describe, model_macs
from distillery.training.augment_views import logits_of_every_view
from distillery.training.objective import frozen_teacher

Log = Callable[[str], None]


def search_run(run: RunDir, cfg: PipelineConfig, log: Log, splits: dict, manifest: dict,
               name: str) -> tuple[list[Path], dict[str, Any]]:
    """Search, measure, choose, write; `name` is Tune's experiment (resumed when it exists)."""
    from distillery.search.on_tune import run_trials  # the core never imports ray

    teacher = frozen_teacher(run.verify_file("teacher/arch.json").parent, torch.device("cpu"))
    flip = manifest["flips_keep_class"]
    views = logits_of_every_view(teacher, splits["train"][0], flip=flip)
    data = TrialData(cfg, {k: splits[k] for k in ("train", "val")}, views, manifest["image_shape"],
                     manifest["num_classes"], flip, teacher)
    out = run.root / "search" / "models"
    shutil.rmtree(out, ignore_errors=True)
    models = models_within_work(run, cfg, manifest, log)
    s = cfg.search
    log(f"[search] {s.trials} trials on Ray Tune, {s.cpus_per_trial:g} CPU each, ASHA (rungs from "
        f"{s.grace_percent:g}% of a trial's epochs, top 1/{s.reduction_factor:g} go on); the teacher's "
        f"logits of {len(views)} views of {len(splits['train'][0])} images computed once")
    with console.progress("[search] trials", s.trials, "trials") as advance:
        found = run_trials(cfg, run, data, f"{name}-{fingerprint(models)[:8]}", models, out, advance)
    outcomes = [{**o, "recipe": describe(cfg, o["settings"])} for o in found]
    ctx = Context(run, cfg, log, manifest["image_shape"], splits, teacher, "", 0)
    bench = timing.BenchSettings(**cfg.compress.bench.model_dump(exclude={"modes"}))
    finished = sum(1 for o in outcomes if o.get("folder"))
    with console.progress("[search] scoring and timing", finished + 3, "models") as advance:
        reference = measure_trained(ctx, bench, advance)
        records = [measure_trial(ctx, bench, o, advance) for o in outcomes if o.get("folder")]
    return finish(run, cfg, log, outcomes, records, reference)


def models_within_work(run: RunDir, cfg: PipelineConfig, manifest: dict, log: Log) -> list[list]:
    """The [width, recipe index] pairs to draw trials from: all of them, or, when the budget
    asks to be as fast as a model of the run, those with no more MACs than it (counted on a
    dry run of the recipe): a trial that could never meet the budget is not worth training.
    A recipe a width cannot take stays in: its trials fail at once, saying why."""
    space, shape, classes = cfg.search.space, manifest["image_shape"], manifest["num_classes"]
    pairs: list[list] = [[w, r] for w in space.width_mult for r in range(len(space.recipe))]
    which = cfg.search.budget.as_fast_as
    if which is None:
        return pairs
    limit = count_macs(artifacts.load(run.verify_file(f"{which}/arch.json").parent)[0], shape)
    kept = [[w, r] for w, r in pairs if (model_macs(cfg, w, r, shape, classes) or 0) <= limit]
    if not kept:
        raise UserError(f"search.space: no width and recipe come to at most {limit:,} MACs ({which}'s, as "
                        "search.budget.as_fast_as asks); add narrower widths or pruning recipes")
    log(f"[search] {len(kept)} of {len(pairs)} width/recipe pairs come to at most {limit:,} MACs ({which}'s)")
    return kept


def measure_trial(ctx: Context, bench: timing.BenchSettings, outcome: dict[str, Any],
                  advance: Callable[..., None]) -> dict[str, Any]:
    """A finished trial's saved model, reloaded, scored on val and test and timed as served."""
    m = outcome["metrics"]
    model, _ = artifacts.load(outcome["folder"])
    rec = measure(ctx, bench, f"trial-{outcome['trial']}", VARIANT, "teacher", outcome["recipe"],
                  model, model, m["size_bytes"], int8=m["numerics"] == "int8_static", macs=m["macs"],
                  params=m["params"])
    advance(1, note=rec["name"])
    return {**rec, "numerics": m["numerics"], "not_faster": False, "trial": outcome["trial"],
            "val_loss": m["val_loss"], "settings": outcome["settings"]}


def finish(run: RunDir, cfg: PipelineConfig, log: Log, outcomes: list[dict], records: list[dict],
           reference: dict[str, dict]) -> tuple[list[Path], dict[str, Any]]:
    b = cfg.search.budget
    limits = budget.bounds(b, reference.get(b.as_fast_as) if b.as_fast_as else None,
                           cfg.compress.speedup_margin)
    choice = budget.choose(records, b, limits)
    summary = counts(outcomes)
    files = report.write(run.root / "search", outcomes, records, list(reference.values()), choice, limits,
                         summary)
    log(f"[search] {summary['trials']} trials: {summary['completed']} completed, {summary['stopped_early']} "
        f"stopped early, {summary['failed']} failed; {summary['epochs_run']:,} of {summary['epochs_full']:,} "
        f"epochs run ({summary['epochs_saved']:.0%} saved by early stopping)")
    if choice["chosen"] is None:
        raise_no_model(choice, files[0])
    log(f"[search] {choice['message']}")
    files += save_chosen(run, choice)
    chosen = choice["chosen"]
    log(f"[search] chosen {chosen['name']} ({chosen['recipe']}): test accuracy "
        f"{with_interval(chosen['test_accuracy'], chosen['test_images'])}, p50 {chosen['p50_ms']:.3f} ms "
        f"({chosen['best_mode']}) -> {files[0].parent / 'frontier.md'}")
    return files, {**summary, "chosen": chosen["name"], "message": choice["message"]}


def counts(outcomes: list[dict]) -> dict[str, Any]:
    """How many trials ran, stopped early or failed; epochs run against a search without stopping."""
    full = sum(o["settings"].get("epochs", 0) for o in outcomes)
    ran = sum(o["epochs_run"] for o in outcomes)
    by = {status: sum(o["status"] == status for o in outcomes) for status in (COMPLETED, STOPPED, FAILED)}
    return {"trials": len(outcomes), "completed": by[COMPLETED], "stopped_early": by[STOPPED],
            "failed": by[FAILED], "epochs_run": ran, "epochs_full": full,
            "epochs_saved": 1 - ran / full if full else 0.0}


def raise_no_model(choice: dict[str, Any], frontier: Path) -> None:
    raise UserError(f"search.budget: {choice['message']}; every trial is in {frontier}")


def save_chosen(run: RunDir, choice: dict[str, Any]) -> list[Path]:
    """The chosen trial's model as the variant `searched`, with what it is and how it scored."""
    chosen, folder = choice["chosen"], run.root / "variants" / SEARCHED
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(run.root / "search" / "models" / chosen["trial"], folder)
    atomic_write_json(folder / "search.json", {"trial": chosen["trial"], "settings": chosen["settings"],
                                               "recipe": chosen["recipe"], "record": chosen,
                                               "runner_up": choice["runner_up"],
                                               "message": choice["message"]})
    return sorted(p for p in folder.iterdir() if p.is_file())
