"""Where images come from: one loader per `DataConfig.source`, in `SOURCES`.

  digits     sklearn's bundled 8x8 digits, 1x8x8, values / 16 -> [0, 1]
  cifar10    the official CIFAR-10 *binary* files in `path`, 3x32x32, values / 255
  parquet    the user's Parquet file or folder: a list-of-numbers image column and an
             integer label column; values are kept as given (no scaling)
  synthetic  seeded class prototypes plus noise, clipped to [0, 1]; learnable on purpose
  folder     an image folder, `path/<class>/*` or `path/<split>/<class>/*` (PNG, JPEG, ... read
             with Pillow), resized and centre-cropped to `image_shape`, values / 255; files
             that are not readable images are skipped and listed in the manifest

A new source is one loader `(DataConfig, seed) -> Source` registered here with `@source`
(and its name added to `DataConfig.source`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distillery.config import DataConfig
from distillery.core.errors import UserError
from distillery.data.shards import SPLITS

MAX_CLASSES = 100_000  # same bound as DataConfig.num_classes; a stray huge label is a typo
CIFAR_RECORD = 1 + 3 * 32 * 32  # label byte + 1024 R + 1024 G + 1024 B
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch.bin"
CIFAR_META_FILE = "batches.meta.txt"


class Source(NamedTuple):
    """What a source loader returns: every row it has, plus any split it fixes itself."""

    images: np.ndarray  # float32 [N, C, H, W]
    labels: np.ndarray  # int64 [N]
    classes: list[str]  # K names; labels are in [0, K) (-1 and no names: an unlabeled folder)
    given: np.ndarray | None  # str [N] of "train"/"val"/"test", or None: split it all
    path: str | None  # resolved input path, for the manifest
    skipped: tuple[str, ...] = ()  # "file: why" for every input file left out


class SourceSpec(NamedTuple):
    load: Callable[[DataConfig, int], Source]
    natural_images: bool  # left-right flips keep the class (CIFAR-10), unlike digits


SOURCES: dict[str, SourceSpec] = {}


def source(name: str, *, natural_images: bool = False) -> Callable:
    """Register a loader `(DataConfig, seed) -> Source` as `data.source: name`."""
    def register(load: Callable[[DataConfig, int], Source]) -> Callable[[DataConfig, int], Source]:
        SOURCES[name] = SourceSpec(load, natural_images)
        return load
    return register


def load_source(cfg: DataConfig, seed: int) -> Source:
    """Dispatch on `cfg.source`; every loader returns float32 [N, C, H, W] images."""
    if cfg.source not in SOURCES:
        raise UserError(f"data.source: unknown source {cfg.source!r} (allowed: {', '.join(SOURCES)})")
    return SOURCES[cfg.source].load(cfg, seed)


def flips_keep_class(source_name: str) -> bool:
    """Whether random left-right flips suit a prepared dataset (its manifest's `source`)."""
    spec = SOURCES.get(source_name)
    return bool(spec and spec.natural_images)


@source("digits")
def _digits(cfg: DataConfig, seed: int) -> Source:
    from sklearn.datasets import load_digits  # 1 s of import: not for every Ray worker that reads shards

    d = load_digits()  # bundled with sklearn: works offline
    images = (d.images[:, None, :, :] / 16.0).astype(np.float32)  # pixel values are 0..16
    return Source(images, d.target.astype(np.int64), [str(n) for n in d.target_names], None, None)


@source("synthetic")
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


@source("cifar10", natural_images=True)
def _cifar10(cfg: DataConfig, seed: int) -> Source:
    folder = _input_path(cfg)
    if not folder.is_dir():
        raise UserError(f"data.path: {folder} must be the folder holding CIFAR-10's *.bin files")
    train_files = [folder / name for name in CIFAR_TRAIN_FILES if (folder / name).is_file()]
    if not train_files:
        raise UserError(f"{folder}: no CIFAR-10 training files (expected data_batch_1.bin … "
                        "data_batch_5.bin)")
    if not (folder / CIFAR_TEST_FILE).is_file():
        raise UserError(f"{folder / CIFAR_TEST_FILE}: not found (CIFAR-10 binary version needs "
                        f"{CIFAR_TEST_FILE})")
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
        raise UserError(f"{path}: record {int(bad[0])} has label byte {int(labels[bad[0]])}; "
                        "CIFAR-10 labels are 0-9")
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


@source("parquet")
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
        raise UserError(f"{path}: column {name!r}, row {i} holds NaN or infinity (or a value too "
                        "big for float32)")
    return flat


def _user_labels(col: pa.Array, path: Path, name: str) -> np.ndarray:
    """An integer (or whole-valued float) column -> int64 [n] in [0, MAX_CLASSES)."""
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        raise UserError(f"{path}: column {name!r} has type {col.type}; labels must be integers 0..K-1")
    if (row := _first(col.is_null().to_numpy(zero_copy_only=False))) is not None:
        raise UserError(f"{path}: column {name!r}, row {row} is null")
    raw = col.to_numpy(zero_copy_only=False)
    if pa.types.is_floating(col.type) \
            and (row := _first(~np.isfinite(raw) | (raw != np.round(raw)))) is not None:
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


# Image folders ---------------------------------------------------------------------------


@source("folder", natural_images=True)
def _image_folder(cfg: DataConfig, seed: int) -> Source:
    root = _input_path(cfg)
    if not root.is_dir() or cfg.image_shape is None:
        raise UserError(f"data.source folder needs data.path, a folder of <class>/ (or <split>/<class>/) "
                        f"subfolders, and data.image_shape [C, H, W] to resize to (C 1 or 3); got {root}")
    channels, height, width = cfg.image_shape
    if channels not in (1, 3):
        raise UserError(f"data.image_shape: {channels} channels; an image folder is read as 1 "
                        "(grey) or 3 (RGB)")
    splits = [d.name for d in sorted(root.iterdir()) if d.is_dir() and d.name in SPLITS]
    tops = [(root / split, split) for split in splits] if splits else [(root, None)]
    if cfg.labeled:
        classes = sorted({d.name for top, _ in tops for d in top.iterdir() if d.is_dir()})
        if len(classes) < 2:
            raise UserError(f"{root}: found {len(classes)} class folder(s); an image folder needs "
                            "one subfolder per class, at least two (or data.labeled: false for "
                            "images without labels)")
        files = [(file, label, split) for top, split in tops for label, name in enumerate(classes)
                 for file in (sorted((top / name).iterdir()) if (top / name).is_dir() else [])]
    else:  # every file at any depth; no classes
        classes = []
        files = [(file, -1, split) for top, split in tops for file in sorted(top.rglob("*"))
                 if file.is_file()]
    images, labels, given, skipped = [], [], [], []
    for file, label, split in files:
        image, why = _read_image(file, "L" if channels == 1 else "RGB", (width, height))
        if image is None:
            skipped.append(f"{file.relative_to(root)}: {why}")
            continue
        images.append(image)
        labels.append(label)
        given.append(split)
    if not images:
        raise UserError(f"{root}: no readable images ({len(skipped)} file(s) skipped, e.g. {skipped[:1]})")
    x = np.stack(images).astype(np.float32) / np.float32(255.0)
    x = x[:, None] if channels == 1 else x.transpose(0, 3, 1, 2)
    return Source(np.ascontiguousarray(x), np.asarray(labels, dtype=np.int64), classes,
                  np.asarray(given, dtype=object) if splits else None, str(root), tuple(skipped))


def _read_image(file: Path, mode: str, size: tuple[int, int]) -> tuple[np.ndarray | None, str]:
    """(pixels [H, W] or [H, W, 3] uint8, "") or (None, why it was left out)."""
    from PIL import Image, ImageOps, UnidentifiedImageError  # Pillow: only for image folders

    if not file.is_file():
        return None, "not a file"
    try:
        with Image.open(file) as img:
            img.load()
            try:
                converted = img.convert(mode)  # RGBA, palette, CMYK, 16-bit grey, ...: Pillow converts
            except ValueError:
                return None, f"image mode {img.mode} does not convert to {mode}"
            return np.asarray(ImageOps.fit(converted, size)), ""
    except (UnidentifiedImageError, OSError) as e:
        return None, f"not a readable image ({type(e).__name__})"
