"""`prepare`: one source -> seeded, stratified train/val/test shards and their manifest.

Splits are stratified by class and seeded. A source's own test split (cifar10's
test_batch.bin, a user `split` column) is kept; otherwise `test_fraction` of all rows is
carved out. Val is `val_fraction` of all rows, carved from train unless the source gives
one. `max_train_samples` then subsamples train (stratified). Rows within each split are in a
seeded random order, so streaming readers see mixed classes. Same source, config and seed
give byte-identical shards (same sha256) for a given pyarrow version.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from distillery.config import DataConfig
from distillery.core.errors import UserError
from distillery.core.files import atomic_path, atomic_write_json, sha256_file
from distillery.data.shards import (
    FORMAT,
    MANIFEST_FILE,
    SCHEMA_DOC,
    SHARD_NAME,
    SPLITS,
    encode_table,
    load_split,
    read_manifest,
)
from distillery.data.sources import load_source


def prepare(cfg: DataConfig, out_dir: str | Path, seed: int) -> dict:
    """Load `cfg.source`, split it, write shards to `out_dir`, then manifest.json; return it."""
    out_dir = Path(out_dir)
    source = load_source(cfg, seed)
    _check_not_inside(source.path, out_dir)
    splits = split_indices(source.labels, source.given, cfg, seed, source.classes)
    _clear_previous(out_dir)
    shape = list(source.images.shape[1:])
    shards = []
    for split in SPLITS:
        shards += _write_split(out_dir, split, source.images, source.labels, splits[split], cfg.shard_rows)
    k = len(source.classes)
    manifest = {
        "format": FORMAT,
        "source": cfg.source,
        "source_path": source.path,
        "image_shape": shape,
        "num_classes": k,
        "classes": source.classes,
        "seed": seed,
        "counts": {s: _counts(source.labels[splits[s]], k) for s in SPLITS},
        "skipped": {"count": len(source.skipped), "files": list(source.skipped[:1000])},
        "shards": shards,
        "schema": SCHEMA_DOC,
    }
    atomic_write_json(out_dir / MANIFEST_FILE, manifest)  # last: its presence means "complete"
    return manifest


def prepare_transfer(cfg: DataConfig, out_dir: str | Path, seed: int, run_data: str | Path) -> dict:
    """A transfer set (`distill.transfer`) -> one seeded `train` split in `out_dir`, for the run
    whose prepared data is `run_data`: the source's rows (not those it fixes as val or test),
    labels mapped onto the run's classes by name (-1 without labels), and no image that is also
    in the run's val or test split: a transfer set drawn from the run's own source would
    otherwise teach the student on the images it is scored on."""
    out_dir, run = Path(out_dir), read_manifest(run_data)
    source = load_source(cfg, seed)
    _check_not_inside(source.path, out_dir)
    if list(source.images.shape[1:]) != run["image_shape"]:
        raise UserError(f"distill.transfer: images of shape {list(source.images.shape[1:])}; the run's data "
                        f"(and its teacher) take {run['image_shape']}")
    labels = (_onto_classes(source, run["classes"]) if cfg.labeled
              else np.full(len(source.labels), -1, np.int64))
    rows = np.arange(len(labels)) if source.given is None else np.flatnonzero(source.given == "train")
    held_out = {x.numpy().tobytes() for split in ("val", "test") for x in load_split(run_data, split)[0]}
    kept = np.asarray([r for r in rows if source.images[r].tobytes() not in held_out], dtype=np.int64)
    if kept.size == 0:
        raise UserError(f"distill.transfer: no images left ({rows.size} read, all of them in the run's "
                        "val/test splits)")
    order = np.random.default_rng(_random_state(seed)).permutation(kept)[:cfg.max_train_samples]
    _clear_previous(out_dir)
    shards = _write_split(out_dir, "train", source.images, labels, order, cfg.shard_rows)
    manifest = {"format": FORMAT, "source": cfg.source, "source_path": source.path,
                "image_shape": run["image_shape"], "num_classes": run["num_classes"],
                "classes": run["classes"], "labeled": cfg.labeled, "seed": seed,
                "counts": {"train": {"total": int(order.size), **({"per_class": np.bincount(
                    labels[order], minlength=run["num_classes"]).tolist()} if cfg.labeled else {})}},
                "left_out_held_out": int(rows.size - kept.size),
                "skipped": {"count": len(source.skipped), "files": list(source.skipped[:1000])},
                "shards": shards, "schema": SCHEMA_DOC}
    atomic_write_json(out_dir / MANIFEST_FILE, manifest)
    return manifest


def _onto_classes(source, classes: list[str]) -> np.ndarray:
    """The source's labels as indices into the run's `classes`, matched by name."""
    unknown = sorted(set(source.classes) - set(classes))
    if unknown:
        raise UserError(f"distill.transfer: class(es) {', '.join(unknown[:5])} are not among the teacher's "
                        f"classes ({', '.join(classes[:20])}); rename them or set "
                        "distill.transfer.labeled: false")
    index = np.asarray([classes.index(name) for name in source.classes], dtype=np.int64)
    return index[source.labels]


def _counts(labels: np.ndarray, k: int) -> dict:
    return {"total": int(labels.size), "per_class": np.bincount(labels, minlength=k).tolist()}


def _check_not_inside(input_path: str | None, out_dir: Path) -> None:
    # prepare rewrites out_dir, so reading the user's files from it could destroy them.
    if input_path is None:
        return
    src, out = Path(input_path).resolve(), out_dir.resolve()
    if src == out or out in src.parents:
        raise UserError(f"data.path {input_path} is inside the output folder {out_dir}, which "
                        "prepare overwrites")


def _clear_previous(out_dir: Path) -> None:
    """Drop an old manifest first (a crash now leaves "not prepared"), then old shards."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    for old in out_dir.iterdir():
        if SHARD_NAME.fullmatch(old.name):  # only our own names; a shorter rerun leaves none stale
            old.unlink()


def _write_split(out_dir: Path, split: str, images: np.ndarray, labels: np.ndarray,
                 idx: np.ndarray, shard_rows: int) -> list[dict]:
    """Write rows `idx` as `{split}-00000.parquet`, ...; return their manifest entries."""
    entries = []
    for number, start in enumerate(range(0, idx.size, shard_rows)):
        rows = idx[start:start + shard_rows]
        table = encode_table(images[rows], labels[rows], split)
        path = out_dir / f"{split}-{number:05d}.parquet"
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        entries.append({"path": path.name, "split": split, "rows": int(rows.size),
                        "sha256": sha256_file(path)})
    return entries


def split_indices(labels: np.ndarray, given: np.ndarray | None, cfg: DataConfig, seed: int,
                  classes: list[str]) -> dict[str, np.ndarray]:
    """Row indices per split (int64 [n_split] each), stratified by label and seeded."""
    n = labels.size
    state = _random_state(seed)
    given = np.full(n, "train", dtype=object) if given is None else given
    train = np.flatnonzero(given == "train")
    test = np.flatnonzero(given == "test")
    if test.size == 0:
        train, test = _carve(train, labels, math.ceil(cfg.test_fraction * n), state, "test", classes)
    val = np.flatnonzero(given == "val")
    if val.size == 0 and cfg.val_fraction > 0:
        train, val = _carve(train, labels, math.ceil(cfg.val_fraction * n), state, "val", classes)
    if cfg.max_train_samples is not None and train.size > cfg.max_train_samples:
        _, train = _carve(train, labels, cfg.max_train_samples, state, "max_train_samples", classes)
    shuffle = np.random.default_rng(state)  # mixed classes within every shard
    return {s: shuffle.permutation(rows).astype(np.int64) for s, rows in zip(SPLITS, (train, val, test))}


def _random_state(seed: int) -> int:
    # sklearn wants a 32-bit seed; SeedSequence folds any non-negative int into one.
    return int(np.random.SeedSequence(seed).generate_state(1)[0])


def _carve(pool: np.ndarray, labels: np.ndarray, size: int, state: int, what: str,
           classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Split `pool` (row indices) into (rest, `size` rows for `what`), stratified by label."""
    counts = np.bincount(labels[pool], minlength=len(classes))
    lonely = np.flatnonzero(counts == 1)
    if lonely.size:
        c = int(lonely[0])
        raise UserError(
            f"cannot split off {what} rows stratified by class: class {c} ({classes[c]!r}) has only 1 "
            f"row among the {pool.size} left to split; each class needs at least 2 (add data or drop it)")
    from sklearn.model_selection import train_test_split  # 1 s of import: not for Ray workers reading shards

    try:
        rest, carved = train_test_split(pool, test_size=size, stratify=labels[pool], random_state=state)
    except ValueError as e:
        raise UserError(
            f"cannot split {size} {what} rows out of {pool.size} stratified by class "
            f"({int((counts > 0).sum())} classes): {e}; use more rows, a larger fraction, "
            "or fewer classes") from None
    return rest, carved
