"""The compress stage: build every variant of `compress.variants`, then measure them all.

Each variant starts from its parent (the distilled student, the teacher, or an earlier
variant) and runs its steps in order: prune -> fine-tune (Ray Train, distilled from the
teacher) -> quantize. It is saved (`compression.store`), reloaded from disk, and only the
reloaded model is scored and timed: the numbers are those of what would be served. The
teacher and both students are timed the same way, and `frontier` draws the trade-off.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distillery.compression import prune, quantize, store
from distillery.compression.recipe import BASE_MODELS, Finetune, Int8Static, VariantConfig
from distillery.config import PipelineConfig, TrainConfig
from distillery.errors import UserError
from distillery.files import atomic_write_json, read_json
from distillery.measure import frontier, timing
from distillery.models.architectures import build_model, count_macs, count_params
from distillery.models.artifact import load_model
from distillery.run.rundir import RunDir
from distillery.training.job import TrainJob
from distillery.training.loop import batches, evaluate, fit, progress_line
from distillery.training.objective import objective

Log = Callable[[str], None]
ROLES = {"teacher": "teacher", "student": "student", "student_scratch": "student_scratch"}
PARENT_OF = {"teacher": None, "student": "teacher", "student_scratch": "teacher"}


@dataclass
class Context:
    """What every variant step reads: the run, its config and data, the frozen teacher."""

    run: RunDir
    cfg: PipelineConfig
    log: Log
    in_shape: list[int]
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]
    teacher: nn.Module
    fingerprint: str
    attempt: int


@dataclass
class Built:
    """A variant as saved: its folder's files, the fp32 model it came from, what was done."""

    files: list[Path]
    fp32: nn.Module
    details: list[dict[str, Any]]


def compress_run(run: RunDir, cfg: PipelineConfig, log: Log, splits: dict, manifest: dict) -> tuple[list[Path], dict]:
    record = run.stage("compress")
    teacher, _ = load_model(run.verify_file("teacher/arch.json").parent)
    ctx = Context(run, cfg, log, manifest["image_shape"], splits, teacher.requires_grad_(False),
                  record["fingerprint"], record["attempt"])
    built = {v.name: build(ctx, v) for v in cfg.compress.variants}
    settings = timing.BenchSettings(**cfg.compress.bench.model_dump(exclude={"modes"}))
    records = measure_all(ctx, settings, built)
    margin = cfg.compress.speedup_margin
    for rec in records.values():
        parent = records.get(rec["parent"]) if rec["parent"] else None
        rec["not_faster"] = parent is not None and not timing.is_faster(rec, parent, min_gain=margin)
    files = []
    for v in cfg.compress.variants:
        folder = built[v.name].files[0].parent
        atomic_write_json(folder / "metrics.json", records[v.name])
        files += [*built[v.name].files, folder / "metrics.json"]
    floor = records["teacher"]["test_accuracy"] - cfg.compress.floor_below_teacher
    files += frontier.write_frontier(run.root, list(records.values()), floor=floor, machine=timing.machine_info(),
                                     settings={**asdict(settings), "modes": cfg.compress.bench.modes}, margin=margin)
    best = frontier.recommend(list(records.values()), floor, margin)
    log(f"[compress] recommended: {best['reason'] if best else 'nothing meets the accuracy floor'}")
    return files, {"variants": len(built), "recommended": best["name"] if best else None, "floor": floor}


def measure_all(ctx: Context, settings: timing.BenchSettings, built: dict[str, Built]) -> dict[str, dict[str, Any]]:
    """The trained models and every variant as reloaded from disk, scored and timed. Timed only
    once everything is built, one after another: no training in between competes for the
    cores, and a parent and its child are measured minutes apart at most."""
    records = {}
    for name in ROLES:
        model, arch = load_model(ctx.run.verify_file(f"{name}/arch.json").parent)
        size = (ctx.run.root / name / arch["weights"]).stat().st_size
        records[name] = {**measure(ctx, settings, name, ROLES[name], PARENT_OF[name], name, model, model, size),
                         "numerics": "fp32"}
    for v in ctx.cfg.compress.variants:
        b = built[v.name]
        model, _ = store.load_variant(b.files[0].parent)  # score what is on disk
        rec = measure(ctx, settings, v.name, "variant", v.parent, v.describe(), model, b.fp32,
                      b.files[0].stat().st_size, int8=v.steps[-1].kind == "int8_static")
        records[v.name] = {**rec, "steps": b.details, "numerics": v.numerics() or records[v.parent]["numerics"]}
    return records


def check_recipes(variants: list[VariantConfig], bases: dict[str, nn.Module], in_shape: list[int]) -> None:
    """Everything checkable against the models, before any work: layer names, reachable MAC
    ratios, group sizes, and no step on top of a quantized variant. Channel pruning is dry-run
    on a copy (cheap, and only trying tells whether a ratio is reachable), so the steps after
    it, and the variants built on it, are checked against the widths it leaves."""
    shapes = dict(bases)  # name -> a model of that variant's widths
    quantized = set()
    for v in variants:
        if v.parent in quantized:
            raise UserError(f"compress.variants.{v.name}: parent {v.parent!r} is quantized; build on its fp32 parent")
        model = copy.deepcopy(shapes[v.parent])
        try:
            for step in v.steps:
                if step.kind in ("prune_unstructured", "prune_channels"):
                    prune.check_layers(model, step.exclude, f"{step.kind}.exclude")
                if step.kind == "prune_channels":
                    prune.prune_channels(model, step, in_shape)
                if step.kind == "weight_only":
                    quantize.check_weight_only(model, step)
        except UserError as e:
            raise UserError(f"compress.variants.{v.name}: {e}") from None
        shapes[v.name] = model
        if v.steps[-1].kind in ("int8_dynamic", "int8_static", "weight_only"):
            quantized.add(v.name)


def check_run(run: RunDir, cfg: PipelineConfig) -> None:
    """`check_recipes` against this run's trained models: before the stage starts, so a
    refused recipe leaves the run's finished compress stage as it was."""
    manifest = read_json(run.verify_file("data/manifest.json"))
    bases = {name: load_model(run.verify_file(f"{name}/arch.json").parent)[0] for name in ROLES}
    check_recipes(cfg.compress.variants, bases, manifest["image_shape"])


# ---------------------------------------------------------------- building


def build(ctx: Context, v: VariantConfig) -> Built:
    """Run the variant's steps on a copy of its parent and save the result."""
    folder = ctx.run.root / "variants" / v.name
    parent, spec = _parent(ctx, v.parent)
    model, details, gradual = copy.deepcopy(parent), [], None
    base_shapes = prune.layer_shapes(build_model(spec))
    ctx.log(f"[compress] {v.name}: {v.describe()}")
    for i, step in enumerate(v.steps):
        following = v.steps[i + 1].kind if i + 1 < len(v.steps) else None
        if step.kind == "prune_unstructured" and following == "finetune":
            gradual = step  # reached during fine-tuning, not at once
            details.append({"kind": step.kind, "gradual": True})
        elif step.kind == "prune_unstructured":
            prune.prune_unstructured(model, step)
            details.append({"kind": step.kind, "layers": prune.sparsity_report(model)})
        elif step.kind == "prune_channels":
            before = count_macs(model, ctx.in_shape)
            prune.prune_channels(model, step, ctx.in_shape)
            after = count_macs(model, ctx.in_shape)
            details.append({"kind": step.kind, "macs_before": before, "macs_after": after,
                            "mac_ratio": round(before / after, 3), "layers": prune.layer_shapes(model)})
        elif step.kind == "finetune":
            model = finetune(ctx, v.name, model, spec, step, gradual, folder)
            details.append({"kind": step.kind, "val_accuracy": _accuracy(model, ctx.splits["val"]),
                            **({"layers": prune.sparsity_report(model)} if gradual else {})})
        elif step.kind == "int8_static":
            files, detail = _static_int8(ctx, model, step, folder, spec, base_shapes)
            return Built(files, model, [*details, detail])
        else:  # int8_dynamic, weight_only: torchao's quantize_
            if step.kind == "weight_only":
                quantize.check_weight_only(model, step)
            quantized = quantize.apply_torchao(copy.deepcopy(model), step)
            return Built(store.save_torchao(folder, quantized, spec, base_shapes, step), model, [*details, {"kind": step.kind}])
    return Built(store.save_dense(folder, model, spec, base_shapes), model, details)


def _parent(ctx: Context, name: str) -> tuple[nn.Module, dict]:
    """The parent's fp32 model and the spec of the base model it descends from."""
    if name in BASE_MODELS:
        model, arch = load_model(ctx.run.verify_file(f"{name}/arch.json").parent)
    else:
        model, arch = store.load_variant(ctx.run.root / "variants" / name)
    return model, arch["spec"]


def finetune(ctx: Context, name: str, model: nn.Module, spec: dict, step: Finetune,
             gradual: prune.PruneUnstructured | None, folder: Path) -> nn.Module:
    """Fine-tune the pruned model, distilled from the teacher; on Ray Train unless
    `ray.workers` is 0. Gradual unstructured pruning keeps raising the sparsity meanwhile."""
    tcfg = TrainConfig(epochs=step.epochs, lr=step.lr, batch_size=step.batch_size, schedule="cosine", augment=False)
    if ctx.cfg.ray.workers == 0:
        return _finetune_here(ctx, name, model, tcfg, step, gradual)
    from distillery.training.on_ray import fit_on_ray  # the core never imports ray

    init = folder / "pruned"  # the workers' starting point, verified when they load it
    store.save_dense(init, model, spec, prune.layer_shapes(build_model(spec)))
    job = TrainJob(which=f"finetune:{name}", spec=spec, train=tcfg, image_shape=ctx.in_shape,
                   train_rows=len(ctx.splits["train"][0]), init_dir=str(init.relative_to(ctx.run.root)),
                   teacher_dir="teacher" if step.distill else None, hints=False, prune=gradual)
    state, _ = fit_on_ray(job, ctx.cfg, ctx.run, name=f"finetune-{name}-{ctx.fingerprint}-{ctx.attempt}")
    model.load_state_dict(state)
    return model.eval()


def _finetune_here(ctx: Context, name: str, model: nn.Module, tcfg: TrainConfig, step: Finetune,
                   gradual: prune.PruneUnstructured | None) -> nn.Module:
    sparsity = prune.GradualSparsity(model, gradual, tcfg.epochs) if gradual else None
    goal = objective(model, tcfg, ctx.cfg.distill, teacher=ctx.teacher if step.distill else None, hints=False)
    fit(model, ctx.splits["train"], ctx.splits["val"], tcfg, seed=ctx.cfg.seed, loss_fn=goal.loss_fn,
        make_target=goal.make_target,
        on_epoch=lambda m: ctx.log(progress_line(f"finetune:{name}", tcfg.epochs, m)),
        on_epoch_start=sparsity.start_epoch if sparsity else lambda epoch: None,
        after_step=sparsity.after_step if sparsity else None)
    return model.eval()


def _static_int8(ctx: Context, model: nn.Module, step: Int8Static, folder: Path, spec: dict,
                 base_shapes: dict) -> tuple[list[Path], dict]:
    """Post-training int8; quantization-aware training instead when PTQ loses more than
    `max_drop` validation accuracy (and the model has no batch norm to fold)."""
    x, _ = ctx.splits["train"]
    sample = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(ctx.cfg.seed))[:step.calibration_samples]]
    prepared = quantize.prepare(copy.deepcopy(model), ctx.in_shape)
    quantize.calibrate(prepared, sample)
    parent_acc = _accuracy(model, ctx.splits["val"])
    ptq_acc = _accuracy(quantize.convert(copy.deepcopy(prepared)), ctx.splits["val"])
    detail = {"kind": step.kind, "method": "ptq", "calibration_samples": len(sample),
              "parent_val_accuracy": parent_acc, "ptq_val_accuracy": ptq_acc}
    fp32, qat = model, False
    if parent_acc - ptq_acc > step.max_drop:
        if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
            detail["qat"] = "skipped: quantization-aware training here supports models without batch norm"
        else:
            fp32, prepared = _qat(ctx, model, step)
            qat = True
            detail.update(method="qat", qat_epochs=step.qat_epochs)
    return store.save_pt2e(folder, fp32, prepared, spec, base_shapes, qat=qat), detail


def _qat(ctx: Context, model: nn.Module, step: Int8Static) -> tuple[nn.Module, torch.fx.GraphModule]:
    """Fine-tune with fake quantization in the graph (distilled from the teacher); return the
    plain model with the trained float weights copied back, and the trained graph."""
    fp32 = copy.deepcopy(model)
    prepared = quantize.prepare(copy.deepcopy(model), ctx.in_shape, qat=True)
    tcfg = TrainConfig(epochs=step.qat_epochs, lr=step.qat_lr, schedule="cosine", augment=False)
    ctx.log("[compress] post-training int8 lost more than allowed: quantization-aware training")
    goal = objective(prepared, tcfg, ctx.cfg.distill, teacher=ctx.teacher, hints=False)
    fit(prepared, ctx.splits["train"], ctx.splits["val"], tcfg, seed=ctx.cfg.seed, loss_fn=goal.loss_fn,
        make_target=goal.make_target,
        on_epoch=lambda m: ctx.log(progress_line("qat", tcfg.epochs, m)))
    trained = prepared.state_dict()
    fp32.load_state_dict({k: trained[k] for k in fp32.state_dict()})
    return fp32, prepared


# ---------------------------------------------------------------- measuring


def measure(ctx: Context, settings: timing.BenchSettings, name: str, role: str, parent: str | None, recipe: str,
            model: nn.Module, fp32: nn.Module, size_bytes: int, int8: bool = False) -> dict[str, Any]:
    """Accuracy on val and test, then speed in every configured mode (the fastest kept)."""
    macs = count_macs(fp32, ctx.in_shape)  # of the float structure: pruning shows, int8 does not change it
    acc = {f"{split}_accuracy": _accuracy(model, ctx.splits[split]) for split in ("val", "test")}
    speed = timing.measure(model, ctx.in_shape, macs, settings, ctx.cfg.compress.bench.modes, int8=int8)
    ctx.log(f"[compress] {name}: test {acc['test_accuracy']:.2%}, served {speed['best_mode']}: "
            f"p50 {speed['p50_ms']:.3f} ms at batch 1, {speed['throughput']:,.0f} images/s at batch {settings.throughput_batch}")
    return {"name": name, "role": role, "parent": parent, "recipe": recipe, **acc, "params": count_params(fp32),
            "macs": macs, "size_bytes": size_bytes, **speed}


def _accuracy(model: nn.Module, split: tuple[torch.Tensor, torch.Tensor]) -> float:
    return evaluate(model, batches(*split, 1024))["accuracy"]

