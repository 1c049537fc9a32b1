"""What tests/integration/test_serving.py (and test_bring_your_own.py) serve and send, and how
they read the answers: the deployment with its API key and limits, HTTP calls, request bodies,
the run's test images, malformed requests, KServe's client process, a two-model ladder, a
redeployment and an overload. Beside the tests rather than in them: the module with the
deployment stays under 400 lines without starting Serve twice."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from conftest import copy_run, free_port

from distillery import data
from distillery.compat import ingress
from distillery.config import ServeConfig
from distillery.core.files import atomic_write_json, read_json

KEY = "test-key-1234"


def _call(url: str, body: bytes | None = None, *, key: str | None = KEY, method: str | None = None,
          content_type: str = "application/json") -> tuple[int, dict]:
    headers = {"content-type": content_type, **({"x-api-key": key} if key else {})}
    request = urllib.request.Request(url, data=body, headers=headers,
                                     method=method or ("POST" if body else "GET"))
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _infer_body(x: torch.Tensor, **params) -> bytes:
    doc = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                       "data": x.reshape(-1).tolist()}]}
    return json.dumps({**doc, **({"parameters": params} if params else {})}).encode()


def _test_images(run_dir: Path, n: int) -> torch.Tensor:
    return data.load_split(run_dir / "data", "test")[0][:n]


BAD = {
    "malformed JSON": (b'{"inputs": [', 400, "not valid JSON"),
    "missing input": (b'{"inputs": []}', 400, "exactly one input"),
    "extra input": (json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                            "data": [0.0] * 64}] * 2}).encode(), 400, "exactly one input"),
    "wrong name": (json.dumps({"inputs": [{"name": "x", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                           "data": [0.0] * 64}]}).encode(), 400, "unknown input"),
    "wrong datatype": (json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "INT64",
                                               "data": [0] * 64}]}).encode(), 400, "datatype"),
    "wrong shape": (json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 8, 8], "datatype": "FP32",
                                            "data": [0.0] * 192}]}).encode(), 400, "shape must be"),
    "NaN": (json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                    "data": [float("nan")] * 64}]}).encode(), 400, "NaN"),
    "too many elements": (json.dumps({"inputs": [{"name": "input", "shape": [100, 1, 8, 8],
                                                  "datatype": "FP32", "data": [0.0]}]}).encode(),
                          413, "over the limit"),
    "body too large": (b" " * (65 * 1024) + b"{}", 413, "over the limit"),
}


def _load_body(run_dir: Path) -> bytes:
    from distillery.loadtest.generator import infer_body

    x = _test_images(run_dir, 1)
    return infer_body(x.reshape(-1).tolist(), list(x.shape))


HEADERS = {"content-type": "application/json", "x-api-key": KEY}


@contextlib.contextmanager
def _serving(run_dir: Path):
    """The run's models served on a local Ray Serve, with the API key and limits BAD's requests
    cross; yields (base URL, run dir, ServeConfig)."""
    import ray
    from ray import serve

    from distillery.serving import serve_apps

    cfg = ServeConfig(port=free_port(), grpc_port=free_port(), batch_wait_timeout_s=0.05, max_elements=4096,
                      max_body_bytes=64 * 1024, max_replicas=1, api_key_env="DISTILLERY_TEST_KEY")
    assert ingress.apply(cfg.ingress, cfg.host) == "haproxy"  # ray[serve] ships the binary on Linux
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    try:
        url = serve_apps.deploy(str(run_dir), cfg, KEY)
        yield url.removesuffix("/v2"), run_dir, cfg
    finally:
        serve.shutdown()
        ray.shutdown()


def _redeploy(name: str, kind: str, run_dir: Path, cfg: ServeConfig, models: list[str]) -> None:
    from ray import serve

    from distillery.serving.serve_apps import AppArgs, api_key_digest, build_application, logging_config

    args = AppArgs(kind=kind, run_dir=str(run_dir), models=models, settings=cfg.model_dump(),
                   api_key_sha256=api_key_digest(KEY))
    serve.run(build_application(args), name=name, route_prefix=f"/v2/models/{name}",
              logging_config=logging_config(cfg))


def _overload_until_stepped_down(url: str, body: bytes, state,
                                 rungs: list[str]) -> tuple[list[str], list[str]]:
    """16 clients in rounds of 200 requests until the answers name a faster model and the shared
    controller has moved (or 60 s pass): a fixed count was over in 0.7 s on a fast machine, before
    the replicas' first report. Returns the models that answered, in order, and the controller's changes."""
    answered, history, deadline = [], [], time.time() + 60
    with ThreadPoolExecutor(16) as pool:
        while time.time() < deadline and not (set(answered) - {rungs[0]} and history):
            replies = list(pool.map(lambda _: _call(url, body), range(200)))
            assert all(status == 200 for status, _ in replies), [s for s, _ in replies if s != 200]
            answered += [r["parameters"]["variant"] for _, r in replies]
            history = [model for _, model in state.state.remote().result()["changes"]]
    return answered, history




def _kserve_client(base: str, grpc_port: int, model: str, images: Path) -> dict:
    """What KServe's SDK got from the server, in a client process of its own (kserve_client.py,
    beside test_serving.py), for `images` saved as .npy."""
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "integration" / "kserve_client.py"),
                           base, f"127.0.0.1:{grpc_port}", model, KEY, str(images)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _two_rung_ladder(run_dir: Path, folder: Path) -> tuple[Path, list[str]]:
    """Two measured models that form a ladder (one more accurate, the other faster), the more
    accurate first, and the run that holds them: which ones depends on the tiny run's brief
    timings, so they are looked up, the widest speed gap first."""
    front = read_json(run_dir / "frontier.json")
    records = [r for r in front["variants"] if r.get("servable", True)]
    pairs = [(a, b) for a in records for b in records if a["val_accuracy"] > b["val_accuracy"] and
             b["p50_ms"] < a["p50_ms"]]
    ladder_dir = run_dir
    if not pairs:  # the tiny models sit near chance, where which is faster is timing noise: order them
        top = max(records, key=lambda r: r["val_accuracy"])
        low = min((r for r in records if r["val_accuracy"] < top["val_accuracy"]),
                  key=lambda r: r["p50_ms"])
        ladder_dir = copy_run(run_dir, folder)
        top["p50_ms"] = 2 * low["p50_ms"]  # (in the test's own copy of the run)
        atomic_write_json(ladder_dir / "frontier.json", front)
        pairs = [(top, low)]
    top, low = max(pairs, key=lambda p: p[0]["p50_ms"] / p[1]["p50_ms"])
    return ladder_dir, [top["name"], low["name"]]
