"""The compress stage: build every variant of `compress.variants`, then measure them all.

Each variant starts from its parent (the distilled student, the teacher, or an earlier
variant) and runs its steps in order: prune -> fine-tune (Ray Train, distilled from the
teacher) -> quantize. It is saved (`artifacts`), reloaded from disk, and only the
reloaded model is scored and timed: the numbers are those of what would be served. The
teacher and both students are timed the same way, and `frontier` draws the trade-off.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from distillery import artifacts
from distillery.compression import cascade, prune
from distillery.compression.steps import HANDLERS, Built, Context, Log, Work, accuracy, apply_steps, outcomes
from distillery.config import PipelineConfig
from distillery.config.compress import VariantConfig
from distillery.core import console
from distillery.core.errors import NotApplicable, UserError
from distillery.core.files import atomic_write_json, read_json
from distillery.core.roles import PARENT, SEARCHED, SHOWN, VARIANT, VARIANT_BASES
from distillery.measure import frontier, timing
from distillery.measure.accuracy import paired
from distillery.models.architectures import build_model, count_macs, count_params
from distillery.models.exported import ExportedModel
from distillery.run.rundir import RunDir
from distillery.training.objective import frozen_teacher


def compress_run(run: RunDir, cfg: PipelineConfig, log: Log, splits: dict,
                 manifest: dict) -> tuple[list[Path], dict]:
    record = run.stage("compress")
    teacher = frozen_teacher(run.verify_file("teacher/arch.json").parent, torch.device("cpu"))
    ctx = Context(run, cfg, log, manifest["image_shape"], splits, teacher,
                  record["fingerprint"], record["attempt"])
    refused = check_run(run, cfg)
    for name, reason in refused.items():
        log(f"[compress] {name}: refused: {reason}")
    variants = [v for v in cfg.compress.variants if v.name not in refused]
    built = {}
    with console.progress("[compress] building", len(variants), "variants") as advance:
        for v in variants:
            built[v.name] = build(ctx, v)
            advance(1, note=v.name)
    settings = timing.BenchSettings(**cfg.compress.bench.model_dump(exclude={"modes"}))
    count = len(cfg.trained) + len(variants) + cfg.search.enabled
    with console.progress("[compress] scoring and timing", count, "models") as advance:
        records = measure_all(ctx, settings, variants, built, advance)
    margin = cfg.compress.speedup_margin
    for rec in records.values():  # a cascade must beat its larger model, which it stands in for
        parent = records.get(rec.get("compared_with") or rec["parent"]) if rec["parent"] else None
        rec["not_faster"] = parent is not None and not timing.is_faster(rec, parent, min_gain=margin)
        if parent is not None:  # reported beside the test accuracy, never read by a choice
            rec["test_paired"] = {"with": parent["name"],
                                  **paired(ctx.test_outcomes[rec["name"]], ctx.test_outcomes[parent["name"]])}
    files = []
    for v in variants:
        folder = built[v.name].files[-1].parent  # recipe.json, in the variant's own folder
        atomic_write_json(folder / "metrics.json", records[v.name])
        files += [*built[v.name].files, folder / "metrics.json"]
    # Every choice reads validation figures only (frontier.choice_view): the test split reports.
    floor = records["teacher"]["val_accuracy"] - cfg.compress.floor_below_teacher
    files += frontier.write_frontier(run.root, list(records.values()), floor=floor,
                                     machine=timing.machine_info(),
                                     settings={**asdict(settings), "modes": cfg.compress.bench.modes},
                                     margin=margin,
                                     refused=[{"name": v.name, "recipe": v.describe(),
                                               "reason": refused[v.name]}
                                              for v in cfg.compress.variants if v.name in refused])
    best = frontier.recommend(list(records.values()), floor, margin)
    log(f"[compress] recommended: {best['reason'] if best else 'nothing meets the accuracy floor'}")
    return files, {"variants": len(built), "refused": refused, "recommended": best["name"] if best else None,
                   "floor": floor}


def measure_all(ctx: Context, settings: timing.BenchSettings, variants: list[VariantConfig],
                built: dict[str, Built],
                advance: Callable[..., None] = lambda *a, **k: None) -> dict[str, dict[str, Any]]:
    """The trained models and every variant as reloaded from disk, scored and timed. Timed only
    once everything is built, one after another: no training in between competes for the
    cores, and a parent and its child are measured minutes apart at most."""
    records = measure_trained(ctx, settings, advance)
    for v in variants:
        b = built[v.name]
        model, _ = artifacts.load(b.files[-1].parent)  # score what is on disk
        if v.cascade_to():
            members = cast(cascade.Cascade, model)  # a cascade's folder loads as one
            records[v.name] = measure_cascade(ctx, settings, v, members, records) | {"steps": b.details}
        else:
            rec = measure(ctx, settings, v.name, VARIANT, v.parent, v.describe(), model, b.fp32,
                          b.files[0].stat().st_size, int8=v.steps[-1].kind == "int8_static")
            records[v.name] = {**rec, "steps": b.details,
                               "numerics": v.numerics() or records[v.parent]["numerics"]}
        advance(1, note=v.name)
    if ctx.cfg.search.enabled:
        records[SEARCHED] = measure_searched(ctx, settings)
        advance(1, note=SEARCHED)
    return records


def measure_searched(ctx: Context, settings: timing.BenchSettings) -> dict[str, Any]:
    """The model the search chose (`search.stage`), timed here again beside everything else."""
    folder = ctx.run.verify_file(f"variants/{SEARCHED}/arch.json").parent
    found = read_json(ctx.run.verify_file(f"variants/{SEARCHED}/search.json"))["record"]
    model, _ = artifacts.load(folder)
    rec = measure(ctx, settings, SEARCHED, VARIANT, "teacher", f"searched: {found['recipe']}", model, model,
                  found["size_bytes"], int8=found["numerics"] == "int8_static", macs=found["macs"],
                  params=found["params"])
    return {**rec, "numerics": found["numerics"]}


def measure_trained(ctx: Context, settings: timing.BenchSettings,
                    advance: Callable[..., None] = lambda *a, **k: None) -> dict[str, dict[str, Any]]:
    """The trained models as reloaded from disk (verified), scored and timed."""
    records = {}
    for name in (m for m in SHOWN if m in ctx.cfg.trained):
        model, arch = artifacts.load(ctx.run.verify_file(f"{name}/arch.json").parent)
        size = (ctx.run.root / name / arch["weights"]).stat().st_size
        records[name] = {**measure(ctx, settings, name, name, PARENT[name], name, model, model, size),
                         "numerics": "fp32"}
        advance(1, note=name)
    return records


def measure_cascade(ctx: Context, settings: timing.BenchSettings, v: VariantConfig, model: cascade.Cascade,
                    records: dict[str, dict]) -> dict[str, Any]:
    """A cascade as it runs on the validation images: its cost depends on how many it
    escalates, so MACs are the small model's plus the escalated share of the large one's, and
    it is timed on those images (as every model is). The test images' share is reported."""
    large_name = v.cascade_to()
    assert large_name is not None  # only a cascade variant is measured as one
    small, large = records[v.parent], records[large_name]
    escalation = {split: _escalation(model, ctx.splits[split][0]) for split in ("val", "test")}
    macs = small["macs"] + round(escalation["val"] * large["macs"])
    rec = measure(ctx, settings, v.name, VARIANT, v.parent, v.describe(), model, model,
                  small["size_bytes"] + large["size_bytes"], macs=macs,
                  params=small["params"] + large["params"],
                  # compiled, every escalated count is a new shape for the large model: a recompile each
                  modes=[m for m in ctx.cfg.compress.bench.modes if m != "compile"] or ["eager"])
    console.detail(f"[compress] {v.name}: escalates {escalation['val']:.1%} of validation images to "
                   f"{v.cascade_to()}")
    return {**rec, "compared_with": v.cascade_to(), "val_escalation": escalation["val"],
            "test_escalation": escalation["test"],
            "numerics": f"cascade({small['numerics']}, {large['numerics']})"}


def _escalation(model: cascade.Cascade, images: torch.Tensor) -> float:
    with torch.inference_mode():
        return float((cascade.confidence(model.small(images), model.kind) < model.threshold).float().mean())


def check_recipes(variants: list[VariantConfig], bases: dict[str, nn.Module],
                  in_shape: list[int]) -> dict[str, str]:
    """Everything checkable against the models, before any work: layer names, reachable MAC
    ratios, group sizes, and no step on top of a quantized variant. Channel pruning is dry-run
    on a copy (cheap, and only trying tells whether a ratio is reachable), so the steps after
    it, and the variants built on it, are checked against the widths it leaves.

    A mistake in a recipe raises; a step that cannot apply to the model's architecture only
    refuses its variant (and those built on it): returned as {name: reason} for the frontier."""
    shapes = dict(bases)  # name -> a model of that variant's widths
    quantized, cascades, refused = set(), set(), {}
    for v in variants:
        built_on = [n for n in (v.parent, v.cascade_to()) if n in cascades]
        if built_on:
            raise UserError(f"compress.variants.{v.name}: {built_on[0]!r} is a cascade; nothing is "
                            "built on a cascade")
        if v.parent in quantized and not v.cascade_to():  # a cascade may join quantized models
            raise UserError(f"compress.variants.{v.name}: parent {v.parent!r} is quantized; build "
                            "on its fp32 parent")
        lost = [n for n in (v.parent, v.cascade_to()) if n in refused]
        if lost:
            refused[v.name] = f"built on {lost[0]}, which was refused"
            continue
        if isinstance(shapes[v.parent], ExportedModel):
            refused[v.name] = (f"{v.parent} is an imported torch.export program, a fixed graph: nothing can "
                               "be built on it (import its weights as .safetensors, with teacher.model "
                               "naming the architecture)")
            continue
        model = copy.deepcopy(shapes[v.parent])
        try:
            for step in v.steps:
                HANDLERS[step.kind].check(model, step, in_shape)
        except NotApplicable as e:
            refused[v.name] = str(e)
            continue
        except UserError as e:
            raise UserError(f"compress.variants.{v.name}: {e}") from None
        shapes[v.name] = model
        if v.steps[-1].quantizes:
            quantized.add(v.name)
        if v.cascade_to():
            cascades.add(v.name)
    return refused


def check_run(run: RunDir, cfg: PipelineConfig) -> dict[str, str]:
    """`check_recipes` against this run's trained models: before the stage starts, so a
    wrong recipe leaves the run's finished compress stage as it was. Returns the variants
    refused as not applicable to their model, with the reason."""
    manifest = read_json(run.verify_file("data/manifest.json"))
    bases = {name: artifacts.load(run.verify_file(f"{name}/arch.json").parent)[0] for name in cfg.trained}
    return check_recipes(cfg.compress.variants, bases, manifest["image_shape"])


# ---------------------------------------------------------------- building


def build(ctx: Context, v: VariantConfig) -> Built:
    """Run the variant's steps on a copy of its parent and save the result."""
    parent, spec = _parent(ctx, v.parent)
    work = Work(v.name, v.parent, ctx.run.root / "variants" / v.name, spec,
                prune.layer_shapes(build_model(spec)), copy.deepcopy(parent))
    console.detail(f"[compress] {v.name}: {v.describe()}")
    files = apply_steps(ctx, work, v.steps)
    recipe = work.folder / "recipe.json"  # how the weights beside it were made
    atomic_write_json(recipe, v.model_dump(mode="json"))
    return Built([*files, recipe], work.model, work.details)


def _parent(ctx: Context, name: str) -> tuple[nn.Module, dict]:
    """The parent's fp32 model and the spec of the base model it descends from."""
    if name in VARIANT_BASES:
        model, arch = artifacts.load(ctx.run.verify_file(f"{name}/arch.json").parent)
    else:
        model, arch = artifacts.load(ctx.run.root / "variants" / name)
    return model, arch["spec"]


# ---------------------------------------------------------------- measuring


def measure(ctx: Context, settings: timing.BenchSettings, name: str, role: str, parent: str | None,
            recipe: str, model: nn.Module, fp32: nn.Module, size_bytes: int, int8: bool = False,
            macs: int | None = None, params: int | None = None,
            modes: list[str] | None = None) -> dict[str, Any]:
    """Accuracy on val (what choices read) and test (what the report gives, with each image's
    outcome kept in `ctx.test_outcomes` for paired comparisons), then speed in every
    configured mode (the fastest kept), timed on the validation images."""
    if macs is None:  # of the float structure: pruning shows, int8 does not change it
        macs = count_macs(fp32, ctx.in_shape)
    ctx.test_outcomes[name] = outcomes(model, ctx.splits["test"])
    # the mean of no outcomes is nan: a split without images has no accuracy
    acc = {"val_accuracy": accuracy(model, ctx.splits["val"]),
           "test_accuracy": float(ctx.test_outcomes[name].float().mean())}
    speed = timing.measure(model, ctx.in_shape, macs, settings, modes or ctx.cfg.compress.bench.modes,
                           int8=int8, images=ctx.splits["val"][0])
    console.detail(f"[compress] {name}: validation {acc['val_accuracy']:.2%}, served {speed['best_mode']}: "
            f"p50 {speed['p50_ms']:.3f} ms at batch 1, {speed['throughput']:,.0f} images/s at batch "
            f"{settings.throughput_batch}")
    return {"name": name, "role": role, "parent": parent, "recipe": recipe, **acc,
            "val_images": len(ctx.splits["val"][1]), "test_images": len(ctx.splits["test"][1]),
            "params": count_params(fp32) if params is None else params,
            "macs": macs, "size_bytes": size_bytes, **speed}
