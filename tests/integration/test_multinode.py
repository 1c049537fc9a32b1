"""The cluster job on separate Ray nodes, and the loss of a node while serving and while
training. One cluster for the module (`ray_nodes.Cluster`): a head node with no CPUs for
work, three worker nodes with 1 CPU each, every node its own raylet, temporary folder and
distillery cache, token authentication on, HAProxy ingress; the runs live in a bucket of the
S3 server on 127.0.0.1, so no node reads another node's disk. Where things ran is read from
Ray's state API (node ids), not inferred from the run finishing."""

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import ROOT, free_port, make_bucket
from distillery.loadtest import generator
from distillery.measure.accuracy import interval
from distillery.serving import ingress
from ray_nodes import BIN, Cluster, submit
from test_ray_resume import registered_epoch

SERVE_PORT = free_port()  # one Serve instance on this cluster
# The tiny preset, sized so an epoch lasts long enough to lose a node in the middle of one:
# the teacher's 4 epochs of 1,200 images are the undisturbed run the training test compares with.
COMMON = ["--config", "configs/tiny.yaml", "--set", "data.num_samples=1200", "--set", "teacher.train.epochs=4",
          "--set", "ray.placement_strategy=STRICT_SPREAD"]
VARIANTS = "[{name: slim, steps: [{kind: prune_channels, mac_ratio: 1.5, round_to: 4}, {kind: finetune, epochs: 1}]}, " \
           "{name: int8, steps: [{kind: int8_static, calibration_samples: 64}]}]"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    nodes = Cluster(tmp_path_factory.mktemp("nodes"), {**os.environ, **s3_server,
                                                       **ingress.ingress_env("haproxy", "127.0.0.1")})
    try:
        nodes.start_head()
        nodes.add_nodes(3)
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture(scope="module")
def job(cluster):
    """The tiny pipeline submitted with `ray job submit`: (bucket, the job's result)."""
    bucket = make_bucket("nodes")
    args = [*COMMON, "--set", f"storage_path={bucket}/runs", "--set", "distill.cache_teacher_logits=true",
            "--set", f"compress.variants={VARIANTS}", "--set", f"serve.port={SERVE_PORT}", "--set", "serve.grpc_port=null",
            # Two replicas of each served model, spread over the nodes: losing one node leaves one.
            "--set", "serve.min_replicas=2", "--set", "serve.num_cpus=0.1", "--set", "serve.auto=false",
            "--set", "loadtest.concurrency=[2]", "--set", "loadtest.ramp=[]", "--set", "loadtest.adaptive=[]"]
    result = submit(cluster.dashboard, cluster.env, sys.executable, "jobs/pipeline.py", *args, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return bucket, result


def _get(bucket: str, rel: str) -> bytes:
    import boto3

    return boto3.client("s3").get_object(Bucket=bucket.removeprefix("s3://"), Key=rel)["Body"].read()


def _read(bucket: str, rel: str) -> dict:
    return json.loads(_get(bucket, rel))


def test_the_job_runs_across_the_worker_nodes_and_keeps_serving(cluster, job):
    bucket, _ = job
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
    assert all(s["status"] == "done" for s in manifest["stages"].values())
    sweeps = _read(bucket, "runs/tiny/serve/loadtest/loadtest.json")["sweeps"]  # what runs, not `auto` (off)
    assert sweeps and "auto" not in {r["model"] for r in sweeps}
    assert all(r["requests"] > 0 and r["ok"] == r["requests"] for r in sweeps), sweeps
    # The job has ended; the deployment answers a real test image.
    model = _read(bucket, "runs/tiny/frontier.json")["recommended"]["name"]
    reply = _infer(model, _request_body(bucket))
    assert reply["model_name"] == model and {o["name"] for o in reply["outputs"]} >= {"label", "logits"}


def _request_body(bucket: str) -> bytes:
    return _get(bucket, "runs/tiny/serve/request.json")


def _infer(model: str, body: bytes) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{SERVE_PORT}/v2/models/{model}/infer", data=body,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


def _replica_nodes(cluster: Cluster, model: str) -> list[str]:
    return [a["node_id"] for a in cluster.actors() if a["state"] == "ALIVE"
            and a["class_name"] == f"ServeReplica:{model}:Model"]


LOAD_S, KILL_AT_S, CLIENTS = 30.0, 6.0, 4


def test_losing_a_node_while_serving_loses_only_what_it_had_in_flight(cluster, job):
    """Under steady load (4 clients back to back), the node holding one of the model's two
    replicas is killed: the requests that fail are at most those in flight at that moment,
    Serve starts a replacement on a node left, and the full rate is back within 30 s."""
    bucket, _ = job
    model = _read(bucket, "runs/tiny/frontier.json")["recommended"]["name"]
    before = _replica_nodes(cluster, model)
    assert len(set(before)) == 2, before
    names = cluster.names()
    victim = next(n for n in cluster.workers if n.name == names[before[0]])
    load = generator.closed_loop(f"http://127.0.0.1:{SERVE_PORT}/v2/models/{model}/infer", _request_body(bucket),
                                 CLIENTS, LOAD_S, {"content-type": "application/json"}, timeout_s=30)

    async def load_and_kill():
        task = asyncio.ensure_future(load)
        await asyncio.sleep(KILL_AT_S)
        started = time.perf_counter()
        cluster.kill(victim)
        done = time.perf_counter()
        replaced = await asyncio.to_thread(_wait_for_replacement, cluster, model, before[0])
        return await task, (started, done), replaced

    t0 = time.perf_counter()
    samples, (started, done), replaced_s = asyncio.run(load_and_kill())
    # Seconds into the load; the generator's clock starts a few ms after t0, so these are
    # late by that much, which only widens what counts as in flight.
    kill, killed = started - t0, done - t0
    in_flight = [s for s in samples if s.sent <= killed and s.sent + s.latency_ms / 1e3 >= kill]
    failed = [s for s in samples if s.status != 200]
    detail = f"killed from {kill:.3f} to {killed:.3f} s, replaced after {replaced_s:.1f} s; failed: {failed}"
    assert len(failed) <= len(in_flight) <= CLIENTS, detail
    assert all(s.sent <= killed for s in failed), detail  # nothing sent after the node was lost failed
    # Full rate: 3 s in a row answering at least 80% of the median rate before the kill (the
    # 2 cores make single seconds noisy: the replacement replica's start takes CPU too).
    ok = [r["ok"] for r in generator.per_second(samples)]
    full = sorted(ok[:int(kill)])[int(kill) // 2]
    back = next((s for s in range(int(kill) + 1, len(ok) - 3) if sum(ok[s:s + 3]) >= 3 * 0.8 * full), None)
    assert back is not None, f"never back at {full}/s after the kill: {ok}"
    print(f"serving node loss: {len(failed)} failed of {len(in_flight)} in flight of {len(samples)} requests; full "
          f"rate ({full}/s) again "
          f"{back - kill:.1f} s after the kill; replacement replica running after {replaced_s:.1f} s")
    assert back - kill <= 30


def _wait_for_replacement(cluster: Cluster, model: str, lost: str, timeout: float = 60) -> float:
    """Seconds until the model again has two live replicas, none on the lost node."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        nodes = _replica_nodes(cluster, model)
        if len(nodes) == 2 and lost not in nodes:
            return time.perf_counter() - start
        time.sleep(0.5)
    raise AssertionError(f"no replacement replica for {model} within {timeout} s")


def test_losing_a_node_while_training_resumes_from_the_last_checkpoint(cluster, job, tmp_path):
    """The teacher trained again into another prefix; the node of one of its two workers is
    killed mid-epoch, a fresh node joins, and the stage finishes from the last checkpoint in
    the bucket with the accuracy of the job's undisturbed teacher (within its 95% interval)."""
    bucket, _ = job
    env = {**cluster.env, "DISTILLERY_CACHE": str(tmp_path / "driver-cache")}
    cmd = [str(BIN / "distillery"), "train", "--model", "teacher", *COMMON, "--set", f"storage_path={bucket}/lost",
           "--set", f"ray.address={cluster.address}", "--set", "ray.cpus_per_worker=0.5"]
    run = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    location = f"{bucket}/lost/tiny"
    deadline = time.time() + 240
    while registered_epoch(location) < 2 and run.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert run.poll() is None, run.stdout.read()[-3000:]
    training = {a["node_id"] for a in cluster.actors() if a["class_name"] == "RayTrainWorker" and a["state"] == "ALIVE"}
    names = cluster.names()
    victim = next(n for n in cluster.workers if names.get(next(iter(training))) == n.name)
    cluster.kill(victim)
    cluster.add_nodes(1)  # STRICT_SPREAD: two workers need two live nodes
    out, _ = run.communicate(timeout=300)
    assert run.returncode == 0, out[-3000:]
    assert "worker failure" in out and "resumed from the checkpoint of epoch" in out, out

    metrics = _read(bucket, "lost/tiny/manifest.json")["stages"]["teacher"]["metrics"]
    [restart] = metrics["restarts"]
    assert restart["worker_failures"] and restart["resumed_from"] >= 2
    assert restart["last_epoch_before"] == restart["resumed_from"]  # no finished epoch redone
    assert metrics["epochs"] == 4
    undisturbed = _read(bucket, "runs/tiny/manifest.json")["stages"]["teacher"]["metrics"]
    images = _read(bucket, "runs/tiny/data/manifest.json")["counts"]["test"]["total"]
    low, high = interval(undisturbed["test_accuracy"], images)
    print(f"training node loss: test accuracy {metrics['test_accuracy']:.2%} vs undisturbed "
          f"{undisturbed['test_accuracy']:.2%} ({low:.2%}-{high:.2%}, {images} images); restart {restart}")
    assert low <= metrics["test_accuracy"] <= high
