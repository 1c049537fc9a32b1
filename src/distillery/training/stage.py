"""The training stages of a run: `teacher` (trained, or imported: `artifacts.imported`),
`student_scratch` (the student alone), `student` (distilled from the teacher), the
`teacher_logits` cache, and `evaluate` (every trained model reloaded from disk and scored).
Training runs on Ray Train (`on_ray`), or in this process when `ray.workers` is 0.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from distillery import artifacts, data
from distillery.artifacts import imported, save_model
from distillery.config import PipelineConfig
from distillery.core import console
from distillery.core.files import atomic_write_bytes, atomic_write_json
from distillery.data.stage import load_splits
from distillery.measure.accuracy import distillation_gain, results_table, with_interval
from distillery.models.architectures import build_model, describe, make_spec, summarize
from distillery.run.rundir import RunDir
from distillery.training.job import TrainJob
from distillery.training.loop import batches, epoch_lines, evaluate, fit, pick_device, seed_everything
from distillery.training.objective import frozen_teacher, objective

Log = Callable[[str], None]
EVAL_BATCH = 1024


def uses_logit_cache(cfg: PipelineConfig) -> bool:
    # In-process training computes the teacher's logits per batch: no Ray Data stage to cache them.
    return cfg.distill.cache_teacher_logits and cfg.ray.workers > 0


def imported_digest(cfg: PipelineConfig) -> str | None:
    """The sha256 identifying an imported teacher: a changed model file makes the teacher
    stage run again, as a changed config does."""
    return imported.digest(cfg.teacher.import_from) if cfg.teacher.import_from else None


def import_teacher(run: RunDir, cfg: PipelineConfig, log: Log) -> tuple[list[Path], dict[str, Any]]:
    """The user's teacher instead of a trained one (`models.imported`): verified, checked
    against this run's data, scored on its test split and saved into the run (so the run's
    manifest records it)."""
    assert cfg.teacher.import_from is not None  # the stage imports only when it is set
    manifest, splits = load_splits(run, ("test",))
    got = imported.import_model(cfg.teacher.import_from, cfg.teacher.model, manifest["image_shape"],
                                manifest["num_classes"])
    test = evaluate(got.model, batches(*splits["test"], EVAL_BATCH))
    metrics = {**summarize(got.model, got.spec), "test_accuracy": test["accuracy"],
               "imported_from": str(got.source), "imported_weights_sha256": got.sha256, "epochs": 0}
    files = got.save(run.root / "teacher")
    atomic_write_json(run.root / "teacher" / "metrics.json", {**metrics, "history": []})
    log(f"[teacher] imported from {got.source}: {metrics['kind']}, test accuracy {test['accuracy']:.2%}")
    return [*files, run.root / "teacher" / "metrics.json"], metrics


def train_model(run: RunDir, cfg: PipelineConfig, which: str, log: Log) -> tuple[list[Path], dict[str, Any]]:
    """Train the teacher, the student alone, or the student distilled; save and score it."""
    if which == "teacher" and cfg.teacher.import_from:
        return import_teacher(run, cfg, log)
    # On Ray the workers read the training data themselves: the driver needs only the test split.
    manifest, splits = load_splits(run, data.SPLITS if cfg.ray.workers == 0 else ("test",))
    stage = cfg.stage_for(which)
    spec = make_spec(stage.model, manifest["image_shape"], manifest["num_classes"])
    teacher_dir = run.verify_file("teacher/arch.json").parent if which == "student" else None
    train_dir = "transfer" if teacher_dir and cfg.distill.transfer else "data"  # run-relative
    log(f"[{which}] {describe(summarize(build_model(spec), spec))}, {stage.train.epochs} epochs "
        + (f"on {cfg.ray.workers} Ray Train workers" if cfg.ray.workers else "in this process")
        + (f", distilled from the teacher ({_teaching(cfg)})" if teacher_dir else ""))
    with console.progress(f"[{which}]", stage.train.epochs, "epochs") as advance:
        on_epoch = epoch_lines(which, stage.train.epochs, advance)
        if cfg.ray.workers == 0:
            if train_dir != "data":  # the transfer set, its manifest verified against the run's
                transfer = run.verify_file(f"{train_dir}/manifest.json").parent
                splits = {**splits, "train": data.load_split(transfer, "train")}
            model, history = _train_here(cfg, which, spec, manifest, splits, teacher_dir, on_epoch)
        else:
            model, history = _train_on_ray(run, cfg, which, spec, manifest, teacher_dir, train_dir, on_epoch)
    test = evaluate(model, batches(*splits["test"], EVAL_BATCH))
    metrics = {**summarize(model, spec), "test_accuracy": test["accuracy"], "final_loss": history[-1]["loss"],
               "epochs": len(history), "workers": cfg.ray.workers, "parallelism": stage.train.parallelism,
               "restarts": restarts(history)}
    files = save_model(run.root / which, model, spec)
    atomic_write_json(run.root / which / "metrics.json", {**metrics, "history": history})
    log(f"[{which}] test accuracy {with_interval(test['accuracy'], len(splits['test'][1]))} on "
        f"{len(splits['test'][1])} images")
    return [*files, run.root / which / "metrics.json"], metrics


def _teaching(cfg: PipelineConfig) -> str:
    d = cfg.distill
    where = " on the transfer set" if d.transfer else ""
    if d.soft_only:
        return f"T={d.temperature}, the soft term alone: the student never sees a label{where}"
    return f"T={d.temperature}, alpha={d.alpha}{where}"


def restarts(history: list[dict]) -> list[dict]:
    """Where a training run resumed from a checkpoint: the epoch it resumed at, the checkpoint's
    epoch, and, after worker failures (a node lost), the failures and the last epoch reported
    before them; without failures the driver itself was restarted."""
    keys = ("epoch", "resumed_from", "worker_failures", "last_epoch_before")
    return [{k: h[k] for k in keys if k in h} for h in history if "resumed_from" in h]


def cache_logits(run: RunDir, cfg: PipelineConfig, log: Log) -> tuple[list[Path], dict[str, Any]]:
    """The teacher's logits for every training image, once, with Ray Data (see training.logits_cache)."""
    from distillery.training.logits_cache import cache_teacher_logits  # the core never imports ray

    manifest, _ = load_splits(run, ())
    run.verify_file("teacher/arch.json")
    files = cache_teacher_logits(cfg, run, manifest["image_shape"])
    log(f"[teacher_logits] {manifest['counts']['train']['total']} rows -> "
        f"{run.location_of('teacher_logits')}")
    return files, {"files": len(files)}


def _train_here(cfg: PipelineConfig, which: str, spec: dict, manifest: dict, splits: dict,
                teacher_dir: Path | None,
                on_epoch: Callable[[dict], None]) -> tuple[torch.nn.Module, list[dict]]:
    """The same loop in this process, without Ray (`ray.workers: 0`): quick tests, debugging."""
    tcfg = cfg.stage_for(which).train
    seed_everything(cfg.seed)  # the initial weights too, not only the data order
    model = build_model(spec)
    device = pick_device(cfg.ray.use_gpu)
    teacher = frozen_teacher(teacher_dir, device) if teacher_dir is not None else None
    goal = objective(model, tcfg, cfg.distill, teacher=teacher, image_shape=manifest["image_shape"],
                     num_classes=manifest["num_classes"])
    history = fit(goal.model, splits["train"], splits["val"], tcfg, seed=cfg.seed,
                  flip=manifest["flips_keep_class"], device=device, loss_fn=goal.loss_fn,
                  make_target=goal.make_target, on_epoch=on_epoch)
    return model.cpu().eval(), history


def _train_on_ray(run: RunDir, cfg: PipelineConfig, which: str, spec: dict, manifest: dict,
                  teacher_dir: Path | None, train_dir: str,
                  on_epoch: Callable[[dict], None]) -> tuple[torch.nn.Module, list[dict]]:
    from distillery.training.on_ray import fit_on_ray  # the core never imports ray

    train_manifest = data.read_manifest(run.verify_file(f"{train_dir}/manifest.json").parent)
    rows = train_manifest["counts"]["train"]["total"]
    record = run.stage(which)
    job = TrainJob(which=which, spec=spec, train=cfg.stage_for(which).train,
                   image_shape=manifest["image_shape"], flip=manifest["flips_keep_class"],
                   train_rows=rows, teacher_dir="teacher" if teacher_dir else None, train_split_dir=train_dir)
    if which == "student" and uses_logit_cache(cfg):
        rels = run.stage("teacher_logits")["files"]
        job = job.model_copy(update={"teacher_dir": None,
                                     "train_files": [rel for rel in rels if run.verify_file(rel)]})
    # One Ray Train run per stage attempt: a crashed attempt resumes from its checkpoints,
    # a new attempt (changed config, --force) starts clean.
    name = f"{which}-{record['fingerprint']}-{record['attempt']}"
    state, history = fit_on_ray(job, cfg, run, name=name, on_epoch=on_epoch)
    if which == "student" and cfg.distill.hints:  # trained wrapped with its adapters: keep the student
        state = {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}
    model = build_model(spec)
    model.load_state_dict(state)
    return model.eval(), history


def evaluate_run(run: RunDir, cfg: PipelineConfig, log: Log) -> tuple[list[Path], dict[str, Any]]:
    """Reload every trained model from disk (verifying it), score it on val and test, and say
    what share of the teacher-student gap distillation closed."""
    _, splits = load_splits(run, ("val", "test"))
    models, correct = {}, {}
    for which in cfg.trained:
        run.verify_file(f"{which}/arch.json")
        model, arch = artifacts.load(run.root / which)
        scores = {split: evaluate(model, batches(*splits[split], EVAL_BATCH)) for split in ("val", "test")}
        with torch.inference_mode():
            correct[which] = model(splits["test"][0]).argmax(1) == splits["test"][1]
        models[which] = {**summarize(model, arch["spec"]),
                         "weights_bytes": (run.root / which / arch["weights"]).stat().st_size,
                         **{f"{split}_accuracy": s["accuracy"] for split, s in scores.items()}}
    results = {"models": models, "distillation": distillation_gain(models, correct)}
    atomic_write_json(run.root / "results.json", results)
    atomic_write_bytes(run.root / "results.md", results_table(results).encode())
    log(results_table(results))
    return [run.root / "results.json", run.root / "results.md"], results
