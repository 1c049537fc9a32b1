"""The cluster job, `ray job submit` of jobs/pipeline.py, on separate Ray nodes of one
machine (all on 127.0.0.1). One cluster for the module (`ray_nodes.Cluster`, the topology of
cluster.yaml): a head node with no CPUs for work, two worker nodes with 1 CPU each, every
node its own raylet, temporary folder and distillery cache, token authentication on, HAProxy
ingress; the runs live in a bucket of the S3 server on 127.0.0.1, so no node reads another
node's disk, and the job's driver has a cache of its own too: the workers and replicas get
everything they read from the bucket, verified. One job serves every test here (a submitted
pipeline costs minutes on 2 cores): a submit without the token refused, the job's console,
where things ran (read from Ray's state API, not inferred from the run finishing), a client
elsewhere and a second driver naming the run by its URI alone. Machines of their own (own
addresses, a firewall, a client that is not a node) and the loss of one while training and
serving are test_cluster_rig.py's; Ray's Python proxy, the fallback ingress, is
test_reliability.py's."""

import hashlib
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, make_bucket
from ray_nodes import BIN, Cluster, submit

from distillery.compat import ingress
from distillery.core.files import sha256_file

SERVE_PORT = free_port()  # one Serve instance on this cluster
COMMON = ["--config", "configs/tiny.yaml", "--set", "data.num_samples=1200",
          "--set", "teacher.train.epochs=4", "--set", "ray.placement_strategy=STRICT_SPREAD"]
VARIANTS = "[{name: slim, steps: [{kind: prune_channels, mac_ratio: 1.5, round_to: 4}, " \
           "{kind: finetune, epochs: 1}]}, " \
           "{name: int8, steps: [{kind: int8_static, calibration_samples: 64}]}]"
MAX_CONSOLE_LINES = 80


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    nodes = Cluster(tmp_path_factory.mktemp("nodes"), {**os.environ, **s3_server,
                                                       **ingress.ingress_env("haproxy", "127.0.0.1")})
    with nodes.running(workers=2):
        yield nodes


def _pipeline(driver_cache: Path, *args: str) -> list[str]:
    """The job's entrypoint: jobs/pipeline.py with a cache of its own. Set in the entrypoint's
    environment, it reaches the driver only: the workers and replicas Ray starts for the job
    keep their node's, as if the driver ran on another machine."""
    return ["env", f"DISTILLERY_CACHE={driver_cache}", sys.executable, "jobs/pipeline.py", *args]


@pytest.fixture(scope="module")
def job(cluster, tmp_path_factory):
    """The tiny pipeline submitted once: (bucket, pipeline args, driver cache, the job's result)."""
    bucket, cache = make_bucket("nodes"), tmp_path_factory.mktemp("driver") / "cache"
    # One fine-tuned variant and one quantized, a one-level load test without the ramp: the
    # load test's own behaviour is test_pipeline's and test_reliability's.
    args = [*COMMON, "--set", f"storage_path={bucket}/runs", "--set", "distill.cache_teacher_logits=true",
            "--set", f"compress.variants={VARIANTS}", "--set", f"serve.port={SERVE_PORT}",
            "--set", "serve.grpc_port=null",
            # Two replicas of each served model, spread over the nodes: losing one node leaves one.
            "--set", "serve.min_replicas=2", "--set", "serve.num_cpus=0.1", "--set", "serve.auto=false",
            "--set", "loadtest.concurrency=[2]", "--set", "loadtest.ramp=[]", "--set", "loadtest.adaptive=[]"]
    result = submit(cluster.dashboard, cluster.env, *_pipeline(cache, *args), timeout=800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return bucket, args, cache, result


def test_submit_without_the_token_is_refused(cluster, tmp_path):
    # No token anywhere: not in the environment, not in ~/.ray/auth_token.
    anonymous = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_TOKEN"} | {"HOME": str(tmp_path)}
    result = submit(cluster.dashboard, anonymous, sys.executable, "-c", "print('should not run')",
                    timeout=120)
    assert result.returncode != 0
    assert "should not run" not in result.stdout
    assert "token" in (result.stdout + result.stderr).lower()


def driver_output(stdout: str) -> str:
    """What the job's driver printed: `ray job submit` frames it with lines of its own."""
    body = stdout.split("Tailing logs until the job exits (disable with --no-wait):", 1)[1]
    return body[:body.rindex("Job '")].rstrip().rstrip("-")


def test_a_successful_run_prints_a_short_console_without_warnings_or_tracebacks(job):
    """The pipeline's console on a non-interactive stdout, as `ray job submit` shows it: at most
    MAX_CONSOLE_LINES lines, no traceback, no warning; every epoch is in the run's log instead."""
    _, _, driver_cache, result = job
    lines = [line for line in driver_output(result.stdout).splitlines() if line.strip()]
    assert 10 < len(lines) <= MAX_CONSOLE_LINES, "\n".join(lines)
    noisy = [line for line in lines
             if any(word in line for word in ("Traceback", "WARNING", "Warning", "ERROR", " E "))]
    assert not noisy, noisy
    assert not [line for line in lines if "epoch 1/4" in line]
    assert "[teacher] epoch 4/4" in next(driver_cache.rglob("logs/run.log")).read_text()


def _get(bucket: str, rel: str) -> bytes:
    import boto3

    return boto3.client("s3").get_object(Bucket=bucket.removeprefix("s3://"), Key=rel)["Body"].read()


def _read(bucket: str, rel: str) -> dict:
    return json.loads(_get(bucket, rel))


def test_the_job_runs_across_the_worker_nodes_and_keeps_serving(cluster, job):
    bucket, _, _, _ = job
    names, actors = cluster.names(), cluster.actors()
    workers = {node for node, name in names.items() if name != "head"}
    # Each Ray Train run (teacher, student_scratch, student, the slim fine-tune) had its two
    # workers on two different worker nodes: one placement group per run.
    groups: dict[str, set[str]] = {}
    for a in actors:
        if a["class_name"] == "RayTrainWorker":
            groups.setdefault(a["placement_group_id"], set()).add(a["node_id"])
    assert len(groups) >= 4 and all(len(nodes) == 2 and nodes <= workers for nodes in groups.values()), groups
    logits = [a for a in actors if "TeacherLogits" in a["class_name"]]
    assert logits and all(a["node_id"] in workers for a in logits)  # the teacher-logits cache
    replicas = [a for a in actors if a["class_name"].startswith("ServeReplica:") and a["state"] == "ALIVE"
                and "Model" in a["class_name"]]
    assert replicas and all(a["node_id"] in workers for a in replicas)
    manifest = _read(bucket, "runs/tiny/manifest.json")
    assert all(s["status"] == "done" for s in manifest["stages"].values()) and \
        "teacher_logits" in manifest["stages"]
    assert manifest["stages"]["teacher"]["metrics"]["workers"] == 2
    sweeps = _read(bucket, "runs/tiny/serve/loadtest/loadtest.json")["sweeps"]  # what runs, not `auto` (off)
    assert sweeps and "auto" not in {r["model"] for r in sweeps}
    assert all(r["requests"] > 0 and r["ok"] == r["requests"] for r in sweeps), sweeps
    # The job has ended; the deployment answers a real test image.
    model = _read(bucket, "runs/tiny/frontier.json")["recommended"]["name"]
    reply = _infer(model, _request_body(bucket))
    assert reply["model_name"] == model and {o["name"] for o in reply["outputs"]} >= {"label", "logits"}


def test_the_whole_run_is_in_the_bucket_and_the_nodes_read_it_from_there(cluster, job):
    """Ray Train workers, the logits actor and Serve replicas use their node's cache, the driver
    another: everything they read had to come from the bucket, verified, as on other machines
    (the training split streamed, the rest copied)."""
    bucket, _, driver_cache, result = job
    assert "succeeded" in result.stdout
    driver = driver_output(result.stdout)
    assert "ingress: HAProxy" in driver
    assert f"run directory: {bucket}/runs/tiny (this node's copy: {driver_cache}" in driver
    assert f"serving http://127.0.0.1:{SERVE_PORT}/v2" in driver
    manifest = _read(bucket, "runs/tiny/manifest.json")
    assert "report.md" in manifest["files"]
    for rel, sha in manifest["files"].items():  # the whole run is in the bucket, intact
        assert hashlib.sha256(_get(bucket, f"runs/tiny/{rel}")).hexdigest() == sha, rel
    assert any(k.startswith("runs/tiny/ray/teacher-") for k in _keys(bucket))  # Ray Train's checkpoints

    front = _read(bucket, "runs/tiny/frontier.json")
    served = set(front["pareto"]) | {front["recommended"]["name"]}
    folders = {n if n in ("teacher", "student", "student_scratch") else f"variants/{n}" for n in served}
    copies = [node.cache / "s3" / bucket.removeprefix("s3://") / "runs" / "tiny" for node in cluster.workers]
    fetched = {str(p.relative_to(copy)): p for copy in copies for p in copy.rglob("*") if p.is_file()}
    assert {"data/manifest.json", "data/val-00000.parquet", "teacher/model.safetensors"} <= fetched.keys(), \
        fetched
    assert {f"{folder}/model.safetensors" for folder in folders} <= fetched.keys(), (folders, fetched)
    # The training shards and the teacher's cached logits were streamed from the bucket: no copies.
    assert not [rel for rel in fetched if rel.startswith(("data/train-", "teacher_logits/"))], fetched
    for rel in fetched.keys() & manifest["files"].keys():
        assert sha256_file(fetched[rel]) == manifest["files"][rel], rel


def test_a_client_elsewhere_names_the_run_by_its_uri(cluster, job, tmp_path):
    """Its test images come from the bucket, into a cache of its own."""
    bucket, _, _, _ = job
    client = {**cluster.env, "DISTILLERY_CACHE": str(tmp_path / "client-cache")}
    model = _read(bucket, "runs/tiny/frontier.json")["recommended"]["name"]
    common = ["--url", f"http://127.0.0.1:{SERVE_PORT}", "--run-dir", f"{bucket}/runs/tiny"]
    query = subprocess.run([str(BIN / "distillery"), "query", *common, "--model", model, "--sample", "4"],
                           env=client, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert query.returncode == 0 and "correct: " in query.stdout, query.stdout + query.stderr
    assert len(query.stdout.splitlines()) == 3 and not query.stderr, query.stdout + query.stderr
    load = subprocess.run([str(BIN / "distillery"), "loadtest", *common, "--models", model,
                           "--concurrency", "2", "--duration", "1", "--ramp", ""],
                          env=client, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert load.returncode == 0, load.stdout[-3000:] + load.stderr[-3000:]
    # Like `run`: its own few lines; Ray's, and the report's tables, in the report folder's log.
    lines = load.stdout.splitlines()
    assert not load.stderr and all(line.startswith(("logs: ", "[loadtest] ")) for line in lines), load.stdout
    assert "refused under overload" in load.stdout.splitlines()[-1], load.stdout
    assert "| model |" in (tmp_path / "loadtest" / "tiny" / "loadtest.log").read_text()
    sweep = json.loads((tmp_path / "loadtest" / "tiny" / "loadtest.json").read_text())["sweeps"]
    assert [(r["model"], r["concurrency"]) for r in sweep] == [(model, 2)] and sweep[0]["requests"] > 0
    assert not sweep[0]["errors"]


def _keys(bucket: str) -> list[str]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket.removeprefix("s3://"))
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _request_body(bucket: str) -> bytes:
    return _get(bucket, "runs/tiny/serve/request.json")


def _infer(model: str, body: bytes) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{SERVE_PORT}/v2/models/{model}/infer", data=body,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


def test_resubmitting_from_a_driver_with_nothing_local_changes_nothing_and_no_keep_serving_takes_it_down(
        cluster, job, tmp_path):
    """Last here, as it ends the deployment. The run is whole in the bucket, so a new driver
    with an empty cache redoes nothing."""
    bucket, args, _, _ = job
    manifest = _get(bucket, "runs/tiny/manifest.json")
    result = submit(cluster.dashboard, cluster.env, *_pipeline(tmp_path / "second-driver-cache", *args,
                                                               "--no-keep-serving"), timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert result.stdout.count("done already") == len(json.loads(manifest)["stages"])
    assert _get(bucket, "runs/tiny/manifest.json") == manifest
    assert "[serve] shut down (--no-keep-serving)" in result.stdout
    with pytest.raises(urllib.error.URLError):  # the cluster still runs; the deployment is gone
        urllib.request.urlopen(f"http://127.0.0.1:{SERVE_PORT}/v2/models", timeout=10)
