"""What each compression step does, one handler per step kind, in `HANDLERS`.

A handler has two halves: `check` dry-runs the step on a copy of the parent before any work
(layer names, reachable ratios, backend limits), so a refused recipe costs nothing; `apply`
runs it on the variant in the making and returns the saved files when the step is the one
that writes the variant (quantization: it is the last step), else None. Steps that leave
fp32 weights end with `artifacts.save_dense`.

A new compression method is one config class in `config/compress.py` (added to its `Step`) and
one `@handler(kind, check=...)` function here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from distillery import artifacts
from distillery.compression import cascade, prune
from distillery.config import PipelineConfig, TrainConfig
from distillery.config.compress import (
    Cascade,
    Finetune,
    Int8Dynamic,
    Int8Static,
    PruneChannels,
    PruneUnstructured,
    Step,
    WeightOnly,
)
from distillery.core import console
from distillery.core.errors import NotApplicable, UserError
from distillery.core.roles import TRAINED
from distillery.models import quantized as quantize
from distillery.models.architectures import build_model, count_macs
from distillery.run.rundir import RunDir
from distillery.training.job import TrainJob
from distillery.training.loop import batches, epoch_lines, evaluate, fit, progress_line
from distillery.training.objective import objective

Log = Callable[[str], None]


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
    # {model: per-test-image correctness}: for the report's paired comparisons, never a choice
    test_outcomes: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Built:
    """A variant as saved: its folder's files, the fp32 model it came from, what was done."""

    files: list[Path]
    fp32: nn.Module
    details: list[dict[str, Any]]


@dataclass
class Work:
    """A variant in the making: its fp32 model so far and what each step recorded."""

    name: str
    parent: str
    folder: Path
    spec: dict  # of the base model it descends from
    base_shapes: dict
    model: nn.Module
    details: list[dict[str, Any]] = field(default_factory=list)
    next_kind: str | None = None  # the kind of the step after this one
    gradual: PruneUnstructured | None = None  # sparsity reached while fine-tuning


class Handler(NamedTuple):
    apply: Callable[[Context, Work, Any], list[Path] | None]
    check: Callable[[nn.Module, Any, list[int]], None]  # may change the model: it gets a copy


HANDLERS: dict[str, Handler] = {}


def handler(kind: str, *,
            check: Callable[[nn.Module, Any, list[int]], None] = lambda model, step, shape: None):
    def register(apply: Callable[[Context, Work, Any], list[Path] | None]) -> Callable:
        HANDLERS[kind] = Handler(apply, check)
        return apply
    return register


def _check_exclude(model: nn.Module, step: PruneUnstructured | PruneChannels, in_shape: list[int]) -> None:
    prune.check_layers(model, step.exclude, f"{step.kind}.exclude")


def _check_channels(model: nn.Module, step: PruneChannels, in_shape: list[int]) -> None:
    _check_exclude(model, step, in_shape)
    unpruned = copy.deepcopy(model)
    try:
        prune.prune_channels(model, step, in_shape)  # only trying tells whether a ratio is reachable
        # What a fresh process does to reload it: the unpruned structure resized to the recorded sizes.
        prune.resize(unpruned, prune.layer_shapes(model)).load_state_dict(model.state_dict())
    except UserError:
        raise
    except Exception as e:  # Torch-Pruning or the rebuild meeting a layer they do not handle
        raise NotApplicable(f"channel pruning does not apply to this {type(model).__name__}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0]}") from None


def _check_int8_static(model: nn.Module, step: Int8Static, in_shape: list[int]) -> None:
    try:
        quantize.prepare(model, in_shape)  # export and annotate: where an architecture fails
    except Exception as e:
        raise NotApplicable(f"PT2E int8 (x86 quantizer) does not apply to this {type(model).__name__}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0]}") from None


@handler("prune_unstructured", check=_check_exclude)
def _prune_unstructured(ctx: Context, work: Work, step: PruneUnstructured) -> None:
    if work.next_kind == "finetune":
        work.gradual = step  # reached during fine-tuning, not at once
        work.details.append({"kind": step.kind, "gradual": True})
        return
    prune.prune_unstructured(work.model, step)
    work.details.append({"kind": step.kind, "layers": prune.sparsity_report(work.model)})


@handler("prune_channels", check=_check_channels)
def _prune_channels(ctx: Context, work: Work, step: PruneChannels) -> None:
    before = count_macs(work.model, ctx.in_shape)
    prune.prune_channels(work.model, step, ctx.in_shape)
    after = count_macs(work.model, ctx.in_shape)
    work.details.append({"kind": step.kind, "macs_before": before, "macs_after": after,
                         "mac_ratio": round(before / after, 3), "layers": prune.layer_shapes(work.model)})


@handler("finetune")
def _finetune(ctx: Context, work: Work, step: Finetune) -> None:
    work.model = finetune(ctx, work.name, work.model, work.spec, step, work.gradual, work.folder)
    work.details.append({"kind": step.kind, "val_accuracy": accuracy(work.model, ctx.splits["val"]),
                         **({"layers": prune.sparsity_report(work.model)} if work.gradual else {})})


@handler("int8_static", check=_check_int8_static)
def _int8_static(ctx: Context, work: Work, step: Int8Static) -> list[Path]:
    files, detail = _static_int8(ctx, work.model, step, work.folder, work.spec, work.base_shapes)
    work.details.append(detail)
    return files


@handler("int8_dynamic")
def _int8_dynamic(ctx: Context, work: Work, step: Int8Dynamic) -> list[Path]:
    quantized = quantize.apply_torchao(copy.deepcopy(work.model), step)  # torchao's quantize_
    work.details.append({"kind": step.kind})
    return artifacts.save_torchao(work.folder, quantized, work.spec, work.base_shapes, step)


@handler("weight_only", check=lambda model, step, in_shape: quantize.check_weight_only(model, step))
def _weight_only(ctx: Context, work: Work, step: WeightOnly) -> list[Path]:
    quantize.check_weight_only(work.model, step)
    return _int8_dynamic(ctx, work, step)


@handler("cascade")
def _cascade(ctx: Context, work: Work, step: Cascade) -> list[Path]:
    """Choose the threshold on the validation split, then save both members with it."""
    large, _ = artifacts.load(model_dir(ctx.run, step.to))
    conf, small_ok, large_ok = cascade.outcomes(work.model, large, *ctx.splits["val"], step.confidence)
    target = step.target_accuracy if step.target_accuracy is not None else float(large_ok.float().mean())
    chosen = cascade.choose_threshold(conf, small_ok, large_ok, target)
    console.detail(f"[compress] {work.name}: threshold {chosen['threshold']:.4f} ({step.confidence}) "
            f"escalates {chosen['escalation']:.1%} of validation images to {step.to}: val accuracy "
            f"{chosen['accuracy']:.2%} (target {target:.2%}{'' if chosen['reached'] else ', not reached'})")
    work.details.append({"kind": step.kind, "to": step.to, "confidence": step.confidence,
                         "target_accuracy": target,
                         **{f"val_{k}": v for k, v in chosen.items() if k != "threshold"},
                         "threshold": chosen["threshold"]})
    members = {"small": model_dir(ctx.run, work.parent), "large": model_dir(ctx.run, step.to)}
    return artifacts.save_cascade(work.folder, members, work.spec, {"threshold": chosen["threshold"],
                              "confidence": step.confidence, "small": work.parent, "large": step.to})


def model_dir(run: RunDir, name: str) -> Path:
    """The folder of a trained model (verified against the run's manifest) or of a variant."""
    if name in TRAINED:
        return run.verify_file(f"{name}/arch.json").parent
    return run.root / "variants" / name


def apply_steps(ctx: Context, work: Work, steps: list[Step]) -> list[Path]:
    """Run `steps` in order on `work`; return the variant's saved files."""
    for i, step in enumerate(steps):
        work.next_kind = steps[i + 1].kind if i + 1 < len(steps) else None
        files = HANDLERS[step.kind].apply(ctx, work, step)
        if files:
            return files
    return artifacts.save_dense(work.folder, work.model, work.spec, work.base_shapes)


def finetune(ctx: Context, name: str, model: nn.Module, spec: dict, step: Finetune,
             gradual: PruneUnstructured | None, folder: Path) -> nn.Module:
    """Fine-tune the pruned model, distilled from the teacher; on Ray Train unless
    `ray.workers` is 0. Gradual unstructured pruning keeps raising the sparsity meanwhile."""
    tcfg = TrainConfig(epochs=step.epochs, lr=step.lr, batch_size=step.batch_size, schedule="cosine",
                       augment=False)
    if ctx.cfg.ray.workers == 0:
        return _finetune_here(ctx, name, model, tcfg, step, gradual)
    from distillery.training.on_ray import fit_on_ray  # the core never imports ray

    init = folder / "pruned"  # the workers' starting point, verified when they load it
    artifacts.save_dense(init, model, spec, prune.layer_shapes(build_model(spec)))
    job = TrainJob(which=f"finetune:{name}", spec=spec, train=tcfg, image_shape=ctx.in_shape,
                   train_rows=len(ctx.splits["train"][0]), init_dir=str(init.relative_to(ctx.run.root)),
                   teacher_dir="teacher" if step.distill else None, hints=False, prune=gradual)
    with console.progress(f"[compress] fine-tuning {name}", tcfg.epochs, "epochs") as advance:
        state, _ = fit_on_ray(job, ctx.cfg, ctx.run, name=f"finetune-{name}-{ctx.fingerprint}-{ctx.attempt}",
                              on_epoch=epoch_lines(f"finetune:{name}", tcfg.epochs, advance))
    model.load_state_dict(state)
    return model.eval()


def _finetune_here(ctx: Context, name: str, model: nn.Module, tcfg: TrainConfig, step: Finetune,
                   gradual: PruneUnstructured | None) -> nn.Module:
    sparsity = prune.GradualSparsity(model, gradual, tcfg.epochs) if gradual else None
    goal = objective(model, tcfg, ctx.cfg.distill, teacher=ctx.teacher if step.distill else None, hints=False)
    fit(model, ctx.splits["train"], ctx.splits["val"], tcfg, seed=ctx.cfg.seed, loss_fn=goal.loss_fn,
        make_target=goal.make_target,
        on_epoch=lambda m: console.detail(progress_line(f"finetune:{name}", tcfg.epochs, m)),
        on_epoch_start=sparsity.start_epoch if sparsity else lambda epoch: None,
        after_step=sparsity.after_step if sparsity else None)
    return model.eval()


def _static_int8(ctx: Context, model: nn.Module, step: Int8Static, folder: Path, spec: dict,
                 base_shapes: dict) -> tuple[list[Path], dict]:
    """Post-training int8; quantization-aware training instead when PTQ loses more than
    `max_drop` validation accuracy (and the model has no batch norm to fold)."""
    x, _ = ctx.splits["train"]
    sample = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(ctx.cfg.seed))
               [:step.calibration_samples]]
    prepared = quantize.prepare(copy.deepcopy(model), ctx.in_shape)
    quantize.calibrate(prepared, sample)
    parent_acc = accuracy(model, ctx.splits["val"])
    ptq_acc = accuracy(quantize.convert(copy.deepcopy(prepared)), ctx.splits["val"])
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
    return artifacts.save_pt2e(folder, fp32, prepared, spec, base_shapes, qat=qat), detail


def _qat(ctx: Context, model: nn.Module, step: Int8Static) -> tuple[nn.Module, torch.fx.GraphModule]:
    """Fine-tune with fake quantization in the graph (distilled from the teacher); return the
    plain model with the trained float weights copied back, and the trained graph."""
    fp32 = copy.deepcopy(model)
    prepared = quantize.prepare(copy.deepcopy(model), ctx.in_shape, qat=True)
    tcfg = TrainConfig(epochs=step.qat_epochs, lr=step.qat_lr, schedule="cosine", augment=False)
    console.detail("[compress] post-training int8 lost more than allowed: quantization-aware training")
    goal = objective(prepared, tcfg, ctx.cfg.distill, teacher=ctx.teacher, hints=False)
    fit(prepared, ctx.splits["train"], ctx.splits["val"], tcfg, seed=ctx.cfg.seed, loss_fn=goal.loss_fn,
        make_target=goal.make_target,
        on_epoch=lambda m: console.detail(progress_line("qat", tcfg.epochs, m)))
    trained = prepared.state_dict()
    fp32.load_state_dict({k: trained[k] for k in fp32.state_dict()})
    return fp32, prepared


def accuracy(model: nn.Module, split: tuple[torch.Tensor, torch.Tensor]) -> float:
    return evaluate(model, batches(*split, 1024))["accuracy"]


def outcomes(model: nn.Module, split: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Whether `model` got each image of `split` right (bool [n]), in batches of 1024."""
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(x).argmax(1) == y for x, y in batches(*split, 1024)]) if len(split[1]) else \
            torch.zeros(0, dtype=torch.bool)
