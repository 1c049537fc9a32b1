"""One trial of the search, in plain PyTorch: distil a student of the trial's width with its
temperature, alpha, schedule and augmentation, then compress it with the trial's recipe and
save it. Ray Tune is only the caller (`on_tune`).

The student learns from the teacher's logits of every augmented view, computed once for the
whole search (`training.augment_views`): with augmentation on, the teacher's answer is for exactly
the image the student is shown (Beyer et al. 2022: "consistent" teaching), at the cost of a
lookup. The recipe's steps are the compress stage's own (`compression.steps`), run here in
the trial's process (a fine-tune is distilled from the live teacher, as in that stage).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distillery import artifacts
from distillery.compression import prune
from distillery.compression.steps import HANDLERS, Context, Work, accuracy, apply_steps
from distillery.config import CNNConfig, PipelineConfig
from distillery.config.compress import VariantConfig
from distillery.core.errors import UserError
from distillery.models.architectures import build_model, count_macs, count_params, make_spec
from distillery.training.loop import batches, evaluate, fit, seed_everything
from distillery.training.losses import distillation

Report = Callable[[dict[str, Any]], None]
COMPLETED, STOPPED, FAILED = "completed", "stopped early", "failed"  # how a trial ended


@dataclass
class TrialData:
    """What every trial reads, shipped once to the trials' processes (Ray's object store)."""

    cfg: PipelineConfig
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]  # train and val
    view_logits: torch.Tensor  # the teacher's logits of every view of every train image [V, N, K]
    image_shape: list[int]
    num_classes: int
    flip: bool
    teacher: nn.Module  # frozen: the recipe's fine-tunes and quantization-aware training distil from it


def val_score(acc: float, loss: float, n: int) -> float:
    """Validation accuracy with ties broken by validation loss, in one number for the scheduler:
    the loss term stays under half an image (1/n), so it never outweighs one more right answer.
    On 180 images most good students tie on accuracy; their loss still ranks them."""
    return acc - min(loss, 10.0) / (20.0 * max(n, 1))


def flat(settings: dict[str, Any]) -> dict[str, Any]:
    """A trial's settings with its model, drawn as one [width, recipe index] pair (only pairs
    that can meet the budget are drawn), spelt out as `width_mult` and `recipe`."""
    if "model" not in settings:
        return settings
    width, recipe = settings["model"]
    return {**{k: v for k, v in settings.items() if k != "model"}, "width_mult": width, "recipe": recipe}


def model_macs(cfg: PipelineConfig, width: float, recipe: int, in_shape: list[int],
               num_classes: int) -> int | None:
    """The MACs of a width after a recipe's steps (dry-run, as before any trial); None when
    the recipe cannot apply to that width (the trial will fail at its start, saying why)."""
    model = build_model(make_spec(CNNConfig(width_mult=width), in_shape, num_classes))
    try:
        check_recipe(cfg, {"recipe": recipe}, model, in_shape, copy_first=False)
    except UserError:
        return None
    return count_macs(model, in_shape)


def recipe_steps(cfg: PipelineConfig, settings: dict[str, Any]) -> list:
    """The trial's compression steps: Tune's configs hold the recipe's index (plain JSON)."""
    return cfg.search.space.recipe[settings["recipe"]]


def describe(cfg: PipelineConfig, settings: dict[str, Any]) -> str:
    """`cnn x0.5, T=2, alpha=1, 400 epochs, augmented -> int8_static`, for tables."""
    settings = flat(settings)
    steps = recipe_steps(cfg, settings)
    recipe = VariantConfig(name="trial", steps=steps).describe().split(" -> ", 1)[1] if steps else None
    text = (f"cnn x{settings['width_mult']:g}, T={settings['temperature']:g}, alpha={settings['alpha']:g}, "
            f"{settings['epochs']} epochs, {'augmented' if settings['augment'] else 'not augmented'}")
    return f"{text} -> {recipe}" if recipe else text


def run_trial(settings: dict[str, Any], data: TrialData, folder: Path, report: Report) -> dict[str, Any]:
    """Train, compress and save the trial's model into `folder`; `report` validation metrics
    while training (what the scheduler judges); return the final metrics of the saved model."""
    settings = flat(settings)
    cfg, epochs = data.cfg, settings["epochs"]
    spec = make_spec(CNNConfig(width_mult=settings["width_mult"]), data.image_shape, data.num_classes)
    seed_everything(cfg.seed)
    model = build_model(spec)
    # a recipe this width cannot take fails now, not after training
    check_recipe(cfg, settings, model, data.image_shape)
    train = cfg.student.train.model_copy(update={"epochs": epochs, "augment": settings["augment"]})
    fit(model, data.splits["train"], data.splits["val"], train, seed=cfg.seed, flip=data.flip,
        loss_fn=distillation(settings["temperature"], settings["alpha"]), view_logits=data.view_logits,
        on_epoch=reporter(report, epochs, cfg.search.reports, len(data.splits["val"][1])))
    trained_val = accuracy(model.eval(), data.splits["val"])
    fp32, numerics, files = compress(settings, data, spec, model, folder)
    saved, _ = artifacts.load(folder)  # what is judged is what was saved
    return {"progress": 100.0, "epoch": epochs, **val_metrics(saved, data.splits["val"]),
            "trained_val_accuracy": trained_val, "macs": count_macs(fp32, data.image_shape),
            "params": count_params(fp32), "size_bytes": files[0].stat().st_size, "numerics": numerics}


def reporter(report: Report, epochs: int, reports: int, n_val: int) -> Callable[[dict], None]:
    """An `on_epoch` that reports about `reports` times (not the last epoch: that report
    comes after compressing), as progress through the trial's own schedule."""
    every = max(1, epochs // reports)

    def on_epoch(m: dict) -> None:
        if m["epoch"] % every == 0 and m["epoch"] < epochs:
            report({"progress": 100.0 * m["epoch"] / epochs, "epoch": m["epoch"],
                    "val_accuracy": m["val_accuracy"], "val_loss": m["val_loss"],
                    "val_score": val_score(m["val_accuracy"], m["val_loss"], n_val)})
    return on_epoch


def val_metrics(model: nn.Module, val: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    scores = evaluate(model, batches(*val, 1024))
    return {"val_accuracy": scores["accuracy"], "val_loss": scores["loss"],
            "val_score": val_score(scores["accuracy"], scores["loss"], len(val[1]))}


def check_recipe(cfg: PipelineConfig, settings: dict[str, Any], model: nn.Module, in_shape: list[int],
                 copy_first: bool = True) -> None:
    """The compress stage's dry run of each step (layer names, reachable ratios), on a copy
    unless `copy_first` is False (channel pruning's check prunes the model it is given)."""
    model = copy.deepcopy(model) if copy_first else model
    for step in recipe_steps(cfg, settings):
        HANDLERS[step.kind].check(model, step, in_shape)


def compress(settings: dict[str, Any], data: TrialData, spec: dict, model: nn.Module,
             folder: Path) -> tuple[nn.Module, str, list[Path]]:
    """The recipe's steps on the trained model, in this process; the fp32 model they leave
    (what MACs are counted on), the arithmetic of the saved one, and its files."""
    distill = data.cfg.distill.model_copy(update={"temperature": settings["temperature"],
                                                  "alpha": settings["alpha"], "hints": []})
    cfg = data.cfg.model_copy(update={"distill": distill,
                                      "ray": data.cfg.ray.model_copy(update={"workers": 0})})
    # No run here, and a trial's steps read none: no cascade (config.search), fine-tuned in process
    ctx = Context(None, cfg, lambda line: None,  # type: ignore[arg-type]
                  data.image_shape, data.splits, data.teacher, "", 0)
    work = Work("searched", "student", folder, spec, prune.layer_shapes(build_model(spec)),
                copy.deepcopy(model))
    steps = recipe_steps(data.cfg, settings)
    files = apply_steps(ctx, work, steps)
    numerics = (VariantConfig(name="trial", steps=steps).numerics() if steps else None) or "fp32"
    return work.model, numerics, files
