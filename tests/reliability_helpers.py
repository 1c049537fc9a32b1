"""What tests/integration/test_reliability.py sends and reads besides its tests: the served
model, requests and steady load, every class of malformed request, the replicas from Ray's state
API and the machine's listening sockets. Beside the tests rather than in them: the module with
the deployment stays under 400 lines without starting Serve twice."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from distillery.config import ServeConfig
from distillery.loadtest import generator

MODEL = "student"


@dataclass
class Served:
    url: str            # http://127.0.0.1:PORT
    run_dir: Path
    cfg: ServeConfig
    body: bytes         # a one-image infer request
    dashboard_port: int


def _post(url: str, body: bytes, content_type: str = "application/json",
          timeout: float = 30) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"content-type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _replicas(app: str = MODEL) -> dict[str, int]:
    """{actor name: pid} of the app's live replicas, from Ray's state API."""
    import ray
    from ray.util.state import list_actors

    # This process's Ray instance by name: another one on the machine must not make it ambiguous.
    address = ray.get_runtime_context().gcs_address
    actors = list_actors(address=address, filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
    return {a.name: a.pid for a in actors if a.name and a.name.startswith(f"SERVE_REPLICA::{app}#")}


def _steady_load(url: str, body: bytes, seconds: float, rate: float) -> tuple[threading.Thread, list]:
    """Open-loop load in a background thread; the list receives the samples when it ends."""
    out: list = []
    steps = [(seconds, rate)]
    headers = {"content-type": "application/json"}
    thread = threading.Thread(
        target=lambda: out.extend(asyncio.run(generator.open_loop(url, body, steps, headers))))
    thread.start()
    return thread, out


def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


def _malformed(body: bytes, infer: str, base: str, limit_bytes: int) -> list[tuple[str, str, bytes, str]]:
    """(kind, url, body, content type) for every class of bad request."""
    doc = json.loads(body)
    spec = doc["inputs"][0]

    def with_input(**change) -> bytes:
        return json.dumps({"inputs": [{**spec, **change}]}).encode()

    n = math.prod(spec["shape"])
    return [
        ("bad JSON", infer, b'{"inputs": [', "application/json"),
        ("truncated body", infer, body[: len(body) // 2], "application/json"),
        ("wrong shape", infer, with_input(shape=[1, 1, 4, 4], data=spec["data"][:16]), "application/json"),
        ("shape/data mismatch", infer, with_input(data=spec["data"][:-1]), "application/json"),
        ("wrong datatype", infer, with_input(datatype="INT8"), "application/json"),
        ("NaN", infer, with_input(data=[float("nan")] * n), "application/json"),  # json writes NaN, Infinity
        ("infinity", infer, with_input(data=[float("inf")] * n), "application/json"),
        ("non-numbers", infer, with_input(data=["x"] * n), "application/json"),
        ("huge declared shape", infer, with_input(shape=[10 ** 9, 1, 8, 8]), "application/json"),
        ("oversized body", infer, b"[" + b"0," * (limit_bytes // 2) + b"0]", "application/json"),
        ("missing inputs", infer, b'{"outputs": []}', "application/json"),
        ("misnamed input", infer, with_input(name="image"), "application/json"),
        ("wrong content type", infer, body, "text/plain"),
        ("unknown model", f"{base}/v2/models/nope/infer", body, "application/json"),
    ]


def _triton_input(x):
    import tritonclient.grpc as triton

    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x.numpy())
    return inp


def _listening() -> dict[int, str]:
    """{port: address} of every listening TCP socket on this machine (from /proc)."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A":  # LISTEN
                address, port = local.split(":")
                found[int(port, 16)] = address
    return found
