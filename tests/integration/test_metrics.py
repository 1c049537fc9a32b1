"""The replicas' metrics as an operator reads them: a real Prometheus (Debian's `prometheus`),
started here with the scrape config the serve stage writes, after a known load over HTTP and
gRPC; its HTTP API answers PromQL with exactly what the client saw, per model and outcome."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import ROOT, copy_run, free_port

from distillery import data
from distillery.compat import ingress
from distillery.compat.worker import worker_setup
from distillery.config import ServeConfig
from distillery.serving.predictor import catalog

PROMETHEUS = shutil.which("prometheus")
MODELS = ["student", "student_scratch"]  # always in a run (the frontier's served set depends on timings)
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="needs Debian's prometheus package (.ci/run installs it: apt-get install prometheus)",
)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_run):
    """(base URL, gRPC address, run dir, Prometheus URL): the tiny run served with one replica
    per model, each model admitting two requests at a time (so a burst over gRPC is refused in part),
    and a Prometheus scraping the config the serve stage writes, every second."""
    import ray
    from ray import serve

    from distillery.serving import launch, prometheus, serve_apps

    run_dir = copy_run(tiny_run, tmp_path_factory.mktemp("metrics"))
    cfg = ServeConfig(
        port=free_port(),
        grpc_port=free_port(),
        models=MODELS,
        max_replicas=1,
        max_ongoing_requests=1,
        max_queued_requests=1,
        auto=False,
        request_log_sample=1.0,
    )
    ingress.apply(cfg.ingress, cfg.host)
    ray.init(address="local", num_cpus=4, include_dashboard=False,
             runtime_env={"worker_process_setup_hook": worker_setup})  # as `cluster.ensure_ray` starts it
    server = None
    try:
        url = serve_apps.deploy(str(run_dir), cfg, None).removesuffix("/v2")
        agents, haproxy = launch.scrape_targets()
        config = prometheus.write(run_dir / "serve", agents, haproxy, interval_s=1.0)
        port = free_port()
        server = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--web.listen-address=127.0.0.1:{port}",
                f"--storage.tsdb.path={run_dir / 'serve' / 'tsdb'}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(run_dir / "prometheus.log", "wb"),
        )
        yield url, f"127.0.0.1:{cfg.grpc_port}", run_dir, f"http://127.0.0.1:{port}"
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        serve.shutdown()
        ray.shutdown()


def _http(url: str, body: bytes, replies: list | None = None) -> int:
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            if replies is not None:
                replies.append(r.headers.get("x-request-id"))
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _body(x: torch.Tensor) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.reshape(-1).tolist()}]}).encode()


def _grpc_bursts(address: str, model: str, x: torch.Tensor) -> dict[str, int]:
    """Bursts of 32 gRPC calls at once on one channel until some are refused (UNAVAILABLE; 10
    bursts at most: calls overlap in the replica only now and then); how many were answered
    and how many refused."""
    import asyncio

    import tritonclient.grpc.aio as triton_aio
    from tritonclient.utils import InferenceServerException

    async def call(client) -> str:
        inp = triton_aio.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x.numpy())
        try:
            await client.infer(model, [inp])
            return "ok"
        except InferenceServerException as e:
            assert e.status() == "StatusCode.UNAVAILABLE", e.message()
            return "refused"

    async def bursts() -> list[str]:
        outcomes: list[str] = []
        async with triton_aio.InferenceServerClient(address) as client:
            while len(outcomes) < 320 and "refused" not in outcomes:
                outcomes += await asyncio.gather(*(call(client) for _ in range(32)))
        return outcomes

    outcomes = asyncio.run(bursts())
    return {"ok": outcomes.count("ok"), "refused": outcomes.count("refused")}


def _query(prometheus_url: str, promql: str) -> dict[tuple, float]:
    url = f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as r:
        result = json.loads(r.read())["data"]["result"]
    return {tuple(sorted(s["metric"].items())): float(s["value"][1]) for s in result}


def _counts(prometheus_url: str) -> dict[tuple[str, str, str], float]:
    got = _query(prometheus_url, "sum by (model, protocol, outcome) (distillery_requests_total)")
    return {(dict(k)["model"], dict(k)["protocol"], dict(k)["outcome"]): v for k, v in got.items()}


def test_prometheus_counts_what_the_client_saw_per_model_and_outcome(served):
    url, grpc_address, run_dir, prometheus_url = served
    first, second = MODELS
    x = data.load_split(run_dir / "data", "test")[0][:4]
    sent = {first: 7, second: 5}
    for model, n in sent.items():
        assert [_http(f"{url}/v2/models/{model}/infer", _body(x)) for _ in range(n)] == [200] * n
    malformed = [
        _http(f"{url}/v2/models/{first}/infer", b"{not json"),
        _http(f"{url}/v2/models/{first}/infer", _body(x.reshape(4, 64))),
    ]
    assert malformed == [400, 400]
    burst = _grpc_bursts(grpc_address, second, torch.rand(256, *x.shape[1:]))
    assert burst["refused"] > 0 and burst["ok"] > 0, (
        burst
    )  # two admitted at a time: a burst is refused in part
    want = {(first, "http", "ok"): 7.0, (second, "http", "ok"): 5.0, (first, "http", "client_error"): 2.0,
            (second, "grpc", "ok"): float(burst["ok"]), (second, "grpc", "refused"): float(burst["refused"])}
    deadline, got = time.time() + 90, {}
    while (
        time.time() < deadline and got != want
    ):  # Ray's agent reports every few seconds, Prometheus scrapes each
        time.sleep(2)
        got = _counts(prometheus_url)
    assert got == want


def test_batching_and_the_scrape_config_are_there_too(served):
    url, _, run_dir, prometheus_url = served
    doc = (run_dir / "serve" / "prometheus.yml").read_text()
    assert "job_name: ray" in doc and "ray_(distillery_.*)" in doc
    batches = _query(prometheus_url, "sum(distillery_batch_size_count)")
    forward = _query(prometheus_url, "sum by (model) (distillery_forward_seconds_count)")
    assert batches and list(batches.values())[0] > 0
    assert {dict(k)["model"] for k in forward} >= {m.name for m in catalog(run_dir, MODELS)[:2]}
    targets = json.loads(urllib.request.urlopen(f"{prometheus_url}/api/v1/targets", timeout=10).read())
    health = {t["labels"]["job"]: t["health"] for t in targets["data"]["activeTargets"]}
    assert health.get("ray") == "up", targets
    if ingress.haproxy_metrics_target():  # the ingress's own exporter, on loopback
        assert health.get("haproxy") == "up", targets
    assert Path(run_dir / "serve" / "tsdb").is_dir()


def test_every_query_of_the_shipped_dashboard_resolves(served):
    """serve/grafana/distillery.json's queries, run by Prometheus: each valid, and the ones on
    the traffic sent above answer with data."""
    *_, prometheus_url = served
    doc = json.loads((ROOT / "serve" / "grafana" / "distillery.json").read_text())
    exprs = {panel["title"]: [t["expr"] for t in panel["targets"]] for panel in doc["panels"]}
    for title, queries in exprs.items():
        for expr in queries:
            url = f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
            with urllib.request.urlopen(url, timeout=10) as r:
                assert json.loads(r.read())["status"] == "success", (title, expr)
    deadline = time.time() + 60
    while time.time() < deadline and not _query(prometheus_url, exprs["Requests/s answered, per model"][0]):
        time.sleep(2)  # rate() needs two scrapes after the traffic
    assert _query(prometheus_url, exprs["Requests/s answered, per model"][0])
    assert _query(prometheus_url, exprs["Latency in the replica: p50 and p99"][1])


def test_top_shows_what_was_answered_since_it_first_looked(served, capsys):
    """`distillery top`'s view, from the agents the run's prometheus.yml names: 9 requests sent
    after its first look show as 9 answered, with a latency and a batch size."""
    from distillery.cli.main import main
    from distillery.serving.top import Watch, scrape, targets_of

    url, _, run_dir, _ = served
    model = MODELS[0]  # sent 7 answered requests above, over HTTP
    targets = targets_of(str(run_dir / "serve" / "prometheus.yml"))
    deadline = time.time() + 60
    while _answered(scrape(targets), model) < 7:  # what was sent above has reached the agents
        assert time.time() < deadline
        time.sleep(1)
    watch = Watch(targets, window_s=3600)
    watch.tick()
    x = data.load_split(run_dir / "data", "test")[0][:2]
    assert [_http(f"{url}/v2/models/{model}/infer", _body(x)) for _ in range(9)] == [200] * 9
    deadline, row = time.time() + 60, None
    while time.time() < deadline and (row is None or row.answered < 9):
        time.sleep(2)  # Ray's agents take the replicas' figures every 10 s
        row = next((r for r in watch.tick()[0] if r.model == model), None)
    assert row is not None and row.answered == 9 and row.p50_ms > 0 and row.batch >= 1 and row.replicas == 1
    assert main(["top", str(run_dir), "--samples", "1"]) == 0
    assert model in capsys.readouterr().out


def _answered(sample: dict, model: str) -> float:
    return sum(v for (name, labels), v in sample.items() if name == "distillery_requests_total"
               and dict(labels).get("model") == model and dict(labels).get("outcome") == "ok")


def test_a_logged_request_is_found_by_the_id_its_client_got(served):
    """serve.request_log_sample=1: every request is one JSON line in its replica's request log,
    under the id the reply carried (the client's own, else one made for it)."""
    import tritonclient.grpc as triton_grpc

    from distillery.compat.logs import session_logs

    url, grpc_address, run_dir, _ = served
    model = catalog(run_dir, MODELS)[0].name
    x = data.load_split(run_dir / "data", "test")[0][:3]
    ids: list = []
    body = json.loads(_body(x))
    assert (
        _http(f"{url}/v2/models/{model}/infer", json.dumps({**body, "id": "find-me-7"}).encode(), ids) == 200
    )
    assert _http(f"{url}/v2/models/{model}/infer", _body(x), ids) == 200
    inp = triton_grpc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x.numpy())
    ids.append(triton_grpc.InferenceServerClient(grpc_address).infer(model, [inp]).get_response().id)
    assert ids[0] == "find-me-7" and len(ids[1]) == len(ids[2]) == 16
    deadline, found = time.time() + 30, {}
    while time.time() < deadline and len(found) < 3:
        for path in (session_logs() / "serve").glob("requests_*.jsonl"):
            for line in path.read_text().splitlines():
                record = json.loads(line)  # every line is one JSON object
                if record.get("id") in ids:
                    found[record["id"]] = record
        time.sleep(1)
    assert set(found) == set(ids)
    record = found["find-me-7"]
    assert (record["model"], record["outcome"], record["images"], record["protocol"]) == (
        model,
        "ok",
        3,
        "http",
    )
    assert record["ms"] >= record["forward_ms"] > 0 and record["queue_ms"] >= 0
    assert (found[ids[2]]["protocol"], found[ids[2]]["outcome"]) == ("grpc", "ok")

