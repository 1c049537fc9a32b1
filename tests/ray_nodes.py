"""A Ray cluster of several nodes on this machine, as Ray's own tests simulate one: a head
node with no CPUs for work (it runs the GCS, the dashboard, job drivers and Serve's
controller and ingress) and worker nodes joined to it with `ray start --address`, each its
own raylet with its own temporary folder, object store and distillery cache, token
authentication on. A node is lost the way a machine is: its raylet and every process it
started killed at once (SIGKILL to its process group). Used by tests/integration/test_multinode.py.
Given a `netns_rig.Rig`, each node is a machine of its own instead: its own network namespace
and address, and a disk of its own over the nodes' cache folder (test_cluster_rig.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from conftest import ROOT, free_port

BIN = Path(sys.executable).parent
STARTED = "Ray runtime started."  # what `ray start` prints once its node is up
LABEL = "distillery-test/node"  # a label on each node: its name here (head, worker1, ...)


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL `process` (a `ray start --block`) and every process it started, together. Ray's
    workers (Train workers, Serve replicas) leave its process group, so killing the group
    alone leaves them running: the tree is frozen first (no new process), then killed."""
    import psutil

    if process.poll() is not None:
        # It exited by itself (a `ray start` that failed to join): no tree to freeze, and its
        # group may be gone already; kill whatever is left of the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        return
    os.killpg(process.pid, signal.SIGSTOP)
    tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGSTOP)
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    process.wait(timeout=30)


@dataclass
class Node:
    name: str
    temp: str            # Ray's temporary folder of this node (its sockets, logs, session)
    cache: Path          # DISTILLERY_CACHE of the processes this node starts
    process: subprocess.Popen  # `ray start --block`, leader of the node's process group
    log: Path


class Cluster:
    """`Cluster(folder, env)`: `start_head()`, `add_nodes(n)`, `kill(node)`, `names()`, `stop()`;
    `env` is what every node and client gets (the S3 server's, say), plus the token."""

    def __init__(self, folder: Path, env: dict[str, str], rig=None, head_args: list[str] = (),
                 head_env: dict[str, str] | None = None):
        self.folder, self.token, self.rig = folder, secrets.token_hex(32), rig
        # `ray start` options of the head only
        self.head_args, self.head_env = list(head_args), head_env or {}
        self.env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        self.env.pop("RAY_ADDRESS", None)
        # Machines of a rig each have their own ports: Ray's defaults, as on real machines. Nodes
        # sharing this machine's need free ones (two picks can also collide: a node then fails).
        self.gcs_port, self.dashboard_port = (6379, 8265) if rig else (free_port(), free_port())
        self.head: Node | None = None
        self.workers: list[Node] = []
        self.temps: list[str] = []  # every node's, a head started again included: `stop` removes them

    def ip(self, name: str) -> str:
        """The address of node `name`: its machine's on a rig, else loopback."""
        if self.rig is None:
            return "127.0.0.1"
        if name not in self.rig.addresses:
            self.rig.add(name, 1 if name == "head" else 1 + int(name.removeprefix("worker")))
        return self.rig.addresses[name]

    @property
    def address(self) -> str:
        return f"{self.ip('head')}:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://{self.ip('head')}:{self.dashboard_port}"

    def start_head(self) -> Node:
        # On a rig the dashboard (job submission, the state API; token auth) faces the network.
        args = ["--head", f"--port={self.gcs_port}", "--num-cpus=0",
                f"--dashboard-host={'0.0.0.0' if self.rig else '127.0.0.1'}",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={10001 if self.rig else free_port()}", *self.head_args]
        self.head = self._start_until_up("head", args, self.head_env, self._dashboard_up,
                                         "the head node's dashboard")
        return self.head

    def add_nodes(self, count: int, cpus: int = 1) -> list[Node]:
        """`count` worker nodes with `cpus` CPUs each, one after another."""
        return [self._add_node(cpus) for _ in range(count)]

    def _add_node(self, cpus: int) -> Node:
        name = f"worker{len(self.workers) + 1}"
        ports = [] if self.rig else [
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
            "--min-worker-port=0", "--max-worker-port=0"]
        node = self._start_until_up(name, [f"--address={self.address}", f"--num-cpus={cpus}", *ports], None,
                                    lambda: name in self.alive().values(), f"node {name} to join")
        self.workers.append(node)
        return node

    def _start_until_up(self, name: str, args: list[str], env: dict[str, str] | None,
                        ready: Callable[[], bool], what: str, retries: int = 2) -> Node:
        """Start a node and wait until `ready` and `ray start` says the node started. Ray gives a
        starting raylet 30 s to register with the GCS (a constant in ray._private.node), which a
        worker joining beside others, or a head started again under load, can miss on 2 busy
        cores ("The current node timed out during startup", after the head's dashboard is up
        already): a node that fails to come up is started again, up to twice."""
        node = self._start(name, args, env)
        try:
            self._wait(lambda: STARTED in node.log.read_text(errors="replace") and ready(), what, node)
        except AssertionError:
            self.kill(node)
            shutil.rmtree(node.temp, ignore_errors=True)
            if not retries:
                raise
            time.sleep(5)  # the head was too busy to answer: give it a moment
            return self._start_until_up(name, args, env, ready, what, retries - 1)
        return node

    @contextlib.contextmanager
    def running(self, workers: int):
        """The head and `workers` worker nodes, stopped at the end whatever happened."""
        try:
            self.start_head()
            self.add_nodes(workers)
            yield self
        finally:
            self.stop()

    def kill(self, node: Node) -> None:
        """Lose `node` as a machine is lost: its raylet and every process it started."""
        kill_tree(node.process)

    def nodes(self) -> list[dict]:
        """Ray's node table (node_id, state, labels, ...), dead nodes included."""
        return self.state("nodes")

    def actors(self) -> list[dict]:
        """Every actor the cluster has had (class_name, node_id, state, ...), dead ones included."""
        return self.state("actors")

    def state(self, kind: str, **equal: str) -> list[dict]:
        """One table of Ray's state API, read from the dashboard with the token: every row and
        column, or with `equal` ({column: value}) only the matching rows, summary columns only
        (cheap enough to poll while a load runs in this process)."""
        query = urllib.parse.urlencode([("limit", 10000), ("detail", 0 if equal else 1),
                                        *((k, v) for col, val in equal.items() for k, v in
                                          (("filter_keys", col), ("filter_predicates", "="),
                                           ("filter_values", val)))])
        request = urllib.request.Request(f"{self.dashboard}/api/v0/{kind}?{query}",
                                         headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.loads(r.read())["data"]["result"]["result"]

    def names(self) -> dict[str, str]:
        """{Ray node id: our node's name} of every node that ever joined."""
        return {n["node_id"]: n["labels"].get(LABEL, "?") for n in self.nodes()}

    def alive(self) -> dict[str, str]:
        """{Ray node id: our node's name} of the nodes alive now."""
        return {n["node_id"]: n["labels"].get(LABEL, "?") for n in self.nodes() if n["state"] == "ALIVE"}

    def free_cpus(self) -> dict[str, float]:
        """{our node's name: CPUs its live actors leave free} of the live nodes whose `ray start`
        still runs (a killed node stays ALIVE in Ray's table until its health checks fail)."""
        running = {n.name for n in [self.head, *self.workers] if n and n.process.poll() is None}
        nodes = {n["node_id"]: n for n in self.nodes() if n["state"] == "ALIVE"}
        free = {i: n.get("resources_total", {}).get("CPU", 0.0) for i, n in nodes.items()
                if n["labels"].get(LABEL) in running}
        for actor in self.actors():
            if actor["state"] == "ALIVE" and actor["node_id"] in free:
                free[actor["node_id"]] -= (actor.get("required_resources") or {}).get("CPU", 0.0)
        return {nodes[i]["labels"][LABEL]: cpus for i, cpus in free.items()}

    def stop(self) -> None:
        for node in [*self.workers, self.head]:
            if node and node.process.poll() is None:
                self.kill(node)  # a graceful stop takes tens of seconds
        for temp in self.temps:
            shutil.rmtree(temp, ignore_errors=True)

    def _start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Node:
        # Ray's unix socket paths must stay under ~107 bytes: pytest's tmp paths are too long.
        temp = tempfile.mkdtemp(prefix=f"ray-{name[:1]}{name[-1]}-", dir="/tmp")
        self.temps.append(temp)
        cache, log = self.folder / f"cache-{name}", self.folder / f"{name}.log"
        prefix = []
        if self.rig is not None:  # the same path on every machine, each its own disk there
            self.ip(name)
            cache = self.folder / "disk" / "cache"
            prefix = self.rig.exec(name, private=self.folder / "disk")
        process = subprocess.Popen(
            [*prefix, str(BIN / "ray"), "start", "--block", f"--node-ip-address={self.ip(name)}",
             f"--temp-dir={temp}", "--disable-usage-stats", f"--labels={json.dumps({LABEL: name})}", *args],
            env={**self.env, **(env or {}), "DISTILLERY_CACHE": str(cache)}, stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True)  # its own process group: `kill` takes the whole node
        return Node(name, temp, cache, process, log)

    def _dashboard_up(self) -> bool:
        request = urllib.request.Request(f"{self.dashboard}/api/version",
                                         headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def _wait(self, ready, what: str, node: Node, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert node.process.poll() is None, f"{node.name} exited: " + node.log.read_text()[-3000:]
            if ready():
                return
            time.sleep(0.5)
        raise AssertionError(f"waited {timeout} s for {what}: " + node.log.read_text()[-3000:])


def submit(address: str, env: dict, *entrypoint: str, timeout: float,
           prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`ray job submit` of `entrypoint` with this project as the working dir, waiting for its
    end; from another machine of a rig with `prefix` (`Rig.exec`)."""
    # Ray's dashboard can answer before its job agent is up; it then refuses the submission
    # with "please try again later", which is what a user would do.
    for _ in range(30):
        result = subprocess.run([*prefix, str(BIN / "ray"), "job", "submit", "--address", address,
                                 "--working-dir", str(ROOT), "--", *entrypoint],
                                env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if "No available agent to submit job" not in result.stderr:
            return result
        time.sleep(2)
    return result
