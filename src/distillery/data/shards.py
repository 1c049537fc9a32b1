"""The shard format every stage reads: Parquet files plus a verified manifest.

Shard files `{split}-{index:05d}.parquet`, at most `shard_rows` rows each, schema:
  image  fixed_size_list<float32>[C*H*W]  one image, row-major (C, H, W), flattened
  label  int64                            class index in [0, num_classes)
  split  string                           "train" | "val" | "test"
  schema metadata b"distillery.image_shape" = JSON [C, H, W]

manifest.json (format 1) is written last and atomically, after every shard: a folder
without one was never completely prepared. It records each shard's rows and sha256, and
`load_split` / `shard_paths` verify them before anything is read. `decode_batch` turns a
batch from Ray Data or from `load_split` into the same tensors.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distillery.core.errors import UserError
from distillery.core.files import read_json, verify_sha256

SPLITS = ("train", "val", "test")
MANIFEST_FILE = "manifest.json"
FORMAT = 1
SHAPE_KEY = b"distillery.image_shape"
SCHEMA_DOC = {
    "image": "fixed_size_list<float32>[C*H*W]: one image, row-major (C, H, W), flattened",
    "label": "int64: class index in [0, num_classes)",
    "split": "string: train | val | test",
    "metadata": {"distillery.image_shape": "JSON [C, H, W]"},
}
SHARD_NAME = re.compile(r"(train|val|test)-\d{5}\.parquet")


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


def read_manifest(data_dir: str | Path) -> dict:
    """The manifest of a prepared folder; UserError if missing, unreadable or malformed."""
    path = Path(data_dir) / MANIFEST_FILE
    if not path.is_file():
        raise UserError(f"{path}: not found; {data_dir} is not a prepared data folder (run prepare first)")
    manifest = read_json(path)
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: expected a JSON object")
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path}: key 'format' is {manifest.get('format')!r}; this version "
                        f"reads format {FORMAT}")
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
    if not isinstance(shard["path"], str) or not SHARD_NAME.fullmatch(shard["path"]):
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
        raise TypeError("decode_batch: expected a pyarrow Table/RecordBatch or dict, got "
                        f"{type(batch).__name__}")
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
