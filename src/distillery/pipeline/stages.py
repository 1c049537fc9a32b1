"""The stages of a run, in order, each skipped when its outputs exist and verify.

    data -> teacher -> student_scratch -> student -> evaluate -> compress -> serve -> report

(`student_scratch`, the baseline, only with `distill.baseline`: `PipelineConfig.trained`.)

Each stage lives with its layer: `data.stage` (data, transfer), `training.stage` (teacher,
student_scratch, student, teacher_logits, evaluate), `search.stage`, `compression.stage`,
`loadtest.stage` (serve: deploy, then load-test) and `pipeline.report`. Each is a function
`(run, cfg, log) -> (files, metrics)`; this module only orders them and keeps the books
(fingerprints, manifest status, skip on re-run, `--force`, what a re-run makes stale).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from distillery.config import PipelineConfig
from distillery.core import console
from distillery.core.errors import UserError
from distillery.core.roles import TRAINED
from distillery.data import stage as data_stage
from distillery.data.stage import load_splits
from distillery.pipeline import report
from distillery.run.rundir import RunDir, fingerprint
from distillery.training import stage as training_stage
from distillery.training.stage import imported_digest

Log = Callable[[str], None]
StageFn = Callable[[RunDir, PipelineConfig, Log], tuple[list[Path], dict[str, Any]]]
# What each stage reads. A stage that runs again makes everything downstream stale: a
# student distilled from an older teacher is not the one this teacher would give.
INPUTS = {"data": [], "transfer": ["data"], "teacher": ["data"], "teacher_logits": ["data", "teacher"],
          "student_scratch": ["data"], "student": ["data", "transfer", "teacher", "teacher_logits"],
          "evaluate": ["data", *TRAINED], "search": ["data", *TRAINED],
          "compress": ["data", *TRAINED, "search"], "serve": ["data", "compress"],
          "report": ["data", "evaluate", "compress", "serve"]}


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
    # What distillation does, not whether the baseline is trained beside it (`trained` says that)
    distill = cfg.distill.model_dump(exclude={"baseline"})
    fp["student"] = fingerprint(fp["teacher"], cfg.student.model_dump(), distill, cfg.seed,
                                workers, *([fp["transfer"]] if transfer else []))
    fp["evaluate"] = fingerprint(*(fp[name] for name in cfg.trained))
    fp["search"] = fingerprint(search_name(cfg, fp), cfg.search.budget.model_dump(),
                               cfg.compress.bench.model_dump(), cfg.compress.speedup_margin, fp["student"],
                               fp["student_scratch"])
    fp["compress"] = fingerprint(*(fp[name] for name in cfg.trained), cfg.compress.model_dump(),
                                 distill, cfg.seed, workers,
                                 *([fp["search"]] if cfg.search.enabled else []))
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
    # Looked up at each call, so a test can stand in for a stage's function.
    train = lambda which: lambda run, cfg, log: training_stage.train_model(run, cfg, which, log)  # noqa: E731
    cache = {"teacher_logits": training_stage.cache_logits} if training_stage.uses_logit_cache(cfg) else {}
    transfer = {"transfer": data_stage.prepare_transfer} if cfg.distill.transfer else {}
    served = {"serve": serve_models} if cfg.serve.enabled else {}
    return {"data": data_stage.prepare_data, **transfer, "teacher": train("teacher"), **cache,
            **{name: train(name) for name in cfg.trained[1:]}, "evaluate": training_stage.evaluate_run,
            **({"search": search_models} if cfg.search.enabled else {}), "compress": compress_models,
            **served, "report": write_report}


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
        from distillery.run.cluster import ensure_ray

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


def serve_models(run: RunDir, cfg: PipelineConfig, log: Log) -> tuple[list[Path], dict[str, Any]]:
    from distillery.loadtest.stage import serve_models as serve  # Ray Serve loads only here

    return serve(run, cfg, log)


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
