"""distillery.data: sources, seeded stratified splits, Parquet shards, manifest verification.
The user Parquet source is test_user_parquet.py's."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.datasets import load_digits

from distillery import data
from distillery.config import DataConfig
from distillery.core.errors import UserError


def _shas(manifest: dict) -> list[str]:
    return [s["sha256"] for s in manifest["shards"]]


def _rows(x: torch.Tensor, y: torch.Tensor) -> collections.Counter:
    """A multiset of (image bytes, label), to compare splits with the source."""
    return collections.Counter((xi.numpy().tobytes(), int(yi)) for xi, yi in zip(x, y))


# ---------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("digits")
    return out, data.prepare(DataConfig(source="digits"), out, seed=0)


def test_digits_manifest_counts(digits_dir):
    out, m = digits_dir
    assert m == data.read_manifest(out)
    assert m["format"] == 1 and m["source"] == "digits" and m["seed"] == 0
    assert m["image_shape"] == [1, 8, 8] and m["num_classes"] == 10 and \
        m["classes"] == [str(i) for i in range(10)]
    assert sum(m["counts"][s]["total"] for s in data.SPLITS) == 1797
    per_class = np.sum([m["counts"][s]["per_class"] for s in data.SPLITS], axis=0)
    assert per_class.tolist() == np.bincount(load_digits().target).tolist()
    # ceil(0.2n), ceil(0.1n)
    assert m["counts"]["test"]["total"] == 360 and m["counts"]["val"]["total"] == 180


def test_digits_load_split_partitions_source_stratified(digits_dir):
    out, m = digits_dir
    d = load_digits()
    everything = collections.Counter()
    overall = np.bincount(d.target) / d.target.size
    for split in data.SPLITS:
        x, y = data.load_split(out, split)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape == (m["counts"][split]["total"], 1, 8, 8) and y.shape == (x.shape[0],)
        assert x.min() >= 0.0 and x.max() == 1.0
        assert torch.bincount(y, minlength=10).tolist() == m["counts"][split]["per_class"]
        assert np.abs(torch.bincount(y, minlength=10).numpy() / y.numel() - overall).max() < 0.02
        everything += _rows(x, y)
    source = torch.from_numpy((d.images[:, None] / 16.0).astype(np.float32))
    # Every source row lands in exactly one split: disjoint and complete.
    assert everything == _rows(source, torch.from_numpy(d.target))


def test_digits_deterministic_per_seed(digits_dir, tmp_path):
    _, m0 = digits_dir
    again = data.prepare(DataConfig(source="digits"), tmp_path / "a", seed=0)
    other = data.prepare(DataConfig(source="digits"), tmp_path / "b", seed=1)
    assert _shas(again) == _shas(m0)
    assert set(_shas(other)).isdisjoint(_shas(m0))


def test_empty_val_split(tmp_path):
    m = data.prepare(DataConfig(source="digits", val_fraction=0.0), tmp_path, seed=0)
    assert m["counts"]["val"] == {"total": 0, "per_class": [0] * 10}
    assert not [s for s in m["shards"] if s["split"] == "val"]
    assert data.shard_paths(tmp_path, "val") == []
    x, y = data.load_split(tmp_path, "val")
    assert x.shape == (0, 1, 8, 8) and y.shape == (0,) and y.dtype == torch.int64


def test_max_train_samples_subsamples_stratified(tmp_path):
    m = data.prepare(DataConfig(source="digits", max_train_samples=100), tmp_path, seed=0)
    assert m["counts"]["train"]["total"] == 100
    assert min(m["counts"]["train"]["per_class"]) >= 9
    assert m["counts"]["test"]["total"] == 360  # other splits untouched


# ---------------------------------------------------------------------------- CIFAR-10

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar_records(n: int, seed: int) -> np.ndarray:
    """n records [n, 3073] in the official layout: label byte, 1024 R, 1024 G, 1024 B."""
    records = np.random.default_rng(seed).integers(0, 256, (n, 3073), dtype=np.uint8)
    records[:, 0] = np.arange(n) % 10
    return records


def _write_cifar(folder: Path, batches=(1, 2), n=50, test_n=20, meta=True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for b in batches:
        records = _cifar_records(n, seed=b)
        if b == 2:  # a hand-made record 5 of data_batch_2: checks channel order and row-major
            records[5, 0] = 7
            records[5, 1:1025] = 10       # R plane
            records[5, 1 + 1] = 200       # R[h=0, w=1]
            records[5, 1025:2049] = 20    # G plane
            records[5, 2049:] = 30        # B plane
            records[5, 2049 + 32] = 250   # B[h=1, w=0]
        (folder / f"data_batch_{b}.bin").write_bytes(records.tobytes())
    (folder / "test_batch.bin").write_bytes(_cifar_records(test_n, seed=99).tobytes())
    if meta:
        (folder / "batches.meta.txt").write_text("\n".join(CLASSES) + "\n\n")


def test_cifar10_round_trip(tmp_path):
    src = tmp_path / "cifar"
    _write_cifar(src)
    m = data.prepare(DataConfig(source="cifar10", path=str(src)), tmp_path / "out", seed=0)
    assert m["classes"] == CLASSES and m["image_shape"] == [3, 32, 32] and m["num_classes"] == 10
    assert m["counts"]["test"]["total"] == 20 and m["counts"]["test"]["per_class"] == [2] * 10
    assert m["counts"]["train"]["total"] + m["counts"]["val"]["total"] == 100
    xs, ys = zip(*(data.load_split(tmp_path / "out", s) for s in data.SPLITS))
    x, y = torch.cat(xs), torch.cat(ys)
    hit = torch.nonzero((x[:, 0, 0, 1] == 200 / 255) & (x[:, 2, 1, 0] == 250 / 255)).flatten()
    assert hit.numel() == 1
    img, label = x[hit[0]], int(y[hit[0]])
    assert label == 7
    assert img[0, 0, 0] == np.float32(10) / np.float32(255) and \
        img[0, 0, 1] == np.float32(200) / np.float32(255)
    assert (img[1] == np.float32(20) / np.float32(255)).all()
    assert img[2, 1, 0] == np.float32(250) / np.float32(255) and \
        img[2, 0, 1] == np.float32(30) / np.float32(255)
    # The test split is exactly test_batch.bin, pixel for pixel.
    raw = _cifar_records(20, seed=99)
    want = torch.from_numpy(raw[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / np.float32(255))
    assert _rows(xs[2], ys[2]) == _rows(want, torch.from_numpy(raw[:, 0].astype(np.int64)))
    assert ys[2].tolist() != raw[:, 0].tolist()  # shuffled (seeded), so streamed batches mix classes


def test_cifar10_without_meta_uses_numbers(tmp_path):
    _write_cifar(tmp_path / "c", batches=(3,), meta=False)
    cfg = DataConfig(source="cifar10", path=str(tmp_path / "c"), val_fraction=0.0)
    m = data.prepare(cfg, tmp_path / "o", seed=0)
    assert m["classes"] == [str(i) for i in range(10)] and m["counts"]["train"]["total"] == 50


def _truncate(folder: Path) -> None:
    p = folder / "data_batch_1.bin"
    p.write_bytes(p.read_bytes()[:-100])


def _bad_label(folder: Path) -> None:
    p = folder / "data_batch_1.bin"
    raw = bytearray(p.read_bytes())
    raw[3 * 3073] = 12
    p.write_bytes(bytes(raw))


def _empty(folder: Path) -> None:
    for f in folder.iterdir():
        f.unlink()


@pytest.mark.parametrize("break_it, expected", [
    (_truncate, ["data_batch_1.bin", str(50 * 3073 - 100)]),
    (_bad_label, ["data_batch_1.bin", "record 3", "12"]),
    (lambda f: (f / "test_batch.bin").unlink(), ["test_batch.bin"]),
    (_empty, ["data_batch_1.bin"]),
    (lambda f: (f / "batches.meta.txt").write_text("cat\ndog\n"), ["batches.meta.txt"]),
])
def test_cifar10_malformed(tmp_path, break_it, expected):
    src = tmp_path / "cifar"
    _write_cifar(src)
    break_it(src)
    with pytest.raises(UserError) as e:
        data.prepare(DataConfig(source="cifar10", path=str(src)), tmp_path / "out", seed=0)
    for text in expected:
        assert text in str(e.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_cifar10_missing_path(tmp_path):
    with pytest.raises(UserError, match="data.path"):
        data.prepare(DataConfig(source="cifar10"), tmp_path, seed=0)
    with pytest.raises(UserError, match="nowhere"):
        data.prepare(DataConfig(source="cifar10", path=str(tmp_path / "nowhere")), tmp_path / "o", seed=0)


# ---------------------------------------------------------------------------- synthetic


def test_synthetic_shape_classes_deterministic_learnable(tmp_path):
    cfg = DataConfig(source="synthetic", image_shape=[3, 4, 5], num_classes=4, num_samples=400)
    m = data.prepare(cfg, tmp_path / "a", seed=3)
    assert m["image_shape"] == [3, 4, 5] and m["num_classes"] == 4
    assert sum(m["counts"][s]["total"] for s in data.SPLITS) == 400
    assert _shas(data.prepare(cfg, tmp_path / "b", seed=3)) == _shas(m)
    assert set(_shas(data.prepare(cfg, tmp_path / "c", seed=4))).isdisjoint(_shas(m))
    x, y = data.load_split(tmp_path / "a", "train")
    assert x.shape[1:] == (3, 4, 5) and set(y.tolist()) == {0, 1, 2, 3}
    # Learnable: nearest class mean from train classifies test almost perfectly.
    means = torch.stack([x[y == c].mean(0) for c in range(4)]).flatten(1)
    xt, yt = data.load_split(tmp_path / "a", "test")
    pred = torch.cdist(xt.flatten(1), means).argmin(1)
    assert (pred == yt).float().mean() > 0.9


def test_synthetic_defaults(tmp_path):
    m = data.prepare(DataConfig(source="synthetic", num_samples=100), tmp_path, seed=0)
    assert m["image_shape"] == [1, 8, 8] and m["num_classes"] == 10


# ---------------------------------------------------------------------------- shards


def test_shard_rows_splits_and_load_concatenates_in_order(tmp_path):
    m = data.prepare(DataConfig(source="digits", shard_rows=300), tmp_path, seed=0)
    train = [s for s in m["shards"] if s["split"] == "train"]
    assert [s["path"] for s in train] == [f"train-{i:05d}.parquet" for i in range(5)]
    assert [s["rows"] for s in train] == [300, 300, 300, 300, 57]
    paths = data.shard_paths(tmp_path, "train")
    assert paths == [tmp_path / s["path"] for s in train]
    parts = [data.decode_batch(pq.read_table(p)) for p in paths]
    x, y = data.load_split(tmp_path, "train")
    assert torch.equal(x, torch.cat([p[0] for p in parts])) and \
        torch.equal(y, torch.cat([p[1] for p in parts]))


def test_shard_schema(tmp_path):
    data.prepare(DataConfig(source="synthetic", num_samples=50, num_classes=2, image_shape=[2, 3, 3]),
                 tmp_path, seed=0)
    schema = pq.read_schema(tmp_path / "train-00000.parquet")
    assert schema.field("image").type == pa.list_(pa.float32(), 18)
    assert schema.field("label").type == pa.int64() and schema.field("split").type == pa.string()
    assert json.loads(schema.metadata[b"distillery.image_shape"]) == [2, 3, 3]
    assert set(pq.read_table(tmp_path / "train-00000.parquet").column("split").to_pylist()) == {"train"}


def test_rerun_removes_stale_shards(tmp_path):
    data.prepare(DataConfig(source="digits", shard_rows=300), tmp_path, seed=0)
    data.prepare(DataConfig(source="digits"), tmp_path, seed=0)
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == [
        "test-00000.parquet", "train-00000.parquet", "val-00000.parquet"]


def test_crash_leaves_no_manifest(tmp_path, monkeypatch):
    cfg = DataConfig(source="synthetic", num_samples=100, shard_rows=20)
    data.prepare(cfg, tmp_path, seed=0)
    calls = []

    def failing_write(table, where, **kw):
        calls.append(where)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(table, where, **kw)

    real = pq.write_table
    monkeypatch.setattr(pq, "write_table", failing_write)
    with pytest.raises(OSError):
        data.prepare(cfg, tmp_path, seed=1)
    assert not (tmp_path / "manifest.json").exists()
    with pytest.raises(UserError, match="manifest.json"):
        data.load_split(tmp_path, "train")


# ---------------------------------------------------------------------------- verification


@pytest.fixture
def small_dir(tmp_path) -> Path:
    data.prepare(DataConfig(source="synthetic", num_samples=100, shard_rows=30), tmp_path, seed=0)
    return tmp_path


def _flip_byte(p: Path) -> None:
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    p.write_bytes(bytes(raw))


@pytest.mark.parametrize("tamper", [_flip_byte, lambda p: p.write_bytes(p.read_bytes()[:-10]), Path.unlink])
def test_tampered_shard_refused(small_dir, tamper):
    tamper(small_dir / "train-00001.parquet")
    with pytest.raises(UserError, match="train-00001.parquet"):
        data.load_split(small_dir, "train")
    with pytest.raises(UserError, match="train-00001.parquet"):
        data.shard_paths(small_dir, "train")
    assert data.load_split(small_dir, "test")[0].shape[0] == 20  # other splits still load


def test_manifest_errors(tmp_path, small_dir):
    with pytest.raises(UserError, match="manifest.json"):
        data.read_manifest(tmp_path / "nothing")
    with pytest.raises(UserError, match="unknown split 'dev'"):
        data.load_split(small_dir, "dev")
    m = data.read_manifest(small_dir)
    m["shards"][0]["path"] = "../../etc/passwd"
    (small_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match=r"shards\[0\]"):
        data.read_manifest(small_dir)
    (small_dir / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        data.read_manifest(small_dir)


# ---------------------------------------------------------------------------- decode_batch


def test_decode_batch_matches_load_split(small_dir):
    x, y = data.load_split(small_dir, "test")  # 20 rows: one shard
    table = pq.read_table(data.shard_paths(small_dir, "test")[0])
    shape = data.read_manifest(small_dir)["image_shape"]
    for batch in (table, table.to_batches()[0]):
        bx, by = data.decode_batch(batch, shape)
        assert torch.equal(bx, x) and torch.equal(by, y) and \
            bx.dtype == torch.float32 and by.dtype == torch.int64
    flat = np.stack(table.column("image").to_numpy(zero_copy_only=False))
    labels = table.column("label").to_numpy()
    for images in (flat, table.column("image").to_numpy(zero_copy_only=False)):  # 2-D, or object of rows
        bx, by = data.decode_batch({"image": images, "label": labels}, shape)
        assert torch.equal(bx, x) and torch.equal(by, y)
    for part in (table.slice(5, 3), table.to_batches()[0].slice(5, 3)):  # shape from schema metadata
        bx, by = data.decode_batch(part)  # and slice offsets honoured
        assert torch.equal(bx, x[5:8]) and torch.equal(by, y[5:8])
    with pytest.raises(UserError, match="image_shape"):
        data.decode_batch({"image": flat, "label": labels})


def test_every_configurable_source_has_a_registered_loader():
    from distillery.config import DATA_SOURCES
    from distillery.data.sources import SOURCES, flips_keep_class

    assert sorted(SOURCES) == sorted(DATA_SOURCES)
    assert flips_keep_class("cifar10") and not flips_keep_class("digits")  # flips change a digit's class


def test_the_stages_read_from_the_prepared_data_whether_flips_keep_the_class(tmp_path):
    """`load_splits` hands training and the search the manifest with `flips_keep_class`, so
    neither asks the source registry: digits must not be flipped (a flipped 2 is no 2)."""
    from distillery.config import load_config
    from distillery.data.stage import load_splits, prepare_data
    from distillery.run.rundir import RunDir

    cfg = load_config(None, [f"storage_path={tmp_path}", "name=r"])
    run = RunDir.open(cfg)
    run.start("data", "fp")
    run.finish("data", "fp", prepare_data(run, cfg, lambda line: None)[0], {})
    manifest, splits = load_splits(run, ("val",))
    assert manifest["source"] == "digits" and manifest["flips_keep_class"] is False
    assert list(splits) == ["val"] and len(splits["val"][1]) == manifest["counts"]["val"]["total"]
