"""The stages of a run, in order, each skipped when its outputs exist and verify.

    data -> teacher -> student_scratch -> student -> evaluate -> compress -> serve -> report

`student_scratch` is the student trained alone, `student` the same network distilled from
the teacher; the evaluation reports what share of the teacher-student gap distillation
closed; `compress` turns the student (and the teacher) into pruned and quantized variants
and measures them all (`compression.stage`, `measure.frontier`); `serve` deploys the frontier
on Ray Serve and load-tests it over HTTP (`serving.deploy`, `loadtest.run`; left out with
`serve.enabled: false`); `report` writes report.md (`pipeline.report`). Each stage is a function `(run, cfg, log) -> (files,
metrics)`; `run_stages` wraps them with the bookkeeping (fingerprints, manifest status, skip
on re-run, `--force`). Training runs on Ray Train (`training.on_ray`), or in this process when
`ray.workers` is 0.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from distillery import console, data
from distillery.config import PipelineConfig
from distillery.data.sources import flips_keep_class
from distillery.errors import UserError
from distillery.files import atomic_write_bytes, atomic_write_json
from distillery.measure.accuracy import distillation_gain, results_table, with_interval
from distillery.models.architectures import build_model, describe, make_spec, summarize
from distillery.artifacts import imported
from distillery import artifacts
from distillery.artifacts import save_model
from distillery.pipeline import report
from distillery.roles import TRAINED
from distillery.run.rundir import RunDir, fingerprint
from distillery.training.job import TrainJob
from distillery.training.loop import batches, epoch_lines, evaluate, fit, pick_device, seed_everything
from distillery.training.objective import frozen_teacher, objective

Log = Callable[[str], None]
StageFn = Callable[[RunDir, PipelineConfig, Log], tuple[list[Path], dict[str, Any]]]
EVAL_BATCH = 1024
# What each stage reads. A stage that runs again makes everything downstream stale: a
# student distilled from an older teacher is not the one this teacher would give.
INPUTS = {"data": [], "transfer": ["data"], "teacher": ["data"], "teacher_logits": ["data", "teacher"],
          "student_scratch": ["data"], "student": ["data", "transfer", "teacher", "teacher_logits"], "evaluate": ["data", *TRAINED],
          "search": ["data", *TRAINED], "compress": ["data", *TRAINED, "search"], "serve": ["data", "compress"], "report": ["data", "evaluate", "compress", "serve"]}


def downstream(name: str) -> list[str]:
    direct = [stage for stage, inputs in INPUTS.items() if name in inputs]
    return direct + [d for stage in direct for d in downstream(stage) if d not in direct]


def fingerprints(cfg: PipelineConfig) -> dict[str, str]:
    """Each stage's fingerprint: the config it reads plus the fingerprints of its inputs."""
    workers = cfg.ray.model_dump(include={"workers", "use_gpu", "cpus_per_worker"})
    fp = {"data": fingerprint(cfg.data.model_dump(), cfg.seed)}
    fp["teacher"] = fingerprint(fp["data"], cfg.teacher.model_dump(), cfg.seed, workers, imported_digest(cfg))
    fp["teacher_logits"] = fingerprint(fp["teacher"])
    transfer = cfg.distill.transfer.model_dump() if cfg.distill.transfer else None
    fp["transfer"] = fingerprint(fp["data"], transfer, cfg.seed)
    fp["student_scratch"] = fingerprint(fp["data"], cfg.student.model_dump(), cfg.seed, workers)
    fp["student"] = fingerprint(fp["teacher"], cfg.student.model_dump(), cfg.distill.model_dump(), cfg.seed, workers,
                                *([fp["transfer"]] if transfer else []))
    fp["evaluate"] = fingerprint(*(fp[name] for name in TRAINED))
    fp["search"] = fingerprint(search_name(cfg, fp), cfg.search.budget.model_dump(), cfg.compress.bench.model_dump(),
                               cfg.compress.speedup_margin, fp["student"], fp["student_scratch"])
    fp["compress"] = fingerprint(*(fp[name] for name in TRAINED), cfg.compress.model_dump(), cfg.distill.model_dump(),
                                 cfg.seed, workers, *([fp["search"]] if cfg.search.enabled else []))
    fp["serve"] = fingerprint(fp["compress"], cfg.serve.model_dump(), cfg.loadtest.model_dump())
    fp["report"] = fingerprint(fp["evaluate"], fp["compress"], fp["serve"] if cfg.serve.enabled else None)
    return fp


def search_name(cfg: PipelineConfig, fp: dict[str, str]) -> str:
    """Tune's experiment: what the trials depend on. Not the budget, which only chooses among
    finished trials: a new budget re-measures and re-chooses, it does not re-train."""
    trials = cfg.search.model_dump(exclude={"budget", "enabled"})
    return "search-" + fingerprint(fp["teacher"], trials, cfg.student.train.model_dump(), cfg.seed)


def stage_functions(cfg: PipelineConfig) -> dict[str, StageFn]:
    """The stages of this config, in order (`teacher_logits` only when distillation reads a cache)."""
    train = lambda which: lambda run, cfg, log: train_model(run, cfg, which, log)  # noqa: E731
    cache = {"teacher_logits": cache_logits} if uses_logit_cache(cfg) else {}
    transfer = {"transfer": prepare_transfer} if cfg.distill.transfer else {}
    served = {"serve": serve_models} if cfg.serve.enabled else {}
    return {"data": prepare_data, **transfer, "teacher": train("teacher"), **cache,
            **{name: train(name) for name in TRAINED[1:]}, "evaluate": evaluate_run,
            **({"search": search_models} if cfg.search.enabled else {}), "compress": compress_models,
            **served, "report": write_report}


def uses_logit_cache(cfg: PipelineConfig) -> bool:
    # In-process training computes the teacher's logits per batch: no Ray Data stage to cache them.
    return cfg.distill.cache_teacher_logits and cfg.ray.workers > 0


def before_student(cfg: PipelineConfig) -> list[str]:
    """The stages the distilled student reads besides the data and the teacher, when configured."""
    return [name for name in ("transfer", "teacher_logits") if name in stage_functions(cfg)]


def run_stages(cfg: PipelineConfig, stages: list[str] | None = None, *, force: bool = False,
               log: Log = print) -> RunDir:
    """Run `stages` (default: all, in order); skip each one already done unless `force`."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        # A cluster job joins first: what cannot work across its machines (a local storage_path,
        # serving on loopback) is refused before a stage writes or runs anything.
        from distillery.cluster import ensure_ray

        ensure_ray(cfg)
    run = RunDir.open(cfg)
    logs = console.log_to(run.root / "logs" / "run.log").parent
    log(f"logs: {logs} (run.log: every line, epochs and variants included; ray/: Ray's own)")
    fps, functions = fingerprints(cfg), stage_functions(cfg)
    for name in stages or list(functions):
        if not force and run.is_done(name, fps[name]):
            log(f"[{name}] done already (outputs verified); --force redoes it")
            continue
        PRECHECKS.get(name, lambda run, cfg: None)(run, cfg)  # a refusal leaves the stage's record as it was
        attempt = run.start(name, fps[name], fresh=force)
        log(f"[{name}] running" + (f" (attempt {attempt})" if attempt > 1 else ""))
        start = time.perf_counter()
        try:
            files, metrics = functions[name](run, cfg, log)
        except BaseException as e:
            run.fail(name, f"{type(e).__name__}: {e}")
            raise
        run.finish(name, fps[name], files, {**metrics, "seconds": round(time.perf_counter() - start, 2)})
        run.mark_stale(downstream(name))
    return run


def prepare_data(run: RunDir, cfg: PipelineConfig, log: Log) -> tuple[list[Path], dict[str, Any]]:
    out = run.root / "data"
    manifest = data.prepare(cfg.data, out, seed=cfg.seed)
    counts = {split: manifest["counts"][split]["total"] for split in data.SPLITS}
    log(f"[data] {manifest['source']}: {counts} images of shape {manifest['image_shape']} -> {out}")
    if not counts["val"]:  # the test split only reports: without a validation split nothing can choose
        raise UserError("the validation split is empty: every choice (the accuracy floor, the recommended model, "
                        "cascade thresholds, the search, auto's ladder) is made on it; set data.val_fraction above 0 "
                        "or give the source's split column (or folders) val rows")
    skipped = manifest.get("skipped") or {}
    if skipped.get("count"):
        log(f"[data] skipped {skipped['count']} file(s) that are not readable images (listed in {out}/manifest.json), "
            f"e.g. {skipped['files'][0]}")
    files = [out / shard["path"] for shard in manifest["shards"]] + [out / "manifest.json"]
    return files, {"counts": counts, "image_shape": manifest["image_shape"], "num_classes": manifest["num_classes"]}


def prepare_transfer(run: RunDir, cfg: PipelineConfig, log: Log) -> tuple[list[Path], dict[str, Any]]:
    """The transfer set the student is distilled on (`distill.transfer`), as shards of its own."""
    out = run.root / "transfer"
    manifest = data.prepare_transfer(cfg.distill.transfer, out, cfg.seed, run.verify_file("data/manifest.json").parent)
    rows = manifest["counts"]["train"]["total"]
    left_out = manifest["left_out_held_out"]
    log(f"[transfer] {manifest['source']}: {rows} images, {'labeled' if manifest['labeled'] else 'without labels'}"
        + (f"; {left_out} left out: they are in the run's val/test splits" if left_out else ""))
    files = [out / shard["path"] for shard in manifest["shards"]] + [out / "manifest.json"]
    return files, {"rows": rows, "labeled": manifest["labeled"], "left_out_held_out": manifest["left_out_held_out"]}


def load_splits(run: RunDir, splits: tuple[str, ...] = data.SPLITS
                ) -> tuple[dict[str, Any], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The data manifest (verified against the run manifest) and the named splits as tensors."""
    data_dir = run.verify_file("data/manifest.json").parent
    return data.read_manifest(data_dir), {split: data.load_split(data_dir, split) for split in splits}


def imported_digest(cfg: PipelineConfig) -> str | None:
    """The sha256 identifying an imported teacher: a changed model file makes the teacher
    stage run again, as a changed config does."""
    return imported.digest(cfg.teacher.import_from) if cfg.teacher.import_from else None


def import_teacher(run: RunDir, cfg: PipelineConfig, log: Log) -> tuple[list[Path], dict[str, Any]]:
    """The user's teacher instead of a trained one (`models.imported`): verified, checked
    against this run's data, scored on its test split and saved into the run (so the run's
    manifest records it)."""
    manifest, splits = load_splits(run, ("test",))
    got = imported.import_model(cfg.teacher.import_from, cfg.teacher.model, manifest["image_shape"],
                                manifest["num_classes"])
    test = evaluate(got.model, batches(*splits["test"], EVAL_BATCH))
    metrics = {**summarize(got.model, got.spec), "test_accuracy": test["accuracy"], "imported_from": str(got.source),
               "imported_weights_sha256": got.sha256, "epochs": 0}
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
    log(f"[teacher_logits] {manifest['counts']['train']['total']} rows -> {run.location_of('teacher_logits')}")
    return files, {"files": len(files)}


def _train_here(cfg: PipelineConfig, which: str, spec: dict, manifest: dict, splits: dict,
                teacher_dir: Path | None, on_epoch: Callable[[dict], None]) -> tuple[torch.nn.Module, list[dict]]:
    """The same loop in this process, without Ray (`ray.workers: 0`): quick tests, debugging."""
    tcfg = cfg.stage_for(which).train
    seed_everything(cfg.seed)  # the initial weights too, not only the data order
    model = build_model(spec)
    device = pick_device(cfg.ray.use_gpu)
    teacher = frozen_teacher(teacher_dir, device) if teacher_dir is not None else None
    goal = objective(model, tcfg, cfg.distill, teacher=teacher, image_shape=manifest["image_shape"],
                     num_classes=manifest["num_classes"])
    history = fit(goal.model, splits["train"], splits["val"], tcfg, seed=cfg.seed, flip=_flips(manifest),
                  device=device, loss_fn=goal.loss_fn, make_target=goal.make_target,
                  on_epoch=on_epoch)
    return model.cpu().eval(), history


def _train_on_ray(run: RunDir, cfg: PipelineConfig, which: str, spec: dict, manifest: dict, teacher_dir: Path | None,
                  train_dir: str, on_epoch: Callable[[dict], None]) -> tuple[torch.nn.Module, list[dict]]:
    from distillery.training.on_ray import fit_on_ray  # the core never imports ray

    rows = data.read_manifest(run.verify_file(f"{train_dir}/manifest.json").parent)["counts"]["train"]["total"]
    record = run.stage(which)
    job = TrainJob(which=which, spec=spec, train=cfg.stage_for(which).train, image_shape=manifest["image_shape"],
                   flip=_flips(manifest), train_rows=rows, teacher_dir="teacher" if teacher_dir else None,
                   train_split_dir=train_dir)
    if which == "student" and uses_logit_cache(cfg):
        rels = run.stage("teacher_logits")["files"]
        job = job.model_copy(update={"teacher_dir": None, "train_files": [rel for rel in rels if run.verify_file(rel)]})
    # One Ray Train run per stage attempt: a crashed attempt resumes from its checkpoints,
    # a new attempt (changed config, --force) starts clean.
    name = f"{which}-{record['fingerprint']}-{record['attempt']}"
    state, history = fit_on_ray(job, cfg, run, name=name, on_epoch=on_epoch)
    if which == "student" and cfg.distill.hints:  # trained wrapped with its adapters: keep the student
        state = {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}
    model = build_model(spec)
    model.load_state_dict(state)
    return model.eval(), history


def _flips(manifest: dict) -> bool:
    # Horizontal flips suit natural images (CIFAR-10), not digits, where they change the class.
    return flips_keep_class(manifest["source"])


def evaluate_run(run: RunDir, cfg: PipelineConfig, log: Log) -> tuple[list[Path], dict[str, Any]]:
    """Reload every trained model from disk (verifying it), score it on val and test, and say
    what share of the teacher-student gap distillation closed."""
    _, splits = load_splits(run, ("val", "test"))
    models, correct = {}, {}
    for which in TRAINED:
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


def check_compress(run: RunDir, cfg: PipelineConfig) -> None:
    from distillery.compression.stage import check_run  # torchao and Torch-Pruning load only here

    check_run(run, cfg)


PRECHECKS = {"compress": check_compress}  # checks of a stage's config against its inputs, before it starts


def compress_models(run: RunDir, cfg: PipelineConfig, log: Log) -> tuple[list[Path], dict[str, Any]]:
    """Prune and quantize into the configured variants, measure them all, write the frontier."""
    from distillery.compression.stage import compress_run  # torchao and Torch-Pruning load only here

    manifest, splits = load_splits(run)
    return compress_run(run, cfg, log, splits, manifest)


def search_models(run: RunDir, cfg: PipelineConfig, log: Log) -> tuple[list[Path], dict[str, Any]]:
    """A Ray Tune search of distilled, compressed students under `search.budget`."""
    from distillery.search.stage import search_run  # Ray Tune loads only here

    manifest, splits = load_splits(run)
    return search_run(run, cfg, log, splits, manifest, search_name(cfg, fingerprints(cfg)))


def serve_models(run: RunDir, cfg: PipelineConfig, log: Log) -> tuple[list[Path], dict[str, Any]]:
    """Deploy the frontier on Ray Serve (autoscaled) and load-test it over HTTP."""
    from distillery.loadtest.run import lost_text, run_loadtest, summary  # Ray Serve loads only here
    from distillery.serving.deploy import deploy_run, write_serve_config  # Ray Serve loads only here

    config = write_serve_config(run.location, cfg, run.root / "serve" / "config.yaml")
    url, headers = deploy_run(run.location, cfg, log)
    files = run_loadtest(url.removesuffix("/v2"), run.root, cfg.loadtest, headers, run.root / "serve" / "loadtest",
                         console.detail, slo_ms=cfg.serve.auto_slo_ms)
    s = summary(files[0])
    log(f"[loadtest] {s['requests']:,} requests: {s['rejected_503']:,} refused under overload (503), {s['lost']:,} lost"
        f"{lost_text(s['lost_by_kind'])}; replicas {s['initial_replicas']} -> {s['peak_replicas']} in the ramp "
        f"-> {files[0].parent / 'loadtest.md'}")
    return [config, *files], {"url": url, **s}


def write_report(run: RunDir, cfg: PipelineConfig, log: Log) -> tuple[list[Path], dict[str, Any]]:
    files = report.write(run.root, cfg, run.manifest(), run.address)
    log(f"[report] {files[0]}")
    return files, {}


def require_done(cfg: PipelineConfig, names: list[str]) -> None:
    """Refuse to go on unless `names` finished with the current config and still verify."""
    run, fps = RunDir.at(cfg), fingerprints(cfg)
    if run.remote:
        run.refresh()
    missing = [n for n in names if not run.manifest_path.exists() or not run.is_done(n, fps[n])]
    if missing:
        raise UserError(f"{run.root}: stage(s) {', '.join(missing)} not done for this config; "
                        "run `distillery train` (or `distillery run`) first")
