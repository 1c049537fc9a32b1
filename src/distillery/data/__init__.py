"""Datasets: any source -> seeded, stratified Parquet shards with a verified manifest.

`prepare` turns one source into train/val/test shards in one folder; `load_split` reads a
split back as tensors for plain PyTorch; `shard_paths` hands the same files to Ray Data
(`read_parquet`); `decode_batch` turns a batch from either path into the same tensors.

Sources (`DataConfig.source`):
  digits     sklearn's bundled 8x8 digits, 1x8x8, values / 16 -> [0, 1]
  cifar10    the official CIFAR-10 *binary* files in `path`, 3x32x32, values / 255
  parquet    the user's Parquet file or folder: a list-of-numbers image column and an
             integer label column; values are kept as given (no scaling)
  synthetic  seeded class prototypes plus noise, clipped to [0, 1]; learnable on purpose

Shard files `{split}-{index:05d}.parquet`, at most `shard_rows` rows each, schema:
  image  fixed_size_list<float32>[C*H*W]  one image, row-major (C, H, W), flattened
  label  int64                            class index in [0, num_classes)
  split  string                           "train" | "val" | "test"
  schema metadata b"distillery.image_shape" = JSON [C, H, W]

Splits are stratified by class and seeded. A source's own test split (cifar10's
test_batch.bin, a user `split` column) is kept; otherwise `test_fraction` of all rows is
carved out. Val is `val_fraction` of all rows, carved from train unless the source gives
one. `max_train_samples` then subsamples train (stratified). Rows within each split are in a
seeded random order, so streaming readers see mixed classes. Same source, config and seed
give byte-identical shards (same sha256) for a given pyarrow version.

manifest.json (format 1) is written last and atomically, after every shard: a folder
without one was never completely prepared. It records each shard's rows and sha256, and
`load_split` / `shard_paths` verify them before anything is read.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from distillery.config import DataConfig
from distillery.errors import UserError
from distillery.files import atomic_path, atomic_write_json, read_json, sha256_file, verify_sha256

SPLITS = ("train", "val", "test")
MANIFEST_FILE = "manifest.json"
FORMAT = 1
SHAPE_KEY = b"distillery.image_shape"
MAX_CLASSES = 100_000  # same bound as DataConfig.num_classes; a stray huge label is a typo
SCHEMA_DOC = {
    "image": "fixed_size_list<float32>[C*H*W]: one image, row-major (C, H, W), flattened",
    "label": "int64: class index in [0, num_classes)",
    "split": "string: train | val | test",
    "metadata": {"distillery.image_shape": "JSON [C, H, W]"},
}
_SHARD_NAME = re.compile(r"(train|val|test)-\d{5}\.parquet")

CIFAR_RECORD = 1 + 3 * 32 * 32  # label byte + 1024 R + 1024 G + 1024 B
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch.bin"
CIFAR_META_FILE = "batches.meta.txt"


class Source(NamedTuple):
    """What a source loader returns: every row it has, plus any split it fixes itself."""

    images: np.ndarray  # float32 [N, C, H, W]
    labels: np.ndarray  # int64 [N]
    classes: list[str]  # K names; labels are in [0, K)
    given: np.ndarray | None  # str [N] of "train"/"val"/"test", or None: split it all
    path: str | None  # resolved input path, for the manifest


# ---------------------------------------------------------------------------- prepare


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
        "shards": shards,
        "schema": SCHEMA_DOC,
    }
    atomic_write_json(out_dir / MANIFEST_FILE, manifest)  # last: its presence means "complete"
    return manifest


def _counts(labels: np.ndarray, k: int) -> dict:
    return {"total": int(labels.size), "per_class": np.bincount(labels, minlength=k).tolist()}


def _check_not_inside(input_path: str | None, out_dir: Path) -> None:
    # prepare rewrites out_dir, so reading the user's files from it could destroy them.
    if input_path is None:
        return
    src, out = Path(input_path).resolve(), out_dir.resolve()
    if src == out or out in src.parents:
        raise UserError(f"data.path {input_path} is inside the output folder {out_dir}, which prepare overwrites")


def _clear_previous(out_dir: Path) -> None:
    """Drop an old manifest first (a crash now leaves "not prepared"), then old shards."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    for old in out_dir.iterdir():
        if _SHARD_NAME.fullmatch(old.name):  # only our own names; a shorter rerun leaves none stale
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
        entries.append({"path": path.name, "split": split, "rows": int(rows.size), "sha256": sha256_file(path)})
    return entries


def encode_table(images: np.ndarray, labels: np.ndarray, split: str) -> pa.Table:
    """images float32 [N, C, H, W], labels int64 [N] -> a table in the shard schema."""
    n, shape = images.shape[0], list(images.shape[1:])
    flat = pa.array(np.ascontiguousarray(images, dtype=np.float32).reshape(-1))
    schema = pa.schema(
        [("image", pa.list_(pa.float32(), math.prod(shape))), ("label", pa.int64()), ("split", pa.string())],
        metadata={SHAPE_KEY: json.dumps(shape).encode()},
    )
    columns = [
        pa.FixedSizeListArray.from_arrays(flat, math.prod(shape)),
        pa.array(labels.astype(np.int64, copy=False)),
        pa.array([split] * n, pa.string()),
    ]
    return pa.Table.from_arrays(columns, schema=schema)


# ---------------------------------------------------------------------------- splitting


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
    from sklearn.model_selection import train_test_split

    counts = np.bincount(labels[pool], minlength=len(classes))
    lonely = np.flatnonzero(counts == 1)
    if lonely.size:
        c = int(lonely[0])
        raise UserError(
            f"cannot split off {what} rows stratified by class: class {c} ({classes[c]!r}) has only 1 "
            f"row among the {pool.size} left to split; each class needs at least 2 (add data or drop it)")
    try:
        rest, carved = train_test_split(pool, test_size=size, stratify=labels[pool], random_state=state)
    except ValueError as e:
        raise UserError(
            f"cannot split {size} {what} rows out of {pool.size} stratified by class "
            f"({int((counts > 0).sum())} classes): {e}; use more rows, a larger fraction, or fewer classes") from None
    return rest, carved


# ---------------------------------------------------------------------------- sources


def load_source(cfg: DataConfig, seed: int) -> Source:
    """Dispatch on `cfg.source`; every loader returns float32 [N, C, H, W] images."""
    loaders = {"digits": _digits, "cifar10": _cifar10, "parquet": _user_parquet, "synthetic": _synthetic}
    if cfg.source not in loaders:
        raise UserError(f"data.source: unknown source {cfg.source!r} (allowed: {', '.join(loaders)})")
    return loaders[cfg.source](cfg, seed)


def _digits(cfg: DataConfig, seed: int) -> Source:
    from sklearn.datasets import load_digits

    d = load_digits()  # bundled with sklearn: works offline
    images = (d.images[:, None, :, :] / 16.0).astype(np.float32)  # pixel values are 0..16
    return Source(images, d.target.astype(np.int64), [str(n) for n in d.target_names], None, None)


def _synthetic(cfg: DataConfig, seed: int) -> Source:
    """One random prototype per class plus Gaussian noise: a tiny model learns it fast."""
    shape = tuple(cfg.image_shape or (1, 8, 8))
    k, n = cfg.num_classes or 10, cfg.num_samples
    rng = np.random.default_rng(seed)
    prototypes = rng.random((k, *shape))
    labels = rng.permutation(np.arange(n) % k).astype(np.int64)  # balanced classes
    noise = rng.normal(0.0, 0.25, (n, *shape))
    images = np.clip(prototypes[labels] + noise, 0.0, 1.0).astype(np.float32)
    return Source(images, labels, [str(i) for i in range(k)], None, None)


def _input_path(cfg: DataConfig) -> Path:
    if cfg.path is None:
        raise UserError(f"data.path is required when data.source is {cfg.source!r}")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise UserError(f"data.path: {path} does not exist")
    return path.resolve()


# CIFAR-10 (binary version) -------------------------------------------------------------


def _cifar10(cfg: DataConfig, seed: int) -> Source:
    folder = _input_path(cfg)
    if not folder.is_dir():
        raise UserError(f"data.path: {folder} must be the folder holding CIFAR-10's *.bin files")
    train_files = [folder / name for name in CIFAR_TRAIN_FILES if (folder / name).is_file()]
    if not train_files:
        raise UserError(f"{folder}: no CIFAR-10 training files (expected data_batch_1.bin … data_batch_5.bin)")
    if not (folder / CIFAR_TEST_FILE).is_file():
        raise UserError(f"{folder / CIFAR_TEST_FILE}: not found (CIFAR-10 binary version needs {CIFAR_TEST_FILE})")
    parts = [_read_cifar_file(p) for p in [*train_files, folder / CIFAR_TEST_FILE]]
    images = np.concatenate([x for x, _ in parts]).astype(np.float32)  # scale once: 60k images are 0.7 GB
    images /= np.float32(255.0)
    labels = np.concatenate([y for _, y in parts])
    n_test = parts[-1][1].size
    given = np.array(["train"] * (labels.size - n_test) + ["test"] * n_test, dtype=object)
    return Source(images, labels, _cifar_classes(folder), given, str(folder))


def _read_cifar_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One *.bin file -> images uint8 [n, 3, 32, 32], labels int64 [n]."""
    raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    if raw.size == 0 or raw.size % CIFAR_RECORD:
        raise UserError(
            f"{path}: size {raw.size} bytes is not a positive multiple of {CIFAR_RECORD} "
            "(1 label byte + 3072 pixel bytes per record); the file is truncated or not CIFAR-10 binary")
    records = raw.reshape(-1, CIFAR_RECORD)
    labels = records[:, 0]
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        raise UserError(f"{path}: record {int(bad[0])} has label byte {int(labels[bad[0]])}; CIFAR-10 labels are 0-9")
    # Bytes are 1024 R, then G, then B, each row-major 32x32: exactly C, H, W order.
    return records[:, 1:].reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _cifar_classes(folder: Path) -> list[str]:
    meta = folder / CIFAR_META_FILE
    if not meta.is_file():
        return [str(i) for i in range(10)]
    names = [line.strip() for line in meta.read_text(errors="replace").splitlines() if line.strip()]
    if len(names) != 10:
        raise UserError(f"{meta}: expected 10 class names, one per line; found {len(names)}")
    return names


# The user's Parquet ---------------------------------------------------------------------


def _user_parquet(cfg: DataConfig, seed: int) -> Source:
    root = _input_path(cfg)
    files = sorted(root.glob("*.parquet")) if root.is_dir() else [root]
    if not files:
        raise UserError(f"data.path: {root} holds no *.parquet files")
    want = math.prod(cfg.image_shape) if cfg.image_shape else None
    parts: dict[Path, tuple] = {}
    for path in files:
        part = _read_user_file(path, cfg, want)
        if part[1].size:  # an empty file adds nothing (and fixes no row length)
            parts[path] = part
            want = part[0].shape[1]  # every later file must match the first
    if not parts:
        raise UserError(f"data.path: {root} has no rows")
    images = np.concatenate([p[0] for p in parts.values()])
    labels = np.concatenate([p[1] for p in parts.values()])
    given = _user_given(parts)
    shape = _user_shape(cfg, images.shape[1], files[0])
    k = int(labels.max()) + 1
    return Source(images.reshape(-1, *shape), labels, [str(i) for i in range(k)], given, str(root))


def _read_user_file(path: Path, cfg: DataConfig, want: int | None) -> tuple[np.ndarray, np.ndarray, Any]:
    """One file -> (images float32 [n, L], labels int64 [n], split str [n] or None)."""
    try:
        present = pq.read_schema(path).names
        needed = [cfg.image_column, cfg.label_column]
        for column in needed:
            if column not in present:
                raise UserError(f"{path}: no column {column!r} (columns present: {', '.join(present)})")
        has_split = "split" in present and "split" not in needed
        table = pq.read_table(path, columns=needed + (["split"] if has_split else []))
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable Parquet file ({e})") from None
    images = _user_images(table.column(cfg.image_column).combine_chunks(), path, cfg.image_column, want)
    labels = _user_labels(table.column(cfg.label_column).combine_chunks(), path, cfg.label_column)
    split = _user_split(table.column("split").combine_chunks(), path) if has_split else None
    return images, labels, split


def _first(mask: np.ndarray) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else None


def _user_images(col: pa.Array, path: Path, name: str, want: int | None) -> np.ndarray:
    """A list-of-numbers column -> float32 [n, L], refusing nulls, ragged rows, NaN/inf."""
    t = col.type
    listy = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    if not listy or not (pa.types.is_integer(t.value_type) or pa.types.is_floating(t.value_type)):
        raise UserError(f"{path}: column {name!r} has type {t}; expected a list of numbers per row "
                        "(encoded/binary images are not supported)")
    if len(col) == 0:
        return np.zeros((0, want or 0), np.float32)
    if (row := _first(col.is_null().to_numpy(zero_copy_only=False))) is not None:
        raise UserError(f"{path}: column {name!r}, row {row} is null")
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    want = want if want is not None else (int(lengths[0]) if lengths.size else 0)
    if (row := _first(lengths != want)) is not None:
        raise UserError(f"{path}: column {name!r}, row {row} has {int(lengths[row])} values; expected {want} "
                        "(like the first row, or C*H*W of data.image_shape)")
    values = col.flatten()  # honours offsets and slicing, unlike .values
    if (i := _first(values.is_null().to_numpy(zero_copy_only=False))) is not None:
        raise UserError(f"{path}: column {name!r}, row {i // want} holds a null value")
    flat = values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, want)
    if (i := _first(~np.isfinite(flat).all(axis=1))) is not None:
        raise UserError(f"{path}: column {name!r}, row {i} holds NaN or infinity (or a value too big for float32)")
    return flat


def _user_labels(col: pa.Array, path: Path, name: str) -> np.ndarray:
    """An integer (or whole-valued float) column -> int64 [n] in [0, MAX_CLASSES)."""
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        raise UserError(f"{path}: column {name!r} has type {col.type}; labels must be integers 0..K-1")
    if (row := _first(col.is_null().to_numpy(zero_copy_only=False))) is not None:
        raise UserError(f"{path}: column {name!r}, row {row} is null")
    raw = col.to_numpy(zero_copy_only=False)
    if pa.types.is_floating(col.type) and (row := _first(~np.isfinite(raw) | (raw != np.round(raw)))) is not None:
        raise UserError(f"{path}: column {name!r}, row {row} is {raw[row]}; labels must be whole numbers")
    if (row := _first(raw < 0)) is not None:
        raise UserError(f"{path}: column {name!r}, row {row} is {raw[row]}; labels must be >= 0")
    if (row := _first(raw >= MAX_CLASSES)) is not None:
        raise UserError(f"{path}: column {name!r}, row {row} is {raw[row]}; labels must be < {MAX_CLASSES}")
    return raw.astype(np.int64)


def _user_split(col: pa.Array, path: Path) -> np.ndarray:
    """An optional `split` column -> object [n] of "train" / "val" / "test"."""
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise UserError(f"{path}: column 'split' has type {col.type}; expected strings train/val/test")
    values = np.asarray(col.to_pylist(), dtype=object)
    if (row := _first(~np.isin(values, SPLITS))) is not None:
        raise UserError(f"{path}: column 'split', row {row} is {values[row]!r}; allowed: {', '.join(SPLITS)}")
    return values


def _user_given(parts: dict[Path, tuple]) -> np.ndarray | None:
    """The user's split column over all files; all files must have it, or none."""
    lacking = [path for path, p in parts.items() if p[2] is None]
    if len(lacking) == len(parts):
        return None
    if lacking:
        raise UserError(f"{lacking[0]}: no 'split' column, but other files in data.path have one")
    return np.concatenate([p[2] for p in parts.values()])


def _user_shape(cfg: DataConfig, length: int, first_file: Path) -> list[int]:
    """[C, H, W] from data.image_shape, or 1xSxS when the row length is a perfect square."""
    if cfg.image_shape:
        if math.prod(cfg.image_shape) != length:
            raise UserError(f"{first_file}: column {cfg.image_column!r}, row 0 has {length} values but "
                            f"data.image_shape {cfg.image_shape} needs {math.prod(cfg.image_shape)}")
        return list(cfg.image_shape)
    side = math.isqrt(length)
    if side * side != length or length == 0:
        raise UserError(f"{first_file}: column {cfg.image_column!r} rows have {length} values, not a square "
                        "image; set data.image_shape to [C, H, W]")
    return [1, side, side]


# ---------------------------------------------------------------------------- reading


def read_manifest(data_dir: str | Path) -> dict:
    """The manifest of a prepared folder; UserError if missing, unreadable or malformed."""
    path = Path(data_dir) / MANIFEST_FILE
    if not path.is_file():
        raise UserError(f"{path}: not found; {data_dir} is not a prepared data folder (run prepare first)")
    manifest = read_json(path)
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: expected a JSON object")
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path}: key 'format' is {manifest.get('format')!r}; this version reads format {FORMAT}")
    for key in ("image_shape", "num_classes", "classes", "counts", "shards"):
        if key not in manifest:
            raise UserError(f"{path}: missing key {key!r}")
    shape = manifest["image_shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape)):
        raise UserError(f"{path}: key 'image_shape' must be [C, H, W] positive integers, got {shape!r}")
    for i, shard in enumerate(manifest["shards"] if isinstance(manifest["shards"], list) else [None]):
        _check_shard_entry(shard, f"{path}: shards[{i}]")
    return manifest


def _check_shard_entry(shard: Any, where: str) -> None:
    if not isinstance(shard, dict) or not {"path", "split", "rows", "sha256"} <= shard.keys():
        raise UserError(f"{where} needs keys path, split, rows, sha256")
    # A bare file name only: a manifest must not point reads outside its own folder.
    if not isinstance(shard["path"], str) or not _SHARD_NAME.fullmatch(shard["path"]):
        raise UserError(f"{where}: path {shard['path']!r} is not a shard file name like train-00000.parquet")
    if shard["split"] not in SPLITS:
        raise UserError(f"{where}: split {shard['split']!r} is not one of {', '.join(SPLITS)}")


def shard_paths(data_dir: str | Path, split: str, verify: bool = True) -> list[Path]:
    """The split's shard files in order (for Ray Data's read_parquet), sha256-checked unless verify=False."""
    _check_split(split)
    data_dir = Path(data_dir)
    entries = [s for s in read_manifest(data_dir)["shards"] if s["split"] == split]
    if verify:
        for shard in entries:  # all of them before anyone reads a byte
            verify_sha256(data_dir / shard["path"], shard["sha256"])
    return [data_dir / shard["path"] for shard in entries]


def load_split(data_dir: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify and read one split: x float32 [N, C, H, W], y int64 [N] (N may be 0)."""
    shape = read_manifest(data_dir)["image_shape"]
    xs, ys = [torch.zeros(0, *shape)], [torch.zeros(0, dtype=torch.int64)]
    for path in shard_paths(data_dir, split, verify=True):
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path}: not a readable Parquet file ({e})") from None
        x, y = decode_batch(table, shape)
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} (allowed: {', '.join(SPLITS)})")


def decode_batch(batch: Any, image_shape: list[int] | tuple[int, ...] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A pyarrow Table / RecordBatch, or Ray Data's dict of numpy columns
    ({"image": [N, C*H*W] or object [N] of [C*H*W] arrays, "label": [N]}) ->
    x float32 [N, C, H, W], y int64 [N]. `image_shape` defaults to the schema metadata
    (arrow input only)."""
    if isinstance(batch, (pa.Table, pa.RecordBatch)):
        shape = image_shape or _shape_from_schema(batch.schema)
        flat, labels = _arrow_arrays(batch)
    elif isinstance(batch, dict):
        if image_shape is None:
            raise UserError("decode_batch: image_shape is required for a dict of numpy columns")
        shape = image_shape
        flat, labels = _dict_arrays(batch)
    else:
        raise TypeError(f"decode_batch: expected a pyarrow Table/RecordBatch or dict, got {type(batch).__name__}")
    return _to_tensors(flat, labels, list(shape))


def _arrow_arrays(batch: pa.Table | pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
    """-> image values float32 [N * C*H*W] (flat), labels [N]."""
    image, label = _arrow_column(batch, "image"), _arrow_column(batch, "label")
    if isinstance(image, pa.ChunkedArray):
        image, label = image.combine_chunks(), label.combine_chunks()
    # flatten(), unlike .values, honours a sliced batch's offset.
    return image.flatten().to_numpy(zero_copy_only=False), label.to_numpy(zero_copy_only=False)


def _dict_arrays(batch: dict) -> tuple[np.ndarray, np.ndarray]:
    """Ray Data's numpy batch -> images [N, C*H*W] (or [N, C, H, W]), labels [N]."""
    for key in ("image", "label"):
        if key not in batch:
            raise UserError(f"decode_batch: batch has no {key!r} column (has {', '.join(map(str, batch))})")
    # Ray hands fixed_size_list over as a 2-D array or as an object array of 1-D rows.
    images = np.asarray(batch["image"])
    if images.dtype == object:
        images = np.stack(list(images)) if images.size else np.zeros((0, 0), np.float32)
    return images, np.asarray(batch["label"])


def _arrow_column(batch: pa.Table | pa.RecordBatch, name: str) -> Any:
    if name not in batch.schema.names:
        raise UserError(f"decode_batch: batch has no {name!r} column (has {', '.join(batch.schema.names)})")
    return batch.column(name)


def _shape_from_schema(schema: pa.Schema) -> list[int]:
    raw = (schema.metadata or {}).get(SHAPE_KEY)
    if raw is None:
        raise UserError(f"decode_batch: no {SHAPE_KEY.decode()} schema metadata; pass image_shape")
    return json.loads(raw)


def _to_tensors(flat: np.ndarray, labels: np.ndarray, shape: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    n = labels.shape[0]
    if flat.size != n * math.prod(shape):
        raise UserError(f"decode_batch: {flat.size} image values do not make {n} images of shape {shape}")
    # np.array copies: arrow buffers are read-only, and torch wants writable memory.
    x = torch.from_numpy(np.array(flat, dtype=np.float32).reshape(n, *shape))
    y = torch.from_numpy(np.array(labels, dtype=np.int64))
    return x, y
