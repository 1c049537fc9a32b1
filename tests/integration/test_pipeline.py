"""The whole pipeline on the tiny preset, serving and load test included, on a real local Ray
instance with Serve on 127.0.0.1: every artifact of the manifest, report.md, a crash between
stages resumed, a finished run re-run as a no-op. Training runs in this process
(`ray.workers=0`, Ray Train is covered by test_ray_train.py and test_multinode.py)."""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import yaml
from conftest import ROOT, free_port

from distillery.cli.main import main
from distillery.core.files import sha256_file
from distillery.pipeline import stages

TINY = str(ROOT / "configs" / "tiny.yaml")
GRPC_PORT = free_port()  # both the in-process runs and the Ctrl-C one: the serve stage's config is the same
STAGES = ["data", "teacher", "student_scratch", "student", "evaluate", "compress", "serve", "report"]


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory):
    """Three `distillery run`s of one run directory: crashed in the report stage, resumed,
    re-run when finished. Yields (run dir, [stdout of each], port)."""
    import ray

    storage, port = tmp_path_factory.mktemp("pipeline") / "runs", free_port()
    args = ["run", "--config", TINY, "--set", f"storage_path={storage}", "--set", "ray.workers=0",
            "--set", f"serve.port={port}", "--set", f"serve.grpc_port={GRPC_PORT}", "--no-keep-serving"]
    outputs = []
    capture = pytest.MonkeyPatch()
    try:
        real = stages.write_report

        def crash(run, cfg, log):
            raise RuntimeError("injected crash before the report")

        capture.setattr(stages, "write_report", crash)
        assert _run(args, outputs) == 1  # one line on stderr, the traceback in the run's log
        assert "RuntimeError: injected crash before the report" in \
            (storage / "tiny" / "logs" / "run.log").read_text()
        capture.setattr(stages, "write_report", real)
        assert _run(args, outputs) == 0
        mtimes = _mtimes(storage / "tiny")
        assert _run(args, outputs) == 0
        yield storage / "tiny", outputs, port, mtimes
    finally:
        capture.undo()
        ray.shutdown()


def _mtimes(root):
    """Every file of the run but its logs (each command appends to them)."""
    return {p: p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and "logs" not in p.relative_to(root).parts}


def _run(args, outputs):
    import contextlib
    import io

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            return main(args)
    finally:
        outputs.append(out.getvalue())


def test_every_stage_ran_and_every_recorded_file_verifies(pipeline_runs):
    root, _, _, _ = pipeline_runs
    manifest = json.loads((root / "manifest.json").read_text())
    assert {n: s["status"] for n, s in manifest["stages"].items()} == dict.fromkeys(STAGES, "done")
    for rel, digest in manifest["files"].items():
        assert sha256_file(root / rel) == digest, rel
    expected = {"report.md", "serve/request.json", "serve/config.yaml", "frontier.json", "frontier.png",
                "serve/loadtest/loadtest.json", "serve/loadtest/loadtest.png", "serve/loadtest/requests.csv",
                "results.json", "student/model.safetensors", "teacher/model.safetensors"}
    assert expected <= manifest["files"].keys()


def test_a_crash_between_stages_resumes_at_the_unfinished_stage(pipeline_runs):
    _, (crashed, resumed, _), _, _ = pipeline_runs
    assert "[serve] running" in crashed and "[report] running" in crashed
    assert "[serve] done already" in resumed and "[compress] done already" in resumed
    assert "[report] running" in resumed and "[serve] running" not in resumed


def test_the_console_is_short_and_has_no_warning_or_traceback(pipeline_runs):
    """The first run's console (every stage but the report) and the resumed one's, as captured
    here: stage lines and progress only; epochs and variants are in the run's log."""
    root, (crashed, resumed, _), _, _ = pipeline_runs
    lines = [line for line in (crashed + resumed).splitlines() if line.strip()]
    assert len(lines) <= 80, "\n".join(lines)
    noisy = [line for line in lines if any(w in line for w in ("Traceback", "WARNING", "Warning", "ERROR"))]
    assert not noisy, noisy
    assert "[teacher] epoch 2/2" not in crashed and \
        "[teacher] epoch 2/2" in (root / "logs" / "run.log").read_text()


def test_rerunning_a_finished_run_changes_nothing(pipeline_runs):
    root, (_, _, again), _, before = pipeline_runs
    assert again.count("done already") == len(STAGES) and \
        "running" not in again.replace("[serve] shut down", "")
    assert _mtimes(root) == before


def test_the_load_test_answered_every_request(pipeline_runs):
    root, _, _, _ = pipeline_runs
    doc = json.loads((root / "serve" / "loadtest" / "loadtest.json").read_text())
    served = {r["model"] for r in doc["sweeps"]}
    assert "auto" in served and len(served) >= 2
    assert all(r["requests"] > 0 and r["ok"] == r["requests"] for r in doc["sweeps"])
    assert doc["scaling"]["requests"] > 0 and doc["scaling"]["lost"] == 0
    adaptive = doc["adaptive"]  # the scenario: the accurate model, the fastest, auto, on one schedule
    assert set(adaptive["runs"]) == {adaptive["top"], adaptive["fastest"], "auto"}
    for run in adaptive["runs"].values():
        assert run["requests"] == sum(r["requests"] for r in run["per_second"]) > 0
        assert set(run["variants"]) <= set(adaptive["ladder"]) and 0.0 <= run["seconds_within_slo"] <= 1.0
    assert set(adaptive["runs"][adaptive["fastest"]]["variants"]) == {adaptive["fastest"]}
    assert (root / "serve" / "loadtest" / "adaptive.png").stat().st_size > 0
    assert "Adaptive scenario" in (root / "serve" / "loadtest" / "loadtest.md").read_text()
    stage = json.loads((root / "manifest.json").read_text())["stages"]["serve"]["metrics"]
    assert stage["lost"] == 0 and \
        stage["requests"] == sum(r["requests"] for r in doc["sweeps"]) + doc["scaling"]["requests"]


def test_report_has_every_section_with_the_measured_figures(pipeline_runs):
    root, _, port, _ = pipeline_runs
    report = (root / "report.md").read_text()
    for heading in ("## What was trained", "## Speed vs accuracy", "## Recommended", "## Serving",
                    "## How to query the deployment", "## Machine and versions"):
        assert heading in report, heading
    frontier = json.loads((root / "frontier.json").read_text())
    results = json.loads((root / "results.json").read_text())
    doc = json.loads((root / "serve" / "loadtest" / "loadtest.json").read_text())
    assert f"## Recommended: `{frontier['recommended']['name']}`" in report
    assert f"{results['models']['student']['test_accuracy']:.2%}" in report
    assert f"{doc['sweeps'][0]['throughput']:.1f}" in report
    assert "![frontier](frontier.png)" in report and "(serve/loadtest/loadtest.png)" in report
    assert f"http://127.0.0.1:{port}/v2/models/" in report and f"-d @{root}/serve/request.json" in report
    assert "tritonclient.http" in report and "torch 2.13" in report


def test_serve_config_and_example_request_are_usable(pipeline_runs):
    from ray.serve.schema import ServeDeploySchema

    from distillery.serving.protocol import Limits, parse_infer

    root, _, port, _ = pipeline_runs
    doc = yaml.safe_load((root / "serve" / "config.yaml").read_text())
    ServeDeploySchema.model_validate(doc)
    assert doc["http_options"] == {"host": "127.0.0.1", "port": port, "request_timeout_s": 10.0}
    request = parse_infer((root / "serve" / "request.json").read_bytes(), [1, 8, 8], Limits())
    assert tuple(request.x.shape) == (1, 1, 8, 8)


def test_no_keep_serving_took_the_deployment_down(pipeline_runs):
    _, outputs, port, _ = pipeline_runs
    assert "[serve] shut down (--no-keep-serving)" in outputs[-1]
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5)


def test_a_finished_run_keeps_serving_until_ctrl_c(pipeline_runs):
    """The README's main command without --no-keep-serving: every stage done already, the run's
    models deployed again and served until SIGINT, then taken down; exit code 0."""
    root, _, port, before = pipeline_runs
    cmd = [sys.executable, "-m", "distillery.cli.main", "run", "--config", TINY,
           "--set", f"storage_path={root.parent}", "--set", "ray.workers=0", "--set", f"serve.port={port}",
           "--set", f"serve.grpc_port={GRPC_PORT}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen, deadline = [], time.monotonic() + 240
    try:
        while not any("Ctrl-C stops serving" in line for line in seen):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(seen)[-3000:]
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        assert sum("done already" in line for line in seen) == len(STAGES)
        assert any(f"serving http://127.0.0.1:{port}/v2" in line for line in seen)
        model = json.loads((root / "frontier.json").read_text())["recommended"]["name"]
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{model}/infer",
                                         data=(root / "serve" / "request.json").read_bytes(),
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            assert json.loads(r.read())["model_name"] == model
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C, to the driver only
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:  # leave no Ray instance behind for the next tests
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert code == 0
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5)
    # Nothing redone: every artifact untouched (the manifest's environment block may differ
    # from the in-process runs above, e.g. torch's thread count in a fresh process; the scrape
    # config names this deployment's ports, new with each Ray instance).
    kept = ("manifest.json", "config.yaml", "prometheus.yml")
    unchanged = lambda files: {p: t for p, t in files.items() if p.name not in kept}  # noqa: E731
    assert unchanged(_mtimes(root)) == unchanged(before)
