"""How tests/integration/test_cluster_rig.py trains on the rig besides its job: a driver on the
head machine, training that loses machines on cue, and the check that it resumed as accurate as
the undisturbed run. Beside the tests rather than in them: the rig's module stays under 400
lines without starting its cluster twice."""

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from conftest import ROOT
from netns_rig import Rig
from ray_nodes import BIN, Cluster
from rig_state import get
from test_ray_resume import registered_epoch  # tests/integration is on sys.path: pytest puts it there

from distillery.measure.accuracy import interval

# The tiny preset as the rig runs it (test_cluster_rig.py says why these sizes).
COMMON = ["--config", "configs/tiny.yaml", "--set", "data.num_samples=600", "--set", "teacher.train.epochs=3",
          "--set", "ray.placement_strategy=STRICT_SPREAD"]  # the two Train workers on two machines

CPUS_PER_WORKER = 0.5


def _driver_on_the_head(rig: Rig, cluster: Cluster, bucket: str, prefix: str, tmp_path,
                        *sets: str, model: str = "teacher") -> list[str]:
    """`distillery train --model <model>` into `prefix` by a driver on the head machine (a cache of
    its own), once two machines have room for a worker each (STRICT_SPREAD): an earlier test lost one,
    and the replacement replicas Serve started filled what was left; fresh machines join for the rest."""
    room = [name for name, cpus in cluster.free_cpus().items() if name != "head" and cpus >= CPUS_PER_WORKER]
    if len(room) < 2:
        started = time.time()
        cluster.add_nodes(2 - len(room))
        print(f"{2 - len(room)} machine(s) added for the driver in {time.time() - started:.0f} s")
    return [*rig.exec("head"), "env", f"DISTILLERY_CACHE={tmp_path / 'driver-cache'}",
            str(BIN / "distillery"),
            "train", "--model", model, *COMMON, "--set", f"storage_path={bucket}/{prefix}",
            "--set", f"ray.address={cluster.address}", "--set", f"ray.cpus_per_worker={CPUS_PER_WORKER}",
            *(arg for item in sets for arg in ("--set", item))]


def _train_and_lose_machines(rig: Rig, cluster: Cluster, bucket: str, prefix: str, losses: list,
                             tmp_path) -> dict:
    """The teacher trained again into `prefix` by a driver on the head machine; for each
    (epoch, lose) of `losses`, once `epoch` epochs are registered in the bucket, `lose(node)`
    takes the machine of one of its two workers away while a fresh machine boots and joins
    (STRICT_SPREAD: two workers need two live nodes), as an autoscaler would start one.
    Returns the stage's metrics once it finished, checking the driver said what happened."""
    cmd = _driver_on_the_head(rig, cluster, bucket, prefix, tmp_path)
    run = subprocess.Popen(cmd, cwd=ROOT, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    started = time.time()
    location, deadline = f"{bucket}/{prefix}/tiny", started + 300
    for epoch, lose in losses:
        while registered_epoch(location) < epoch and run.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert run.poll() is None, run.stdout.read()[-3000:]
        training = {a["node_id"] for a in cluster.actors()
                    if a["class_name"] == "RayTrainWorker" and a["state"] == "ALIVE"}
        if not training or registered_epoch(location) > epoch:  # say where it stands
            run.kill()
            raise AssertionError(f"{len(training)} Ray Train worker(s) alive at {registered_epoch(location)} "
                                 f"epoch(s), waiting for {epoch} (free CPUs: {cluster.free_cpus()}): "
                                 + run.stdout.read()[-3000:])
        names, lost = cluster.names(), time.time()
        victim = next(n for n in cluster.workers if names.get(next(iter(training))) == n.name)
        with ThreadPoolExecutor(1) as boot:  # the fresh machine boots while Ray notices the loss
            fresh = boot.submit(cluster.add_nodes, 1)
            lose(victim)
            fresh.result()
        print(f"{prefix}: {epoch} epochs after {lost - started:.0f} s, a machine lost in "
              f"{time.time() - lost:.0f} s")
    out, _ = run.communicate(timeout=400)
    print(f"{prefix}: finished {time.time() - started:.0f} s after the driver started")
    assert run.returncode == 0, out[-3000:]
    assert out.count("worker failure") >= len(losses) and "resumed from the checkpoint of epoch" in out, out
    return json.loads(get(bucket, f"{prefix}/tiny/manifest.json"))["stages"]["teacher"]["metrics"]


def _resumed_with_the_undisturbed_accuracy(bucket: str, metrics: dict, epochs: list[int], what: str) -> None:
    """Training resumed once after each of `epochs`, from that epoch's checkpoint (no finished
    epoch redone), and scored within the undisturbed run's 95% interval."""
    assert [r["resumed_from"] for r in metrics["restarts"]] == epochs, metrics["restarts"]
    for restart in metrics["restarts"]:
        assert restart["worker_failures"] and restart["last_epoch_before"] == restart["resumed_from"]
    assert metrics["epochs"] == 3
    undisturbed = json.loads(get(bucket, "runs/tiny/manifest.json"))["stages"]["teacher"]["metrics"]
    images = json.loads(get(bucket, "runs/tiny/data/manifest.json"))["counts"]["test"]["total"]
    low, high = interval(undisturbed["test_accuracy"], images)
    print(f"{what}: test accuracy {metrics['test_accuracy']:.2%} vs undisturbed "
          f"{undisturbed['test_accuracy']:.2%} ({low:.2%}-{high:.2%}, {images} images); "
          f"restarts {metrics['restarts']}")
    assert low <= metrics["test_accuracy"] <= high
