"""Runs at an s3:// or gs:// URI, against real servers on 127.0.0.1 (moto's S3, and
gcp-storage-emulator's GCS): paths and URIs,
verified copies, and a run that lives in the bucket alone — a node with an empty cache
picks it up where it stands, and a damaged object is refused or redone, never used.
(The cluster test runs the whole pipeline at a URI with Ray Train workers and Serve
replicas reading from the bucket.)"""

import hashlib
import json

import pytest
from conftest import ROOT, STORE_SERVERS, make_bucket

from distillery.config import load_config
from distillery.core.errors import UserError
from distillery.core.files import sha256_file
from distillery.pipeline.stages import run_stages
from distillery.run import storage
from distillery.run.rundir import RunDir
from distillery.serving.predictor import Predictor, ServedModel


class Bucket:
    """A new bucket on the store under test; objects read and written as another client would."""

    def __init__(self, name: str, scheme: str):
        self.uri = make_bucket(name, scheme)

    def get(self, key: str) -> bytes:
        fs, path = storage.filesystem(f"{self.uri}/{key}")
        with fs.open_input_stream(path) as f:
            return f.read()

    def put(self, key: str, body: bytes) -> None:
        fs, path = storage.filesystem(f"{self.uri}/{key}")
        with fs.open_output_stream(path) as f:
            f.write(body)

    def delete(self, key: str) -> None:
        fs, path = storage.filesystem(f"{self.uri}/{key}")
        fs.delete_file(path)


@pytest.fixture(params=["s3", "gs"])
def bucket(request, tmp_path, monkeypatch):
    """A factory of new buckets on S3 (moto) or GCS (the emulator); a fresh node cache."""
    request.getfixturevalue(STORE_SERVERS[request.param])
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    return lambda name: Bucket(name, request.param)


def test_a_fetched_object_is_verified_and_a_damaged_one_never_gets_the_name(bucket, tmp_path):
    b = bucket("fetch")
    uri, scheme = b.uri + "/folder", b.uri.split(":")[0]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.bin").write_bytes(b"weights" * 1000)
    storage.upload(tmp_path / "src", ["a.bin"], uri)
    sha = sha256_file(tmp_path / "src" / "a.bin")
    assert b.get("folder/a.bin") == b"weights" * 1000

    root = storage.fetch(uri, {"a.bin": sha})
    assert root == storage.cache_dir(uri) and (root / "a.bin").read_bytes() == b"weights" * 1000

    # Streamed (the training split's read tasks): in memory, checked the same way, no copy left.
    assert storage.read_verified(uri, "a.bin", sha) == b"weights" * 1000

    b.put("folder/a.bin", b"tampered")
    (root / "a.bin").unlink()
    with pytest.raises(UserError, match=rf"{scheme}://fetch/folder/a.bin: sha256 mismatch"):
        storage.read_verified(uri, "a.bin", sha)
    with pytest.raises(UserError, match=rf"{scheme}://fetch/folder/a.bin: sha256 mismatch"):
        storage.fetch(uri, {"a.bin": sha})
    assert not (root / "a.bin").exists() and list(root.iterdir()) == []  # no file, no temp file
    storage.fetch(uri, {"a.bin": sha, "missing.bin": sha}, missing_ok=True)
    assert list(root.iterdir()) == []
    with pytest.raises(UserError, match=rf"{scheme}://fetch/folder/missing.bin"):
        storage.fetch(uri, {"missing.bin": sha})
    with pytest.raises(UserError, match=rf"{scheme}://fetch/folder/missing.bin"):
        storage.read_verified(uri, "missing.bin", sha)
    storage.delete(uri)
    assert storage.list_files(b.uri) == {}


def _cfg(bucket: str, *overrides: str):
    return load_config(ROOT / "configs" / "tiny.yaml",
                       [f"storage_path={bucket}/runs", "ray.workers=0", "serve.enabled=false", *overrides])


def test_a_run_at_a_uri_lives_in_the_bucket(bucket, tmp_path, monkeypatch):
    """Stages upload their files, then the manifest; another node (an empty cache) sees the
    run as it stands, re-runs nothing, and redoes only a stage whose object was damaged."""
    b, logs = bucket("run"), []
    scheme = b.uri.split(":")[0]
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "node-a"))
    run = run_stages(_cfg(b.uri), ["data", "teacher"], log=logs.append)
    assert run.remote and run.location == f"{b.uri}/runs/tiny"
    assert run.root == tmp_path / "node-a" / scheme / "run" / "runs" / "tiny"
    manifest = json.loads(b.get("runs/tiny/manifest.json"))
    assert {n: s["status"] for n, s in manifest["stages"].items()} == {"data": "done", "teacher": "done"}
    for rel, sha in manifest["files"].items():  # every recorded file is in the bucket, intact
        assert hashlib.sha256(b.get(f"runs/tiny/{rel}")).hexdigest() == sha == sha256_file(run.root / rel)

    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "node-b"))  # another node, nothing local
    logs.clear()
    run_stages(_cfg(b.uri), ["data", "teacher"], log=logs.append)
    assert logs[0].startswith("logs: ") and logs[1:] == [
        "[data] done already (outputs verified); --force redoes it",
        "[teacher] done already (outputs verified); --force redoes it"]
    fetched = tmp_path / "node-b" / scheme / "run" / "runs" / "tiny" / "teacher" / "model.safetensors"
    assert fetched.is_file()

    # The teacher's weights are damaged in the bucket: a third node redoes the teacher alone.
    b.put("runs/tiny/teacher/model.safetensors", b"not weights")
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "node-c"))
    logs.clear()
    run = run_stages(_cfg(b.uri), ["data", "teacher"], log=logs.append)
    assert logs[1].startswith("[data] done already") and "[teacher] running (attempt 2)" in logs
    weights = b.get("runs/tiny/teacher/model.safetensors")
    # uploaded again
    assert hashlib.sha256(weights).hexdigest() == run.manifest()["files"]["teacher/model.safetensors"]


def test_a_replica_loads_a_model_from_the_bucket_and_refuses_a_damaged_one(bucket, tmp_path, monkeypatch):
    b = bucket("serve")
    scheme = b.uri.split(":")[0]
    run = run_stages(_cfg(b.uri), ["data", "teacher"], log=lambda m: None)
    files = {rel.removeprefix("teacher/"): sha for rel, sha in run.manifest()["files"].items()
             if rel.startswith("teacher/")}
    served = ServedModel("teacher", run.location_of("teacher"), [1, 8, 8], 4, 0.5, 0.5, 0.1, "eager",
                         files=files)

    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "replica"))  # a replica on another node
    import torch

    logits = Predictor(served)(torch.zeros(2, 1, 8, 8))
    assert logits.shape == (2, 4)
    cached = tmp_path / "replica" / scheme / "serve" / "runs" / "tiny" / "teacher" / "model.safetensors"
    assert cached.is_file()

    b.put("runs/tiny/teacher/model.safetensors", b"x")
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "replica-2"))
    with pytest.raises(UserError,
                       match=rf"{scheme}://serve/runs/tiny/teacher/model.safetensors: sha256 mismatch"):
        Predictor(served)


def test_a_run_at_a_uri_with_no_manifest_there_starts_fresh(bucket):
    """The bucket is the truth: a leftover local copy of a run the bucket no longer has is not
    taken for done."""
    b = bucket("fresh")
    run_stages(_cfg(b.uri), ["data"], log=lambda m: None)
    storage.delete(f"{b.uri}/runs/tiny")
    assert storage.list_files(b.uri) == {}
    logs = []
    run_stages(_cfg(b.uri), ["data"], log=logs.append)
    assert "[data] running" in logs
    assert RunDir.at(_cfg(b.uri)).stage("data")["status"] == "done"


def test_clients_read_a_run_at_a_uri_from_the_bucket(bucket, tmp_path, monkeypatch):
    """`distillery query --sample` reads the test split and `distillery loadtest` the validation
    split from the bucket, verified; `loadtest --tune`'s settings go there, for `serve` on any node."""
    import torch

    from distillery import data
    from distillery.loadtest.run import held_out_images, images_to_send
    from distillery.serving.serve_apps import read_tuned, save_tuned

    b = bucket("clients")
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "driver"))
    run = run_stages(_cfg(b.uri), ["data"], log=lambda m: None)
    expected = data.load_split(run.root / "data", "test")

    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "client"))  # a client elsewhere
    x, y = held_out_images(run.location)
    assert len(y) > 0 and torch.equal(x, expected[0]) and torch.equal(y, expected[1])
    val = data.load_split(run.root / "data", "val")[0]
    sent = images_to_send(run.location, len(val) + 3)  # the load test's: validation images, repeated
    assert torch.equal(sent[:len(val)], val) and torch.equal(sent[len(val):], val[:3])
    assert read_tuned(run.location) == {}
    save_tuned(run.location, {"student": {"chosen": {"max_batch_size": 16}}})

    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "another"))
    assert read_tuned(run.location) == {"student": {"max_batch_size": 16}}
    b.put("runs/tiny/serve/tuned.json", b'{"student": {"batch": 16}}')
    with pytest.raises(UserError, match="tuned.json: not written by `distillery loadtest --tune`"):
        read_tuned(run.location)
    b.delete("runs/tiny/serve/tuned.json")
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "client"))  # its copy is stale now
    assert read_tuned(run.location) == {}

    shard = next(rel for rel in run.manifest()["files"] if rel.startswith("data/test-"))
    b.put(f"runs/tiny/{shard}", b"not parquet")
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "third"))
    with pytest.raises(UserError, match=rf"{b.uri}/runs/tiny/{shard}: sha256 mismatch"):
        held_out_images(run.location)


def test_a_teacher_imported_from_a_bucket_is_verified_like_a_local_one(bucket, tmp_path):
    """`teacher.import_from` at a URI: a run in the bucket (its teacher), a model folder and a
    .pt2 program there; a damaged weights object is refused by its recorded sha256."""
    import torch
    from torch.export import Dim

    from distillery import artifacts
    from distillery.artifacts.imported import import_model

    b = bucket("imports")
    run = run_stages(_cfg(b.uri), ["data", "teacher"], log=lambda m: None)
    teacher, _ = artifacts.load(run.root / "teacher")
    torch.export.save(torch.export.export(teacher, (torch.zeros(2, 1, 8, 8),),
                                          dynamic_shapes=({0: Dim("batch")},)), str(tmp_path / "t.pt2"))
    b.put("programs/t.pt2", (tmp_path / "t.pt2").read_bytes())
    x = torch.randn(3, 1, 8, 8)
    for location in (f"{b.uri}/runs/tiny", f"{b.uri}/runs/tiny/teacher", f"{b.uri}/programs/t.pt2"):
        got = import_model(location, None, [1, 8, 8], 4)
        assert got.source == location
        with torch.no_grad():
            assert torch.allclose(got.model(x), teacher(x), atol=1e-5), location
    b.put("runs/tiny/teacher/model.safetensors", b"damaged")
    with pytest.raises(UserError, match="model.safetensors"):
        import_model(f"{b.uri}/runs/tiny", None, [1, 8, 8], 4)
    with pytest.raises(UserError, match="no such object"):
        import_model(f"{b.uri}/programs/none.pt2", None, [1, 8, 8], 4)
