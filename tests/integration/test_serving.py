"""Ray Serve end to end: a real local Ray, real HTTP on 127.0.0.1, the tiny preset's models.

One deployment for the module (Serve takes ~30 s to bring a handful of applications up on 2
cores), with an API key configured so that its enforcement is tested on the same server.
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import copy_run
from serving_helpers import (
    BAD,
    HEADERS,
    KEY,
    _call,
    _infer_body,
    _kserve_client,
    _load_body,
    _overload_until_stepped_down,
    _redeploy,
    _serving,
    _test_images,
    _two_rung_ladder,
)

from distillery.cli.main import main
from distillery.core.errors import UserError
from distillery.serving.auto_policy import ladder
from distillery.serving.predictor import Predictor, catalog


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_run):
    """(base URL, run dir, ServeConfig) of the tiny run's models served on Ray Serve."""
    with _serving(copy_run(tiny_run, tmp_path_factory.mktemp("serve"))) as served:
        yield served


def test_health_and_metadata_routes(server):
    base, run_dir, _ = server
    assert _call(f"{base}/v2/health/live", key=None) == (200, {"live": True})
    assert _call(f"{base}/v2/health/ready", key=None) == (200, {"ready": True})
    status, meta = _call(f"{base}/v2")
    assert status == 200 and meta["name"] == "distillery"
    assert meta["ingress"].startswith("ingress: HAProxy")  # the server's own, for a load test run elsewhere
    names = [m.name for m in catalog(run_dir)]
    status, listing = _call(f"{base}/v2/models")
    assert status == 200 and listing["models"] == [*names, "auto"]
    for name in [*names, "auto"]:
        status, meta = _call(f"{base}/v2/models/{name}")
        assert status == 200 and meta["name"] == name
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
        assert [o["name"] for o in meta["outputs"]] == ["logits", "label"]
        assert _call(f"{base}/v2/models/{name}/ready") == (200, {"name": name, "ready": True})


def test_predictions_over_http_equal_in_process_predictions(server):
    base, run_dir, _ = server
    x = _test_images(run_dir, 5)
    for model in catalog(run_dir):
        status, reply = _call(f"{base}/v2/models/{model.name}/infer", _infer_body(x))
        assert status == 200, reply
        logits, labels = reply["outputs"]
        assert logits["datatype"] == "FP32" and logits["shape"] == [5, 4]
        assert labels["datatype"] == "INT64" and labels["shape"] == [5]
        here = Predictor(model)(x)
        assert labels["data"] == here.argmax(1).tolist()
        assert torch.allclose(torch.tensor(logits["data"]).reshape(5, 4), here, atol=1e-5)
        assert reply["parameters"]["variant"] == model.name


def test_concurrent_requests_are_batched(server):
    base, run_dir, _ = server
    name = catalog(run_dir)[0].name
    x = _test_images(run_dir, 1)
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda _: _call(f"{base}/v2/models/{name}/infer", _infer_body(x)), range(32)))
    assert all(status == 200 for status, _ in replies)
    together = [r["parameters"]["batched_requests"] for _, r in replies]
    assert max(together) > 1, together


def test_auto_at_low_load_answers_with_the_most_accurate_model_and_names_it(server):
    base, run_dir, _ = server
    models, x = catalog(run_dir), _test_images(run_dir, 2)
    top = ladder(models)[0]
    for params in ({}, {"min_accuracy": min(m.val_accuracy for m in models)}, {"max_latency_ms": 5_000}):
        status, reply = _call(f"{base}/v2/models/auto/infer", _infer_body(x, **params))
        assert status == 200 and reply["parameters"]["variant"] == top.name, params
        assert reply["parameters"]["val_accuracy"] == top.val_accuracy  # what chose it
        assert reply["parameters"]["test_accuracy"] == top.test_accuracy  # what the report gives
    assert top.val_accuracy == max(m.val_accuracy for m in models)
    if top.val_accuracy < 1.0:  # a floor above every model's validation accuracy
        status, reply = _call(f"{base}/v2/models/auto/infer", _infer_body(x, min_accuracy=1.0))
        assert status == 422 and "no served model reaches validation accuracy" in reply["error"]


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_a_4xx_naming_the_problem_and_the_replica_keeps_serving(server, case):
    base, run_dir, _ = server
    name = catalog(run_dir)[0].name
    body, status, phrase = BAD[case]
    got, reply = _call(f"{base}/v2/models/{name}/infer", body)
    assert got == status and phrase in reply["error"], reply
    good, _ = _call(f"{base}/v2/models/{name}/infer", _infer_body(_test_images(run_dir, 1)))
    assert good == 200


def test_wrong_method_content_type_and_unknown_model(server):
    base, run_dir, _ = server
    name = catalog(run_dir)[0].name
    assert _call(f"{base}/v2/models/{name}/infer", method="GET")[0] == 405
    status, reply = _call(f"{base}/v2/models/{name}/infer", b"x", content_type="text/plain")
    assert status == 415 and "application/json" in reply["error"]
    status, reply = _call(f"{base}/v2/models/nope/infer", _infer_body(_test_images(run_dir, 1)))
    assert status == 404 and "unknown model 'nope'" in reply["error"] and name in reply["error"]


def test_api_key_is_required_on_every_route_but_health(server):
    base, run_dir, _ = server
    name = catalog(run_dir)[0].name
    for path in ("/v2", "/v2/models", f"/v2/models/{name}", f"/v2/models/{name}/ready", "/v2/models/auto"):
        assert _call(f"{base}{path}", key=None)[0] == 401, path
        assert _call(f"{base}{path}", key="wrong")[0] == 401, path
    body = _infer_body(_test_images(run_dir, 1))
    assert _call(f"{base}/v2/models/{name}/infer", body, key=None)[0] == 401
    assert _call(f"{base}/v2/models/auto/infer", body, key=None)[0] == 401
    assert _call(f"{base}/v2/health/ready", key=None)[0] == 200


def test_a_tampered_artifact_is_refused_before_and_inside_a_replica(server, tmp_path):
    from ray import serve

    from distillery.serving import serve_apps

    _, run_dir, cfg = server
    copy = tmp_path / "tiny"
    shutil.copytree(run_dir, copy)
    # a model folder of its own (a served cascade's weights are its members')
    model = catalog(copy, ["student"])[0]
    weights = Path(model.folder) / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=f"{weights}: sha256 mismatch"):
        serve_apps.applications(str(copy), cfg.model_copy(update={"models": ["student"]}), KEY)
    # A replica verifies again: deployed around the driver-side check, it never serves.
    args = serve_apps.AppArgs(kind="model", run_dir=str(copy), models=[model.name],
                               settings=cfg.model_dump())
    with pytest.raises(Exception, match="Deploying application tampered failed"):
        serve.run(serve_apps.build_application(args), name="tampered", route_prefix="/tampered")
    app = serve.status().applications["tampered"]
    assert app.status == "DEPLOY_FAILED"
    assert f"{weights}: sha256 mismatch" in app.deployments["Model"].message
    serve.delete("tampered")


def test_query_client_prints_predictions(server, capsys):
    base, run_dir, _ = server
    x = _test_images(run_dir, 3).numpy()
    np.save(run_dir.parent / "three.npy", x)
    import os

    os.environ["DISTILLERY_TEST_KEY"] = KEY
    assert main(["query", "--url", base, "--model", "auto", "--sample", "4", "--run-dir", str(run_dir),
                 "--api-key-env", "DISTILLERY_TEST_KEY"]) == 0
    out = capsys.readouterr().out
    assert "answered by" in out and "correct:" in out
    assert main(["query", "--url", base, "--model", "auto", "--input", str(run_dir.parent / "three.npy"),
                 "--api-key-env", "DISTILLERY_TEST_KEY"]) == 0
    assert "for 3 image(s)" in capsys.readouterr().out
    assert main(["query", "--url", base, "--model", "auto", "--sample", "1", "--run-dir", str(run_dir)]) == 2
    assert "HTTP 401" in capsys.readouterr().err


def test_closed_loop_counts_add_up_and_replicas_are_sampled(server, tmp_path, monkeypatch):
    from distillery.loadtest import report
    from distillery.loadtest import run as lt
    from distillery.measure import timing

    base, run_dir, _ = server
    name = catalog(run_dir)[0].name
    rows = lt.sweep(base, name, _load_body(run_dir), [1, 4], 1.5, HEADERS)
    for r in rows:
        assert r["requests"] == len(r["samples"]) == r["ok"] + sum(r["errors"].values())
        assert r["ok"] > 0 and r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert sum(p["requests"] for p in r["per_second"]) == r["requests"]
        assert r["replicas"] and all(n == 1 for _, n in r["replicas"])  # max_replicas is 1 here
        assert r["variants"] == {name: r["ok"]} and r["generator_cpu"] > 0
    # The report names the ingress as the server tells it, whatever this process's environment says.
    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    files = report.write_report(tmp_path, rows, None, timing.machine_info(),
                                {"ingress": lt.served_ingress(base, HEADERS)})
    assert [f.name for f in files] == ["loadtest.json", "loadtest.md", "loadtest.png", "requests.csv"]
    assert len((tmp_path / "requests.csv").read_text().splitlines()) == 1 + sum(r["requests"] for r in rows)
    assert f"| {name} | 4 |" in (tmp_path / "loadtest.md").read_text()
    assert "HTTP ingress: HAProxy (" in (tmp_path / "loadtest.md").read_text()


def test_open_loop_keeps_its_schedule_and_loses_nothing(server):
    from distillery.loadtest import run as lt

    base, run_dir, _ = server
    name = catalog(run_dir)[0].name
    result = lt.ramp(base, name, _load_body(run_dir), [(1.0, 20.0), (1.0, 40.0)], HEADERS)
    assert result["requests"] == 60 and result["lost"] == 0
    assert result["ok"] + result["rejected_503"] == 60
    due = [s.scheduled for s in result["samples"]]
    assert due == sorted(due) and due[20] == pytest.approx(1.0) and due[-1] == pytest.approx(1.975)
    # Sending on time whatever the server does is tests/unit/loadtest's check, against a slow
    # server: here the generator shares two busy cores with Serve, so its lateness is the machine's.
    assert all(s.sent >= s.scheduled for s in result["samples"])
    assert result["initial_replicas"] == 1 and result["replicas"]


def test_a_stock_triton_client_works_in_json_and_binary(server):
    """Triton's own HTTP client, unchanged: metadata, JSON tensors, binary tensors both ways."""
    import tritonclient.http as triton

    base, run_dir, _ = server
    model = catalog(run_dir)[0]
    client = triton.InferenceServerClient(base.removeprefix("http://"))
    headers = {"x-api-key": KEY}
    assert client.is_server_live() and client.is_model_ready(model.name, headers=headers)
    assert client.get_model_metadata(model.name, headers=headers)["inputs"][0]["name"] == "input"
    x = _test_images(run_dir, 64)
    expected = Predictor(model)(x)
    for binary in (False, True):
        inp = triton.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x.numpy(), binary_data=binary)
        outs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("logits", "label")]
        result = client.infer(model.name, [inp], outputs=outs, headers=headers)
        assert result.as_numpy("label").tolist() == expected.argmax(1).tolist()
        assert np.allclose(result.as_numpy("logits"), expected.numpy(), atol=1e-5)


def test_tuning_picks_a_tried_setting_and_serve_build_uses_it(server, tmp_path):
    from distillery.core.files import atomic_write_json
    from distillery.loadtest import run as lt
    from distillery.serving import serve_apps

    base, run_dir, cfg = server
    name = catalog(run_dir)[0].name
    grid = [(1, 0.0), (16, 0.002)]
    result = lt.tune(base, str(run_dir), name, _load_body(run_dir), cfg, KEY, grid, concurrency=4,
                     seconds=1.0, p99_target_ms=10_000.0, headers=HEADERS, settle_s=0.5)
    chosen = result["chosen"]
    assert (chosen["max_batch_size"], chosen["batch_wait_timeout_s"]) in grid and len(result["trials"]) == 2
    assert result["within_p99_target"]  # a 10 s target: every trial is within it
    best = max(result["trials"], key=lambda t: t["throughput"])
    assert chosen["max_batch_size"] == best["max_batch_size"]
    assert chosen["target_ongoing_requests"] in {r["concurrency"] for r in result["curve"]}
    still_serves = _call(f"{base}/v2/models/{name}/infer", _infer_body(_test_images(run_dir, 1)))
    assert still_serves[0] == 200
    copy = tmp_path / "tiny"
    shutil.copytree(run_dir, copy)
    atomic_write_json(copy / serve_apps.TUNED, {name: result})
    apps = {a["name"]: a["args"].settings for a in serve_apps.applications(str(copy), cfg, KEY)}
    assert apps[name]["max_batch_size"] == chosen["max_batch_size"]
    assert apps[name]["target_ongoing_requests"] == chosen["target_ongoing_requests"]
    others = [n for n in apps if n not in (name, "auto", "server")]
    assert all(apps[n]["max_batch_size"] == cfg.max_batch_size for n in others)


# --- official clients, unchanged (docs/serving.md's compatibility table) --------------------------

def test_version_routes_and_requested_outputs(server):
    base, run_dir, _ = server
    name, x = catalog(run_dir)[0].name, _test_images(run_dir, 2)
    for model in (name, "auto"):
        status, meta = _call(f"{base}/v2/models/{model}/versions/1")
        assert status == 200 and meta["name"] == model and meta["versions"] == ["1"]
        assert _call(f"{base}/v2/models/{model}/versions/1/ready") == (200, {"name": model, "ready": True})
        status, reply = _call(f"{base}/v2/models/{model}/versions/1/infer", _infer_body(x))
        assert status == 200 and reply["model_version"] == "1" and len(reply["outputs"]) == 2
        status, err = _call(f"{base}/v2/models/{model}/versions/2/infer", _infer_body(x))
        assert status == 404 and "no version '2'" in err["error"]
    only_label = json.loads(_infer_body(x)) | {"outputs": [{"name": "label"}]}
    status, reply = _call(f"{base}/v2/models/{name}/infer", json.dumps(only_label).encode())
    assert status == 200 and [o["name"] for o in reply["outputs"]] == ["label"]
    for wrong, says in (({"outputs": [{"name": "nope"}]}, "'nope'"), ({"model_name": "other"}, "'other'")):
        body = json.dumps(json.loads(_infer_body(x)) | wrong).encode()
        status, err = _call(f"{base}/v2/models/{name}/infer", body)
        assert status == 400 and says in err["error"]


def test_kserve_sdk_over_http_and_grpc(server, tmp_path):
    """KServe's own SDK, unchanged, in a client process of its own (`kserve_client.py`): REST
    (it puts model_name and id in the body; JSON and binary tensors; `auto`) and gRPC."""
    base, run_dir, cfg = server
    model = catalog(run_dir)[0]
    x = _test_images(run_dir, 16)
    np.save(tmp_path / "x.npy", x.numpy())
    got = _kserve_client(base, cfg.grpc_port, model.name, tmp_path / "x.npy")
    expected = Predictor(model)(x).argmax(1).tolist()
    assert got["ready"] and not got["ready_wrong_key"] and \
        got["grpc_wrong_key"] == "StatusCode.UNAUTHENTICATED"
    assert all(got[call]["labels"] == expected for call in ("json", "binary", "grpc"))
    assert got["json"]["id"] == got["binary"]["id"] == "k-1"
    best = Predictor(ladder(catalog(run_dir))[0])(x).argmax(1).tolist()  # `auto` at low load
    assert got["auto"]["labels"] == got["grpc_auto"]["labels"] == best


def test_tritonclient_over_grpc(server):
    """The protocol's gRPC service on Serve's gRPC ingress: no Ray metadata from the client;
    refusals with the codes a client expects, and the replicas keep serving."""
    import grpc
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    base, run_dir, cfg = server
    model = catalog(run_dir)[0]
    x = _test_images(run_dir, 16)
    expected = Predictor(model)(x)
    client, headers = triton.InferenceServerClient(f"127.0.0.1:{cfg.grpc_port}"), {"x-api-key": KEY}
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(model.name, headers=headers)
    meta = client.get_model_metadata(model.name, headers=headers)
    assert meta.inputs[0].name == "input" and list(meta.inputs[0].shape) == [-1, *model.in_shape]
    assert client.get_server_metadata(headers=headers).name == "distillery"
    auto = Predictor(ladder(catalog(run_dir))[0])(x)
    for name, want in ((model.name, expected), ("auto", auto)):
        inp = triton.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x.numpy())
        result = client.infer(name, [inp], headers=headers, request_id="t-1")
        assert result.as_numpy("label").tolist() == want.argmax(1).tolist()
        assert np.allclose(result.as_numpy("logits"), want.numpy(), atol=1e-5) and \
            result.get_response().id == "t-1"
    refusals = [  # (key, model, images as sent, parameters, code, what the message says)
        ("x", model.name, x, {}, grpc.StatusCode.UNAUTHENTICATED, "API key"),
        (KEY, "nope", x, {}, grpc.StatusCode.NOT_FOUND, "'nope'"),
        (KEY, model.name, x.reshape(16, 64), {}, grpc.StatusCode.INVALID_ARGUMENT, "shape must be"),
        (KEY, "auto", x, {"min_accuracy": 0.999}, grpc.StatusCode.INVALID_ARGUMENT,
         "no served model reaches")]
    for key, name, images, params, code, says in refusals:
        inp = triton.InferInput("input", list(images.shape), "FP32")
        inp.set_data_from_numpy(images.numpy())
        with pytest.raises(InferenceServerException) as e:
            client.infer(name, [inp], headers={"x-api-key": key}, parameters=params or None)
        assert e.value.status() == f"StatusCode.{code.name}" and says in e.value.message(), (name, params)
    assert _call(f"{base}/v2/health/ready", key=None) == (200, {"ready": True})  # every replica still up


def test_a_served_cascade_answers_small_where_confident_else_large_row_by_row(server):
    from ray import serve

    from distillery.compression.cascade import confidence
    from distillery.core.files import read_json

    base, run_dir, cfg = server
    arch = read_json(run_dir / "variants" / "cascade" / "arch.json")
    small, large = (Predictor(m) for m in catalog(run_dir, [arch["small"], arch["large"]]))
    x = _test_images(run_dir, 48)
    s, big = small(x), large(x)
    sure = confidence(s, arch["confidence"]) >= arch["threshold"]
    expected = torch.where(sure, s.argmax(1), big.argmax(1))
    assert torch.equal(Predictor(catalog(run_dir, ["cascade"])[0])(x).argmax(1), expected)  # in process
    _redeploy("cascade", "model", run_dir, cfg, ["cascade"])
    try:
        status, reply = _call(f"{base}/v2/models/cascade/infer", _infer_body(x))
        assert status == 200 and reply["outputs"][1]["data"] == expected.tolist()
    finally:
        serve.delete("cascade")


def test_auto_steps_down_under_overload_and_back_up_when_it_ends(server, tmp_path):
    """`auto` redeployed with a 3 ms objective that 16 concurrent clients overload: it steps down
    the ladder (the answers name faster models); once the load ends it climbs back."""
    from ray import serve

    base, run_dir, cfg = server
    ladder_dir, pair = _two_rung_ladder(run_dir, tmp_path)
    rungs = [m.name for m in ladder(catalog(ladder_dir, pair))]
    assert rungs == pair
    _redeploy("auto", "auto", ladder_dir, cfg.model_copy(update={"auto_slo_ms": 3.0}), rungs)
    try:
        body = _infer_body(_test_images(run_dir, 8))
        state = serve.get_deployment_handle("AutoState", app_name="auto")
        answered, history = _overload_until_stepped_down(f"{base}/v2/models/auto/infer", body, state, rungs)
        assert answered[0] == rungs[0] and set(answered) - {rungs[0]}, "never stepped down"
        assert history and history[0] == rungs[1], (history, rungs, answered[-50:])
        # No load: one rung up per hold period. A replica learns the shared decision at its next
        # report (every 0.1 s), so a client sees the climb a moment after AutoState makes it.
        deadline, status, reply = time.time() + 30, 0, {}
        while time.time() < deadline and reply.get("parameters", {}).get("variant") != rungs[0]:
            time.sleep(0.5)
            status, reply = _call(f"{base}/v2/models/auto/infer", body)
        assert status == 200 and reply["parameters"]["variant"] == rungs[0], reply
        assert [model for _, model in state.state.remote().result()["changes"]][-1] == rungs[0]
    finally:
        _redeploy("auto", "auto", run_dir, cfg, [m.name for m in catalog(run_dir)])
