"""Runs at an s3:// URI, against a real S3 server on 127.0.0.1 (moto's): paths and URIs,
verified copies, and a run that lives in the bucket alone — a node with an empty cache
picks it up where it stands, and a damaged object is refused or redone, never used.
(The cluster test runs the whole pipeline at a URI with Ray Train workers and Serve
replicas reading from the bucket.)"""

import hashlib
import json

import boto3
import pytest

from distillery import storage
from distillery.artifacts import sha256_file
from distillery.config import load_config
from distillery.errors import UserError
from distillery.pipeline import run_stages
from distillery.predictor import Predictor, ServedModel
from distillery.rundir import RunDir
from conftest import ROOT, make_bucket


def test_locations_join_and_unsupported_schemes_are_refused():
    assert storage.join("s3://b/runs", "tiny", "data/x.parquet") == "s3://b/runs/tiny/data/x.parquet"
    assert storage.join("s3://b/runs/?region=eu-west-1", "tiny") == "s3://b/runs/tiny?region=eu-west-1"
    assert storage.join("/shared/runs", "tiny") == "/shared/runs/tiny"
    assert storage.check_location("gs://bucket/runs") == "gs://bucket/runs"
    with pytest.raises(ValueError, match="hdfs:// is not supported"):
        storage.check_location("hdfs://namenode/runs")
    with pytest.raises(ValueError, match="names no bucket"):
        storage.check_location("s3:///runs")
    with pytest.raises(ValueError, match="'..' are not allowed"):
        storage.check_location("s3://bucket/runs/../../etc")


def test_a_fetched_object_is_verified_and_a_damaged_one_never_gets_the_name(s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    uri = make_bucket("fetch") + "/folder"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.bin").write_bytes(b"weights" * 1000)
    storage.upload(tmp_path / "src", ["a.bin"], uri)
    sha = sha256_file(tmp_path / "src" / "a.bin")

    root = storage.fetch(uri, {"a.bin": sha})
    assert root == storage.cache_dir(uri) and (root / "a.bin").read_bytes() == b"weights" * 1000

    boto3.client("s3").put_object(Bucket="fetch", Key="folder/a.bin", Body=b"tampered")
    (root / "a.bin").unlink()
    with pytest.raises(UserError, match=r"s3://fetch/folder/a.bin: sha256 mismatch"):
        storage.fetch(uri, {"a.bin": sha})
    assert not (root / "a.bin").exists() and list(root.iterdir()) == []  # no file, no temp file
    storage.fetch(uri, {"a.bin": sha, "missing.bin": sha}, missing_ok=True)
    assert list(root.iterdir()) == []
    with pytest.raises(UserError, match="s3://fetch/folder/missing.bin"):
        storage.fetch(uri, {"missing.bin": sha})


def _cfg(bucket: str, *overrides: str):
    return load_config(ROOT / "configs" / "tiny.yaml",
                       [f"storage_path={bucket}/runs", "ray.workers=0", "serve.enabled=false", *overrides])


def test_a_run_at_a_uri_lives_in_the_bucket(s3_server, tmp_path, monkeypatch):
    """Stages upload their files, then the manifest; another node (an empty cache) sees the
    run as it stands, re-runs nothing, and redoes only a stage whose object was damaged."""
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "node-a"))
    bucket, logs = make_bucket("run"), []
    run = run_stages(_cfg(bucket), ["data", "teacher"], log=logs.append)
    assert run.remote and run.location == f"{bucket}/runs/tiny"
    assert run.root == tmp_path / "node-a" / "s3" / "run" / "runs" / "tiny"
    s3 = boto3.client("s3")
    manifest = json.loads(s3.get_object(Bucket="run", Key="runs/tiny/manifest.json")["Body"].read())
    assert {n: s["status"] for n, s in manifest["stages"].items()} == {"data": "done", "teacher": "done"}
    for rel, sha in manifest["files"].items():  # every recorded file is in the bucket, intact
        body = s3.get_object(Bucket="run", Key=f"runs/tiny/{rel}")["Body"].read()
        assert sha256_file(run.root / rel) == sha and len(body) == (run.root / rel).stat().st_size

    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "node-b"))  # another node, nothing local
    logs.clear()
    run_stages(_cfg(bucket), ["data", "teacher"], log=logs.append)
    assert logs == ["[data] done already (outputs verified); --force redoes it",
                    "[teacher] done already (outputs verified); --force redoes it"]
    assert (tmp_path / "node-b" / "s3" / "run" / "runs" / "tiny" / "teacher" / "model.safetensors").is_file()

    # The teacher's weights are damaged in the bucket: a third node redoes the teacher alone.
    s3.put_object(Bucket="run", Key="runs/tiny/teacher/model.safetensors", Body=b"not weights")
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "node-c"))
    logs.clear()
    run = run_stages(_cfg(bucket), ["data", "teacher"], log=logs.append)
    assert logs[0].startswith("[data] done already") and "[teacher] running (attempt 2)" in logs
    weights = s3.get_object(Bucket="run", Key="runs/tiny/teacher/model.safetensors")["Body"].read()
    assert hashlib.sha256(weights).hexdigest() == run.manifest()["files"]["teacher/model.safetensors"]  # uploaded again


def test_a_replica_loads_a_model_from_the_bucket_and_refuses_a_damaged_one(s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "driver"))
    bucket = make_bucket("serve")
    run = run_stages(_cfg(bucket), ["data", "teacher"], log=lambda m: None)
    files = {rel.removeprefix("teacher/"): sha for rel, sha in run.manifest()["files"].items()
             if rel.startswith("teacher/")}
    served = ServedModel("teacher", run.location_of("teacher"), [1, 8, 8], 4, 0.5, 0.1, "eager", files=files)

    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "replica"))  # a replica on another node
    import torch

    logits = Predictor(served)(torch.zeros(2, 1, 8, 8))
    assert logits.shape == (2, 4)
    assert (tmp_path / "replica" / "s3" / "serve" / "runs" / "tiny" / "teacher" / "model.safetensors").is_file()

    boto3.client("s3").put_object(Bucket="serve", Key="runs/tiny/teacher/model.safetensors", Body=b"x")
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "replica-2"))
    with pytest.raises(UserError, match=r"s3://serve/runs/tiny/teacher/model.safetensors: sha256 mismatch"):
        Predictor(served)


def test_a_run_at_a_uri_with_no_manifest_there_starts_fresh(s3_server, tmp_path, monkeypatch):
    """The bucket is the truth: a leftover local copy of a run the bucket no longer has is not
    taken for done."""
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    bucket = make_bucket("fresh")
    run_stages(_cfg(bucket), ["data"], log=lambda m: None)
    boto3.resource("s3").Bucket("fresh").objects.all().delete()
    logs = []
    run_stages(_cfg(bucket), ["data"], log=logs.append)
    assert "[data] running" in logs
    assert RunDir.at(_cfg(bucket)).stage("data")["status"] == "done"


def test_clients_read_a_run_at_a_uri_from_the_bucket(s3_server, tmp_path, monkeypatch):
    """`distillery query --sample` and `distillery loadtest` read the test split from the
    bucket, verified; `loadtest --tune`'s settings go there, for `serve` on any node."""
    import torch

    from distillery import data
    from distillery.loadtest import held_out_images
    from distillery.serving import read_tuned, save_tuned

    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "driver"))
    bucket, s3 = make_bucket("clients"), boto3.client("s3")
    run = run_stages(_cfg(bucket), ["data"], log=lambda m: None)
    expected = data.load_split(run.root / "data", "test")

    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "client"))  # a client elsewhere
    x, y = held_out_images(run.location)
    assert len(y) > 0 and torch.equal(x, expected[0]) and torch.equal(y, expected[1])
    assert read_tuned(run.location) == {}
    save_tuned(run.location, {"student": {"chosen": {"max_batch_size": 16}}})

    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "another"))
    assert read_tuned(run.location) == {"student": {"max_batch_size": 16}}
    s3.put_object(Bucket="clients", Key="runs/tiny/serve/tuned.json", Body=b'{"student": {"batch": 16}}')
    with pytest.raises(UserError, match="tuned.json: not written by `distillery loadtest --tune`"):
        read_tuned(run.location)
    s3.delete_object(Bucket="clients", Key="runs/tiny/serve/tuned.json")
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "client"))  # its copy is stale now
    assert read_tuned(run.location) == {}

    shard = next(rel for rel in run.manifest()["files"] if rel.startswith("data/test-"))
    s3.put_object(Bucket="clients", Key=f"runs/tiny/{shard}", Body=b"not parquet")
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "third"))
    with pytest.raises(UserError, match=rf"s3://clients/runs/tiny/{shard}: sha256 mismatch"):
        held_out_images(run.location)
