"""The stages of a run, in order, each skipped when its outputs exist and verify.

    data -> teacher -> student -> evaluate

Each stage is a function `(run, cfg, log) -> (files, metrics)`; `run_stages` wraps them
with the bookkeeping (fingerprints, manifest status, skip on re-run, `--force`).
Training here runs in-process; the Ray Train stages replace the train step, not this file's shape.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from distillery import data
from distillery.artifacts import atomic_write_bytes, atomic_write_json, load_model, save_model
from distillery.config import PipelineConfig
from distillery.errors import UserError
from distillery.models import build_model, make_spec, summarize
from distillery.rundir import RunDir, fingerprint
from distillery.training import batches, evaluate, fit, seed_everything

Log = Callable[[str], None]
StageFn = Callable[[RunDir, PipelineConfig, Log], tuple[list[Path], dict[str, Any]]]
MODELS = ("teacher", "student")
EVAL_BATCH = 1024


def fingerprints(cfg: PipelineConfig) -> dict[str, str]:
    """Each stage's fingerprint: the config it reads plus the fingerprints of its inputs."""
    fp = {"data": fingerprint(cfg.data.model_dump(), cfg.seed)}
    for name in MODELS:
        fp[name] = fingerprint(fp["data"], getattr(cfg, name).model_dump(), cfg.seed)
    fp["evaluate"] = fingerprint(*(fp[name] for name in MODELS))
    return fp


def stage_functions() -> dict[str, StageFn]:
    return {
        "data": prepare_data,
        "teacher": lambda run, cfg, log: train_model(run, cfg, "teacher", log),
        "student": lambda run, cfg, log: train_model(run, cfg, "student", log),
        "evaluate": evaluate_run,
    }


def run_stages(cfg: PipelineConfig, stages: list[str] | None = None, *, force: bool = False,
               log: Log = print) -> RunDir:
    """Run `stages` (default: all, in order); skip each one already done unless `force`."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = RunDir.open(cfg)
    fps, functions = fingerprints(cfg), stage_functions()
    for name in stages or list(functions):
        if not force and run.is_done(name, fps[name]):
            log(f"[{name}] done already (outputs verified); --force redoes it")
            continue
        log(f"[{name}] running")
        run.start(name, fps[name])
        start = time.perf_counter()
        try:
            files, metrics = functions[name](run, cfg, log)
        except BaseException as e:
            run.fail(name, f"{type(e).__name__}: {e}")
            raise
        run.finish(name, fps[name], files, {**metrics, "seconds": round(time.perf_counter() - start, 2)})
    return run


def prepare_data(run: RunDir, cfg: PipelineConfig, log: Log) -> tuple[list[Path], dict[str, Any]]:
    out = run.root / "data"
    manifest = data.prepare(cfg.data, out, seed=cfg.seed)
    counts = {split: manifest["counts"][split]["total"] for split in data.SPLITS}
    log(f"[data] {manifest['source']}: {counts} images of shape {manifest['image_shape']} -> {out}")
    files = [out / shard["path"] for shard in manifest["shards"]] + [out / "manifest.json"]
    return files, {"counts": counts, "image_shape": manifest["image_shape"], "num_classes": manifest["num_classes"]}


def load_splits(run: RunDir) -> tuple[dict[str, Any], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The data manifest (verified against the run manifest) and every split as tensors."""
    data_dir = run.verify_file("data/manifest.json").parent
    return data.read_manifest(data_dir), {split: data.load_split(data_dir, split) for split in data.SPLITS}


def train_model(run: RunDir, cfg: PipelineConfig, which: str, log: Log) -> tuple[list[Path], dict[str, Any]]:
    """Train the teacher or the student alone, save it, and score it on the test split."""
    manifest, splits = load_splits(run)
    stage = getattr(cfg, which)
    spec = make_spec(stage.model, manifest["image_shape"], manifest["num_classes"])
    seed_everything(cfg.seed)  # the initial weights too, not only the data order
    model = build_model(spec)
    log(f"[{which}] {summarize(model, spec)}")
    # Horizontal flips suit natural images (CIFAR-10), not digits, where they change the class.
    history = fit(model, splits["train"], splits["val"], stage.train, seed=cfg.seed,
                  flip=manifest["source"] == "cifar10", on_epoch=_progress(which, stage.train.epochs, log))
    test = evaluate(model, batches(*splits["test"], EVAL_BATCH))
    metrics = {**summarize(model, spec), "test_accuracy": test["accuracy"],
               "final_loss": history[-1]["loss"], "epochs": len(history)}
    files = save_model(run.root / which, model, spec)
    atomic_write_json(run.root / which / "metrics.json", {**metrics, "history": history})
    log(f"[{which}] test accuracy {test['accuracy']:.2%}")
    return [*files, run.root / which / "metrics.json"], metrics


def _progress(which: str, epochs: int, log: Log) -> Callable[[dict], None]:
    def show(m: dict) -> None:
        val = f"  val_acc {m['val_accuracy']:.2%}" if "val_accuracy" in m else ""
        log(f"[{which}] epoch {m['epoch']}/{epochs}  loss {m['loss']:.4f}{val}  {m['samples_per_s']:,.0f} samples/s")
    return show


def evaluate_run(run: RunDir, cfg: PipelineConfig, log: Log) -> tuple[list[Path], dict[str, Any]]:
    """Reload every trained model from disk (verifying it) and score it on val and test."""
    _, splits = load_splits(run)
    results = {}
    for which in MODELS:
        run.verify_file(f"{which}/arch.json")
        model, arch = load_model(run.root / which)
        scores = {split: evaluate(model, batches(*splits[split], EVAL_BATCH)) for split in ("val", "test")}
        results[which] = {**summarize(model, arch["spec"]),
                          "weights_bytes": (run.root / which / arch["weights"]).stat().st_size,
                          **{f"{split}_accuracy": s["accuracy"] for split, s in scores.items()}}
    atomic_write_json(run.root / "results.json", results)
    atomic_write_bytes(run.root / "results.md", results_table(results).encode())
    log(results_table(results))
    return [run.root / "results.json", run.root / "results.md"], results


def results_table(results: dict[str, dict[str, Any]]) -> str:
    rows = ["| model | params | MACs | weights (KiB) | val acc | test acc |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['params']:,} | {r['macs']:,} | {r['weights_bytes'] / 1024:,.1f} "
                    f"| {r['val_accuracy']:.2%} | {r['test_accuracy']:.2%} |")
    return "\n".join(rows) + "\n"


def require_done(cfg: PipelineConfig, names: list[str]) -> None:
    """Refuse to go on unless `names` finished with the current config and still verify."""
    run, fps = RunDir(Path(cfg.storage_path) / cfg.name), fingerprints(cfg)
    missing = [n for n in names if not run.manifest_path.exists() or not run.is_done(n, fps[n])]
    if missing:
        raise UserError(f"{run.root}: stage(s) {', '.join(missing)} not done for this config; "
                        "run `distillery train` (or `distillery run`) first")
