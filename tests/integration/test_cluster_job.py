"""`ray job submit` of jobs/pipeline.py against a cluster this test starts with `ray start --head`
on 127.0.0.1, token authentication on: refused without the token, run to the end with it
(Ray Train on the cluster's workers, Serve deployed on the cluster), the deployment still
answering over HTTP after the job ended, and the cluster stopped afterwards. Then the same
pipeline with its run at an s3:// URI (a real S3 server on 127.0.0.1), from a driver whose
cache is not the cluster's: as on separate nodes, the workers and replicas get everything
they read from the bucket."""

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, free_port, make_bucket
from distillery.files import sha256_file
from distillery.serving import ingress

BIN = Path(sys.executable).parent
SERVE_PORT = free_port()  # one Serve instance per cluster: every run here serves on its port


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    """(dashboard address, token, env for clients with the token, GCS address, the node's
    distillery cache) of a one-node cluster that can reach the S3 server."""
    tmp = tmp_path_factory.mktemp("cluster")
    token = secrets.token_hex(32)
    # Started without HAProxy (as a cluster whose nodes lack cluster.yaml's environment): the
    # job serves through Ray's Python proxy, the fallback path; the other tests use HAProxy.
    env = {**os.environ, **s3_server, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "DISTILLERY_CACHE": str(tmp / "node-cache"), **ingress.ingress_env("proxy", "127.0.0.1")}
    env.pop("RAY_ADDRESS", None)
    dashboard, gcs = free_port(), free_port()
    # Ray's unix sockets live under its temp dir and their paths must stay under ~107 bytes:
    # pytest's tmp paths are too long.
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=4", "--disable-usage-stats",
         f"--ray-client-server-port={free_port()}", f"--temp-dir={temp}"],
        env=env, stdout=open(tmp / "head.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_until_up(address, token, head, tmp / "head.log")
        yield address, token, env, f"127.0.0.1:{gcs}", tmp / "node-cache"
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)


def _wait_until_up(address: str, token: str, head: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert head.poll() is None, log.read_text()[-3000:]
        try:
            request = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError("the head node did not come up in 120 s: " + log.read_text()[-3000:])


def _submit(address: str, env: dict, *job_args: str, timeout: float) -> subprocess.CompletedProcess:
    # Ray's dashboard can answer before its job agent is up; it then refuses the submission
    # with "please try again later", which is what a user would do.
    for _ in range(30):
        result = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
                                 "--", sys.executable, *job_args], env=env, cwd=ROOT, capture_output=True, text=True,
                                timeout=timeout)
        if "No available agent to submit job" not in result.stderr:
            return result
        time.sleep(2)
    return result


def test_submit_without_the_token_is_refused(cluster, tmp_path):
    address, _, env, _, _ = cluster
    # No token anywhere: not in the environment, not in ~/.ray/auth_token.
    anonymous = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"} | {"HOME": str(tmp_path)}
    result = _submit(address, anonymous, "-c", "print('should not run')", timeout=120)
    assert result.returncode != 0
    assert "should not run" not in result.stdout
    assert "token" in (result.stdout + result.stderr).lower()


@pytest.fixture(scope="module")
def submitted(cluster, tmp_path_factory):
    """The tiny pipeline submitted once: (cluster, run dir, serve port, `ray job submit`'s result)."""
    address, _, env, _, _ = cluster
    storage, port = tmp_path_factory.mktemp("job") / "runs", SERVE_PORT
    args = ["jobs/pipeline.py", "--config", "configs/tiny.yaml", "--set", f"storage_path={storage}",
            "--set", f"serve.port={port}"]
    result = _submit(address, env, *args, timeout=800)
    return cluster, args, storage / "tiny", port, result


@pytest.mark.timeout(900)
def test_pipeline_job_runs_on_the_cluster_and_keeps_serving(submitted):
    _, _, root, port, result = submitted
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "succeeded" in result.stdout
    assert "ingress: Ray Serve's Python proxy" in result.stdout  # and the job says how to get HAProxy
    manifest = json.loads((root / "manifest.json").read_text())
    assert all(s["status"] == "done" for s in manifest["stages"].values())
    assert manifest["stages"]["teacher"]["metrics"]["workers"] == 2  # Ray Train on the cluster
    assert (root / "report.md").is_file() and f"serving http://127.0.0.1:{port}/v2" in result.stdout
    # The job has ended; Serve lives on in the cluster and answers a real test image.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=10) as r:
        assert r.status == 200
    model = json.loads((root / "frontier.json").read_text())["recommended"]["name"]
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{model}/infer",
                                     data=(root / "serve" / "request.json").read_bytes(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        reply = json.loads(r.read())
    assert reply["model_name"] == model and {o["name"] for o in reply["outputs"]} >= {"label", "logits"}


def test_resubmitting_the_finished_job_with_no_keep_serving_changes_nothing_and_takes_it_down(submitted):
    (address, _, env, _, _), args, root, port, first = submitted
    assert first.returncode == 0
    manifest = (root / "manifest.json").read_bytes()
    result = _submit(address, env, *args, "--no-keep-serving", timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert result.stdout.count("done already") == len(json.loads(manifest)["stages"])
    assert (root / "manifest.json").read_bytes() == manifest
    assert "[serve] shut down (--no-keep-serving)" in result.stdout
    with pytest.raises(urllib.error.URLError):  # the cluster still runs; the deployment is gone
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models", timeout=10)


@pytest.mark.timeout(1200)
def test_a_run_at_an_s3_uri_reaches_the_workers_and_replicas_through_the_bucket(cluster, tmp_path):
    """The driver runs beside the cluster with a cache of its own; the Ray Train workers,
    Ray Data tasks and Serve replicas use the node's. So everything they read had to come
    from the bucket, verified, as it would on other nodes."""
    import boto3

    _, _, env, gcs, node_cache = cluster
    bucket, s3 = make_bucket("cluster"), boto3.client("s3")
    driver = {**env, "RAY_ADDRESS": gcs, "DISTILLERY_CACHE": str(tmp_path / "driver-cache")}
    args = [sys.executable, "jobs/pipeline.py", "--config", "configs/tiny.yaml", "--set", f"storage_path={bucket}/runs",
            "--set", f"serve.port={SERVE_PORT}", "--set", "distill.cache_teacher_logits=true"]
    result = subprocess.run(args, env=driver, cwd=ROOT, capture_output=True, text=True, timeout=1000)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    assert f"run directory: {bucket}/runs/tiny (this node's copy: {tmp_path / 'driver-cache'}" in result.stdout
    get = lambda rel: s3.get_object(Bucket="cluster", Key=f"runs/tiny/{rel}")["Body"].read()  # noqa: E731
    manifest_bytes = get("manifest.json")
    manifest = json.loads(manifest_bytes)
    assert all(s["status"] == "done" for s in manifest["stages"].values()) and "teacher_logits" in manifest["stages"]
    assert manifest["stages"]["teacher"]["metrics"]["workers"] == 2
    for rel, sha in manifest["files"].items():  # the whole run is in the bucket, intact
        assert hashlib.sha256(get(rel)).hexdigest() == sha, rel
    assert any(k.startswith("runs/tiny/ray/teacher-") for k in _keys(s3, "cluster"))  # Ray Train's checkpoints

    node = node_cache / "s3" / "cluster" / "runs" / "tiny"
    fetched = {str(p.relative_to(node)) for p in node.rglob("*") if p.is_file()}
    front = json.loads(get("frontier.json"))
    served = set(front["pareto"]) | {front["recommended"]["name"]}
    folders = {n if n in ("teacher", "student", "student_scratch") else f"variants/{n}" for n in served}
    assert {"data/manifest.json", "data/val-00000.parquet", "teacher/model.safetensors"} <= fetched, fetched
    assert {f"{folder}/model.safetensors" for folder in folders} <= fetched, (folders, fetched)
    for rel in fetched & manifest["files"].keys():
        assert sha256_file(node / rel) == manifest["files"][rel], rel

    model = front["recommended"]["name"]
    request = urllib.request.Request(f"http://127.0.0.1:{SERVE_PORT}/v2/models/{model}/infer",
                                     data=get("serve/request.json"), headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        assert json.loads(r.read())["model_name"] == model

    # A client elsewhere names the run by its URI: its test images come from the bucket.
    client = {**driver, "DISTILLERY_CACHE": str(tmp_path / "client-cache")}
    cli = [str(BIN / "distillery")]
    common = ["--url", f"http://127.0.0.1:{SERVE_PORT}", "--run-dir", f"{bucket}/runs/tiny"]
    query = subprocess.run([*cli, "query", *common, "--model", "auto", "--sample", "4"], env=client, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert query.returncode == 0 and "correct: " in query.stdout, query.stdout + query.stderr
    load = subprocess.run([*cli, "loadtest", *common, "--models", model, "--concurrency", "2", "--duration", "1",
                           "--ramp", ""], env=client, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert load.returncode == 0, load.stdout[-3000:] + load.stderr[-3000:]
    sweep = json.loads((tmp_path / "loadtest" / "tiny" / "loadtest.json").read_text())["sweeps"]
    assert [(r["model"], r["concurrency"]) for r in sweep] == [(model, 2)] and sweep[0]["requests"] > 0
    assert not sweep[0]["errors"]

    # Another driver with nothing local: the run is whole in the bucket, so nothing runs again.
    driver["DISTILLERY_CACHE"] = str(tmp_path / "second-driver-cache")
    again = subprocess.run([*args, "--no-keep-serving"], env=driver, cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-3000:]
    assert again.stdout.count("done already") == len(manifest["stages"])
    assert get("manifest.json") == manifest_bytes
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{SERVE_PORT}/v2/models/{model}", timeout=10)


def _keys(s3, bucket: str) -> list[str]:
    return [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
