"""The data stages of a run: `data` (the source prepared into verified shards) and `transfer`
(the set the student is distilled on, when it is not the training split), and how the later
stages read the prepared splits back."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from distillery import data
from distillery.config import PipelineConfig
from distillery.core.errors import UserError
from distillery.data.sources import flips_keep_class
from distillery.run.rundir import RunDir

Log = Callable[[str], None]


def prepare_data(run: RunDir, cfg: PipelineConfig, log: Log) -> tuple[list[Path], dict[str, Any]]:
    out = run.root / "data"
    manifest = data.prepare(cfg.data, out, seed=cfg.seed)
    counts = {split: manifest["counts"][split]["total"] for split in data.SPLITS}
    log(f"[data] {manifest['source']}: {counts} images of shape {manifest['image_shape']} -> {out}")
    if not counts["val"]:  # the test split only reports: without a validation split nothing can choose
        raise UserError("the validation split is empty: every choice (the accuracy floor, the recommended "
                        "model, cascade thresholds, the search, auto's ladder) is made on it; set "
                        "data.val_fraction above 0 or give the source's split column (or folders) val rows")
    skipped = manifest.get("skipped") or {}
    if skipped.get("count"):
        log(f"[data] skipped {skipped['count']} file(s) that are not readable images (listed in "
            f"{out}/manifest.json), e.g. {skipped['files'][0]}")
    files = [out / shard["path"] for shard in manifest["shards"]] + [out / "manifest.json"]
    return files, {"counts": counts, "image_shape": manifest["image_shape"],
                   "num_classes": manifest["num_classes"]}


def prepare_transfer(run: RunDir, cfg: PipelineConfig, log: Log) -> tuple[list[Path], dict[str, Any]]:
    """The transfer set the student is distilled on (`distill.transfer`), as shards of its own."""
    assert cfg.distill.transfer is not None  # the stage runs only when a transfer set is configured
    out = run.root / "transfer"
    manifest = data.prepare_transfer(cfg.distill.transfer, out, cfg.seed,
                                     run.verify_file("data/manifest.json").parent)
    rows = manifest["counts"]["train"]["total"]
    left_out = manifest["left_out_held_out"]
    log(f"[transfer] {manifest['source']}: {rows} images, "
        f"{'labeled' if manifest['labeled'] else 'without labels'}"
        + (f"; {left_out} left out: they are in the run's val/test splits" if left_out else ""))
    files = [out / shard["path"] for shard in manifest["shards"]] + [out / "manifest.json"]
    return files, {"rows": rows, "labeled": manifest["labeled"],
                   "left_out_held_out": manifest["left_out_held_out"]}


def load_splits(run: RunDir, splits: tuple[str, ...] = data.SPLITS
                ) -> tuple[dict[str, Any], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The data manifest (verified against the run manifest) and the named splits as tensors.
    The manifest also says whether random left-right flips keep an image's class
    (`flips_keep_class`: natural images, not digits), so no stage asks the source registry."""
    data_dir = run.verify_file("data/manifest.json").parent
    manifest = data.read_manifest(data_dir)
    manifest["flips_keep_class"] = flips_keep_class(manifest["source"])
    return manifest, {split: data.load_split(data_dir, split) for split in splits}
