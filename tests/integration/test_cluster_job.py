"""`ray job submit` of jobs/pipeline.py against a cluster this test starts with `ray start --head`
on 127.0.0.1, token authentication on: refused without the token, run to the end with it
(Ray Train on the cluster's workers, Serve deployed on the cluster), the deployment still
answering over HTTP after the job ended, and the cluster stopped afterwards. The run lives at
an s3:// URI (a real S3 server on 127.0.0.1) and the job's driver has a cache of its own, not
the node's: as on separate nodes, the workers and replicas get everything they read from the
bucket. A client elsewhere and a second driver then use the run by its URI alone."""

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port, make_bucket
from ray_nodes import kill_tree, submit
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
        kill_tree(head)  # a graceful stop took 34 s; nothing here needs one
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


def _pipeline(driver_cache: Path, *args: str) -> list[str]:
    """The job's entrypoint: jobs/pipeline.py with a cache of its own. Set in the entrypoint's
    environment, it reaches the driver only: the workers and replicas Ray starts for the job
    keep the node's, as if the driver ran on another machine."""
    return ["env", f"DISTILLERY_CACHE={driver_cache}", sys.executable, "jobs/pipeline.py", *args]


def test_submit_without_the_token_is_refused(cluster, tmp_path):
    address, _, env, _, _ = cluster
    # No token anywhere: not in the environment, not in ~/.ray/auth_token.
    anonymous = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"} | {"HOME": str(tmp_path)}
    result = submit(address, anonymous, sys.executable, "-c", "print('should not run')", timeout=120)
    assert result.returncode != 0
    assert "should not run" not in result.stdout
    assert "token" in (result.stdout + result.stderr).lower()


@pytest.fixture(scope="module")
def submitted(cluster, tmp_path_factory):
    """The tiny pipeline submitted once, its run at an s3:// URI, its driver's cache apart
    from the node's: (cluster, bucket, pipeline args, driver cache, `ray job submit`'s result)."""
    address, _, env, _, _ = cluster
    bucket, cache = make_bucket("cluster"), tmp_path_factory.mktemp("driver") / "cache"
    # One fine-tuned variant and one quantized (fine-tuning workers and replicas read what they
    # load from the bucket either way), a one-level load test without the ramp: the load
    # test's own behaviour is test_pipeline's and test_reliability's.
    variants = "[{name: slim, steps: [{kind: prune_channels, mac_ratio: 1.5, round_to: 4}, {kind: finetune, epochs: 1}]}, " \
               "{name: int8, steps: [{kind: int8_static, calibration_samples: 64}]}]"
    args = ["--config", "configs/tiny.yaml", "--set", f"storage_path={bucket}/runs",
            "--set", f"serve.port={SERVE_PORT}", "--set", f"serve.grpc_port={free_port()}",
            "--set", "distill.cache_teacher_logits=true", "--set", f"compress.variants={variants}",
            "--set", "loadtest.concurrency=[2]", "--set", "loadtest.ramp=[]", "--set", "loadtest.adaptive=[]"]
    result = submit(address, env, *_pipeline(cache, *args), timeout=800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return cluster, bucket, args, cache, result


MAX_CONSOLE_LINES = 80


def driver_output(stdout: str) -> str:
    """What the job's driver printed: `ray job submit` frames it with lines of its own."""
    body = stdout.split("Tailing logs until the job exits (disable with --no-wait):", 1)[1]
    return body[:body.rindex("Job '")].rstrip().rstrip("-")


def test_a_successful_run_prints_a_short_console_without_warnings_or_tracebacks(submitted):
    """The pipeline's console on a non-interactive stdout, as `ray job submit` shows it: at most
    MAX_CONSOLE_LINES lines, no traceback, no warning; every epoch is in the run's log instead."""
    _, _, _, driver_cache, result = submitted
    lines = [line for line in driver_output(result.stdout).splitlines() if line.strip()]
    assert 10 < len(lines) <= MAX_CONSOLE_LINES, "\n".join(lines)
    noisy = [line for line in lines if any(word in line for word in ("Traceback", "WARNING", "Warning", "ERROR", " E "))]
    assert not noisy, noisy
    assert not [line for line in lines if "epoch 1/2" in line]
    assert "[teacher] epoch 2/2" in next(driver_cache.rglob("logs/run.log")).read_text()


def _get(rel: str) -> bytes:
    import boto3

    return boto3.client("s3").get_object(Bucket="cluster", Key=f"runs/tiny/{rel}")["Body"].read()


@pytest.mark.timeout(900)
def test_pipeline_job_runs_on_the_cluster_through_the_bucket_and_keeps_serving(submitted):
    """Ray Train workers, Ray Data tasks and Serve replicas use the node's cache, the driver
    another: everything they read had to come from the bucket, verified, as on other nodes."""
    import boto3

    (_, _, _, _, node_cache), bucket, _, driver_cache, result = submitted
    assert "succeeded" in result.stdout
    driver = driver_output(result.stdout)
    assert "ingress: Ray Serve's Python proxy" in driver  # and the job says how to get HAProxy
    assert f"run directory: {bucket}/runs/tiny (this node's copy: {driver_cache}" in driver
    assert f"serving http://127.0.0.1:{SERVE_PORT}/v2" in driver
    manifest = json.loads(_get("manifest.json"))
    assert all(s["status"] == "done" for s in manifest["stages"].values()) and "teacher_logits" in manifest["stages"]
    assert manifest["stages"]["teacher"]["metrics"]["workers"] == 2  # Ray Train on the cluster
    assert "report.md" in manifest["files"]
    for rel, sha in manifest["files"].items():  # the whole run is in the bucket, intact
        assert hashlib.sha256(_get(rel)).hexdigest() == sha, rel
    assert any(k.startswith("runs/tiny/ray/teacher-") for k in _keys(boto3.client("s3"), "cluster"))  # checkpoints

    node = node_cache / "s3" / "cluster" / "runs" / "tiny"
    fetched = {str(p.relative_to(node)) for p in node.rglob("*") if p.is_file()}
    front = json.loads(_get("frontier.json"))
    served = set(front["pareto"]) | {front["recommended"]["name"]}
    folders = {n if n in ("teacher", "student", "student_scratch") else f"variants/{n}" for n in served}
    assert {"data/manifest.json", "data/val-00000.parquet", "teacher/model.safetensors"} <= fetched, fetched
    assert {f"{folder}/model.safetensors" for folder in folders} <= fetched, (folders, fetched)
    for rel in fetched & manifest["files"].keys():
        assert sha256_file(node / rel) == manifest["files"][rel], rel

    # The job has ended; Serve lives on in the cluster and answers a real test image.
    with urllib.request.urlopen(f"http://127.0.0.1:{SERVE_PORT}/v2/health/ready", timeout=10) as r:
        assert r.status == 200
    model = front["recommended"]["name"]
    request = urllib.request.Request(f"http://127.0.0.1:{SERVE_PORT}/v2/models/{model}/infer",
                                     data=_get("serve/request.json"), headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        reply = json.loads(r.read())
    assert reply["model_name"] == model and {o["name"] for o in reply["outputs"]} >= {"label", "logits"}


def test_a_client_elsewhere_names_the_run_by_its_uri(submitted, tmp_path):
    """Its test images come from the bucket, into a cache of its own."""
    (_, _, env, _, _), bucket, _, _, _ = submitted
    client = {**env, "DISTILLERY_CACHE": str(tmp_path / "client-cache")}
    model = json.loads(_get("frontier.json"))["recommended"]["name"]
    common = ["--url", f"http://127.0.0.1:{SERVE_PORT}", "--run-dir", f"{bucket}/runs/tiny"]
    query = subprocess.run([str(BIN / "distillery"), "query", *common, "--model", "auto", "--sample", "4"], env=client,
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert query.returncode == 0 and "correct: " in query.stdout, query.stdout + query.stderr
    load = subprocess.run([str(BIN / "distillery"), "loadtest", *common, "--models", model, "--concurrency", "2",
                           "--duration", "1", "--ramp", ""], env=client, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert load.returncode == 0, load.stdout[-3000:] + load.stderr[-3000:]
    sweep = json.loads((tmp_path / "loadtest" / "tiny" / "loadtest.json").read_text())["sweeps"]
    assert [(r["model"], r["concurrency"]) for r in sweep] == [(model, 2)] and sweep[0]["requests"] > 0
    assert not sweep[0]["errors"]


def test_resubmitting_from_a_driver_with_nothing_local_changes_nothing_and_no_keep_serving_takes_it_down(
        submitted, tmp_path):
    """The run is whole in the bucket, so a new driver with an empty cache redoes nothing."""
    (address, _, env, _, _), _, args, _, _ = submitted
    manifest = _get("manifest.json")
    result = submit(address, env, *_pipeline(tmp_path / "second-driver-cache", *args, "--no-keep-serving"),
                     timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert result.stdout.count("done already") == len(json.loads(manifest)["stages"])
    assert _get("manifest.json") == manifest
    assert "[serve] shut down (--no-keep-serving)" in result.stdout
    with pytest.raises(urllib.error.URLError):  # the cluster still runs; the deployment is gone
        urllib.request.urlopen(f"http://127.0.0.1:{SERVE_PORT}/v2/models", timeout=10)


def _keys(s3, bucket: str) -> list[str]:
    return [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
