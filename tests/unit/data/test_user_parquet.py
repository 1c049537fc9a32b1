"""distillery.data's user Parquet source: round trips with a shape or a split column, errors that
name the column and the row, classes too small to stratify."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distillery import data
from distillery.config import DataConfig
from distillery.core.errors import UserError


def _user_table(n=60, length=64, fixed=False) -> dict:
    """Columns of a valid user table; image[0] = row / 1000 identifies each row."""
    images = np.random.default_rng(0).random((n, length))
    images[:, 0] = np.arange(n) / 1000
    return {"image": [list(r) for r in images], "label": [i % 3 for i in range(n)]}


def _write_user(path: Path, cols: dict, image_type=pa.list_(pa.float64())) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({k: (pa.array(v, image_type) if k == "image" else v) for k, v in cols.items()})
    pq.write_table(table, path)
    return path


def test_user_parquet_round_trip_with_shape(tmp_path):
    cols = _user_table()
    src = _write_user(tmp_path / "in.parquet", cols, pa.list_(pa.float32(), 64))
    cfg = DataConfig(source="parquet", path=str(src), image_shape=[2, 4, 8], val_fraction=0.0)
    m = data.prepare(cfg, tmp_path / "out", seed=0)
    assert m["image_shape"] == [2, 4, 8] and m["num_classes"] == 3 and m["source_path"] == str(src.resolve())
    assert m["counts"]["train"]["total"] == 48 and m["counts"]["test"]["per_class"] == [4, 4, 4]
    x, y = data.load_split(tmp_path / "out", "train")
    assert x.shape == (48, 2, 4, 8)
    row = int(round(float(x[0, 0, 0, 0]) * 1000))  # which source row this is
    want = torch.tensor(cols["image"][row], dtype=torch.float32).reshape(2, 4, 8)
    assert torch.equal(x[0], want) and int(y[0]) == row % 3


def test_user_parquet_folder_square_and_split_column(tmp_path):
    cols = _user_table(n=40, length=16)
    splits = ["train"] * 30 + ["val"] * 4 + ["test"] * 6
    _write_user(tmp_path / "in" / "a.parquet", {k: v[:20] for k, v in cols.items()} | {"split": splits[:20]})
    _write_user(tmp_path / "in" / "b.parquet", {k: v[20:] for k, v in cols.items()} | {"split": splits[20:]})
    m = data.prepare(DataConfig(source="parquet", path=str(tmp_path / "in")), tmp_path / "out", seed=0)
    assert m["image_shape"] == [1, 4, 4]
    assert [m["counts"][s]["total"] for s in data.SPLITS] == [30, 4, 6]
    x, _ = data.load_split(tmp_path / "out", "test")
    ids = sorted(int(round(float(v) * 1000)) for v in x[:, 0, 0, 0])
    assert ids == list(range(34, 40))  # the user's test rows, not a fresh split


def _bad_user(tmp_path, change) -> Path:
    cols = _user_table(n=30)
    change(cols)
    return _write_user(tmp_path / "bad.parquet", cols)


def _set(cols, key, row, value):
    cols[key][row] = value


@pytest.mark.parametrize("change, expected", [
    (lambda c: c.update(target=c.pop("label")), ["'label'", "image, target"]),
    (lambda c: _set(c, "label", 7, None), ["'label'", "row 7", "null"]),
    (lambda c: _set(c, "image", 5, [0.5] * 63), ["'image'", "row 5", "63", "64"]),
    (lambda c: _set(c, "image", 9, [0.5] * 10 + [float("nan")] + [0.5] * 53), ["'image'", "row 9", "NaN"]),
    (lambda c: _set(c, "image", 11, None), ["'image'", "row 11", "null"]),
    (lambda c: _set(c, "label", 4, -2), ["'label'", "row 4", ">= 0"]),
    (lambda c: c.update(label=[str(v) for v in c["label"]]), ["'label'", "string"]),
    (lambda c: c.update(split=["train"] * 12 + ["dev"] + ["test"] * 17), ["'split'", "row 12", "dev"]),
])
def test_user_parquet_errors_name_column_and_row(tmp_path, change, expected):
    src = _bad_user(tmp_path, change)
    with pytest.raises(UserError) as e:
        data.prepare(DataConfig(source="parquet", path=str(src)), tmp_path / "out", seed=0)
    for text in expected:
        assert text in str(e.value)
    assert "bad.parquet" in str(e.value)


def test_user_parquet_needs_shape_for_non_square(tmp_path):
    src = _write_user(tmp_path / "in.parquet", _user_table(length=12))
    with pytest.raises(UserError, match="image_shape"):
        data.prepare(DataConfig(source="parquet", path=str(src)), tmp_path / "out", seed=0)
    cfg = DataConfig(source="parquet", path=str(src), image_shape=[3, 2, 3])
    with pytest.raises(UserError, match="row 0 has 12 values; expected 18"):
        data.prepare(cfg, tmp_path / "out", seed=0)


def test_class_too_small_to_stratify(tmp_path):
    cols = _user_table(n=30)
    cols["label"][3] = 5  # class 5 has one row; classes 3 and 4 have none, which is fine
    src = _write_user(tmp_path / "in.parquet", cols)
    with pytest.raises(UserError, match="class 5 .* only 1 row"):
        data.prepare(DataConfig(source="parquet", path=str(src)), tmp_path / "out", seed=0)
    tiny = DataConfig(source="synthetic", num_samples=20, num_classes=10)  # 4 test rows < 10 classes
    with pytest.raises(UserError, match="stratified"):
        data.prepare(tiny, tmp_path / "out", seed=0)


def test_source_inside_output_refused(tmp_path):
    src = _write_user(tmp_path / "in.parquet", _user_table())
    with pytest.raises(UserError, match="inside the output folder"):
        data.prepare(DataConfig(source="parquet", path=str(src)), tmp_path, seed=0)
