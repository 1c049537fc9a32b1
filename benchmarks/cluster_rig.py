"""Served requests/s from a client machine of a multi-machine cluster against the same
deployment on one machine (the target: within 20%).

The same finished run's recommended model, two replicas at 0.5 CPU each, HAProxy in front,
driven by the project's load generator (`loadtest.generator.closed_loop`, what `distillery
loadtest` sweeps with: `--concurrency` clients back to back, `--duration` s, repeated
`--repeats` times):

  cluster      the rig of tests/netns_rig.py: head (198.18.0.1, no CPUs for work) and two
               worker machines in network namespaces of their own, started as cluster.yaml
               starts nodes (HAProxy, serve.host on every interface, the shipped firewall);
               the replicas on the workers, the generator on a client machine (.100)
  one machine  a local Ray instance (`distillery serve` with no cluster), the generator here

Both share this machine's cores, generator included, so the ratio, not the rates, is what
carries over. Needs root, `ip`, `unshare`, `nft`. Writes benchmarks/results/cluster_rig_<machine>_<date>.json.

    python benchmarks/cluster_rig.py [--run-dir runs/digits] [--concurrency 8] [--duration 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, machine_lines, median, publish, table

sys.path.insert(0, str(ROOT / "tests"))  # the rig the tests use: one way to make machines here
from netns_rig import SUBNET, Rig, unavailable  # noqa: E402
from ray_nodes import BIN, Cluster  # noqa: E402

from distillery.compat import ingress  # noqa: E402
from distillery.serving import firewall  # noqa: E402

SERVE = ["--set", "serve.min_replicas=2", "--set", "serve.max_replicas=2", "--set", "serve.num_cpus=0.5",
         "--set", "serve.auto=false", "--set", "serve.grpc_port=null"]


def tiny_run(folder: Path) -> Path:
    """A finished tiny run (in this process, no Ray, nothing served) when none is given."""
    from distillery.cli.main import main

    assert main(["run", "--config", str(ROOT / "configs" / "tiny.yaml"), "--set", f"storage_path={folder}",
                 "--set", "ray.workers=0", "--set", "serve.enabled=false"]) == 0
    return folder / "tiny"


def serve(prefix: list[str], run_dir: Path, model: str, extra: list[str], env: dict) -> subprocess.Popen:
    """`distillery serve` of `model` until SIGTERM; returns once it prints its URL."""
    cmd = [*prefix, str(BIN / "distillery"), "serve", str(run_dir), "--set", f"serve.models=[{model}]",
           *SERVE, *extra]
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("serving http"):
            time.sleep(5)  # replica processes finish starting: they share the 2 cores
            return process
    raise RuntimeError("distillery serve ended: " + "".join(lines[-30:]))


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)  # serve shuts the deployment down
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


# The project's closed-loop generator (the one `distillery loadtest` sweeps with), run where
# `prefix` says: `distillery loadtest` itself would also join the Ray instance it finds, and on
# the rig, where namespaces share process ids, it finds the cluster's and waits on its
# firewalled port, as no real client machine would.
GENERATE = """import asyncio, json, sys
from distillery.data.shards import load_split
from distillery.loadtest import generator
x, _ = load_split(sys.argv[2] + "/data", "test")
body = generator.infer_body(x[0].flatten().tolist(), [1, *x.shape[1:]])
samples = asyncio.run(generator.closed_loop(sys.argv[1], body, int(sys.argv[3]), float(sys.argv[4]),
                                            {"content-type": "application/json"}, timeout_s=30))
print(json.dumps({"ok": sum(s.status == 200 for s in samples),
                  "failed": sum(s.status != 200 for s in samples)}))
"""


def load(prefix: list[str], url: str, run_dir: Path, model: str, args, env: dict) -> list[float]:
    """`args.repeats` rounds of the generator; requests/s answered in each."""
    rates = []
    for _ in range(args.repeats):
        cmd = [*prefix, sys.executable, "-c", GENERATE, f"{url}/v2/models/{model}/infer", str(run_dir),
               str(args.concurrency), str(args.duration)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        counts = json.loads(done.stdout.splitlines()[-1])
        assert counts["failed"] == 0, counts
        rates.append(counts["ok"] / args.duration)
    return rates


def on_the_rig(run_dir: Path, model: str, args, work: Path) -> list[float]:
    rig = Rig()
    try:
        rig.add("client", 100)
        nodes = Cluster(work / "nodes", {**os.environ, **ingress.ingress_env("haproxy", "0.0.0.0")}, rig)
        rules = firewall.rules([f"{SUBNET}.0/29"], [8000, nodes.dashboard_port])
        rig.on_add = lambda name: rig.run(name, ["nft", "-f", "-"], input=rules, text=True, check=True)
        with nodes.running(workers=2):
            # The namespaces share this machine's disk: the run folder is a shared filesystem here.
            # A run made on one machine records serve.host=127.0.0.1: served on the cluster, the
            # ingress faces the network, as cluster.yaml's nodes say.
            driver = serve(rig.exec("head"), run_dir, model, ["--set", f"ray.address={nodes.address}",
                                                              "--set", "ray.shared_filesystem=true",
                                                              "--set", "serve.host=0.0.0.0"], nodes.env)
            try:
                return load(rig.exec("client"), f"http://{nodes.ip('head')}:8000", run_dir, model, args,
                            nodes.env)
            finally:
                stop(driver)
    finally:
        rig.remove()


def on_one_machine(run_dir: Path, model: str, args, work: Path) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = serve([], run_dir, model, [], env)
    try:
        return load([], "http://127.0.0.1:8000", run_dir, model, args, env)
    finally:
        stop(driver)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", help="a finished run (default: a tiny run made first)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if unavailable():
        sys.exit(f"cluster_rig: {unavailable()}")
    work = Path(tempfile.mkdtemp(prefix="cluster-rig-"))
    run_dir = Path(args.run_dir).resolve() if args.run_dir else tiny_run(work / "runs")
    model = json.loads((run_dir / "frontier.json").read_text())["recommended"]["name"]
    rig = on_the_rig(run_dir, model, args, work)
    local = on_one_machine(run_dir, model, args, work)
    ratio = median(rig) / median(local)
    info = machine("1 per replica")
    rows = [["cluster: client machine -> head's HAProxy -> replicas on 2 worker machines",
             *(f"{r:.0f}" for r in rig), f"{median(rig):.0f}"],
            ["one machine: local Ray, generator on the same machine", *(f"{r:.0f}" for r in local),
             f"{median(local):.0f}"]]
    report = "\n".join([
        f"Served requests/s, {run_dir.name}'s recommended model ({model}), 2 replicas at 0.5 CPU, HAProxy, "
        f"{args.concurrency} clients back to back, {args.duration:.0f} s per round (project generator)",
        table(["where", *(f"round {i + 1}" for i in range(args.repeats)), "median"], rows),
        f"cluster / one machine: {ratio:.2f} (target: within 20%, >= 0.80)", machine_lines(info)])
    publish("cluster_rig", report, {"machine": info, "run": str(run_dir), "model": model,
                                    "concurrency": args.concurrency, "duration_s": args.duration,
                                    "cluster_rps": rig, "one_machine_rps": local, "ratio": ratio,
                                    "date": time.strftime("%Y-%m-%d")}, quick=False)


if __name__ == "__main__":
    main()
