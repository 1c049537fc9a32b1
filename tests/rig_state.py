"""What test_cluster_rig.py reads of the rig's machines and bucket: objects in the S3 bucket,
HAProxy's stats through its admin socket, a machine's TCP listeners and ingress, where a
model's replicas run, when a load's rate is full again."""

import contextlib
import secrets
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import boto3
from netns_rig import Rig
from ray_nodes import Cluster

from distillery.loadtest import generator


def get(bucket: str, rel: str) -> bytes:
    return boto3.client("s3").get_object(Bucket=bucket.removeprefix("s3://"), Key=rel)["Body"].read()


def object_sizes(bucket: str, prefix: str) -> dict[str, int]:
    listing = boto3.client("s3").list_objects_v2(Bucket=bucket.removeprefix("s3://"), Prefix=prefix)
    return {o["Key"]: o["Size"] for o in listing.get("Contents", [])}


def haproxy_stats(cluster: Cluster, node: str = "head") -> list[dict]:
    """HAProxy's `show stat` on machine `node`, through its admin socket (a file, reachable from
    this namespace: Serve puts each node's in a folder named by the node's Ray id)."""
    node_id = next(i for i, name in cluster.alive().items() if name == node)
    path = Path(cluster.env["RAY_SERVE_HAPROXY_SOCKET_PATH"])
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path.parent / node_id / path.name))
        s.sendall(b"show stat\n")
        text = b"".join(iter(lambda: s.recv(65536), b"")).decode()
    header, *rows = [line for line in text.splitlines() if line.strip()]
    keys = header.lstrip("# ").split(",")
    return [dict(zip(keys, row.split(","))) for row in rows]


def servers(cluster: Cluster, node: str = "head") -> list[dict]:
    """HAProxy's servers on `node`: the replicas and Ray's fallback proxies, per backend."""
    return [r for r in haproxy_stats(cluster, node) if r["svname"] not in ("FRONTEND", "BACKEND")
            and r["pxname"] not in ("stats", "prometheus")]


def listening(rig: Rig, name: str) -> set[tuple[str, int]]:
    """(address, port) of every TCP listener on machine `name` (its /proc/net/tcp*)."""
    out = rig.run(name, ["cat", "/proc/net/tcp", "/proc/net/tcp6"], capture_output=True, text=True).stdout
    found = set()
    for line in out.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[3] == "0A":  # LISTEN
            address, port = fields[1].split(":")
            if len(address) == 8:
                address = ".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0))
            else:
                address = ("::" if set(address) == {"0"}
                           else "::1" if address.endswith("01000000") else address)
            found.add((address, int(port, 16)))
    return found


def ingress_nodes(rig: Rig, cluster: Cluster, port: int) -> list[str]:
    """The live machines whose HAProxy listens on the ingress `port` (on every interface)."""
    return [name for name in cluster.alive().values() if ("0.0.0.0", port) in listening(rig, name)]


@contextlib.contextmanager
def redis_server(host: str, log: Path):
    """Debian's redis-server on `host` (a free port, a password, nothing saved to disk) until
    the block ends: yields (address, password), or None where it is not installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    with socket.socket() as s:  # a port free on this namespace's addresses
        s.bind((host, 0))
        port = s.getsockname()[1]
    password = secrets.token_hex(16)
    server = subprocess.Popen([binary, "--bind", host, "--port", str(port), "--requirepass", password,
                               "--save", "", "--appendonly", "no"],
                              stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 30
        while not accepts(host, port):
            assert server.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.1)
        yield f"{host}:{port}", password
    finally:
        server.terminate()  # ours, by process id
        server.wait(timeout=30)


def accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def answers(url: str, body: bytes) -> bool:
    """True when an inference request to `url` is answered with 200."""
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status == 200
    except OSError:
        return False


def replica_nodes(cluster: Cluster, model: str) -> list[str]:
    """The nodes of the model's live replicas. Filtered by the dashboard: polled during a load,
    the whole actor table (every dead actor too, in detail) cost the load's own process time."""
    alive = cluster.state("actors", class_name=f"ServeReplica:{model}:Model", state="ALIVE")
    return [a["node_id"] for a in alive]


def where_served(cluster: Cluster, model: str, before: list[str]) -> str:
    """For a failure message: the machines of the model's replicas before a loss (`before`, Ray
    node ids) and now, and the head's HAProxy servers (backend, server, status, requests)."""
    names, now = cluster.names(), replica_nodes(cluster, model)
    served = [(r["pxname"], r["svname"], r["status"], r["stot"]) for r in servers(cluster)]
    return f"replicas on {[names[n] for n in before]}, now {[names[n] for n in now]}; HAProxy: {served}"


def wait_for_replacement(cluster: Cluster, model: str, lost: str, timeout: float = 60) -> float:
    """Seconds until the model again has two live replicas, none on the lost node."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        nodes = replica_nodes(cluster, model)
        if len(nodes) == 2 and lost not in nodes:
            return time.perf_counter() - start
        time.sleep(0.5)
    raise AssertionError(f"no replacement replica for {model} within {timeout} s")


# The full rate is back after a loss once FULL_FOR_S seconds in a row each answer at least
# FULL_SHARE of the median rate before it (the 2 cores make single seconds noisy: a replacement
# replica's start takes CPU too).
FULL_FOR_S, FULL_SHARE = 3, 0.8


def full_rate_again(samples: list, kill: float) -> tuple[int | None, int]:
    """(the first whole second after `kill` from which the rate is full again, or None; the full
    rate): whole seconds only, the last (part of one) left out."""
    ok = [r["ok"] for r in generator.per_second(samples)]
    full = sorted(ok[:int(kill)])[int(kill) // 2]
    back = next((s for s in range(int(kill) + 1, len(ok) - FULL_FOR_S)
                 if sum(ok[s:s + FULL_FOR_S]) >= FULL_FOR_S * FULL_SHARE * full), None)
    return back, full
