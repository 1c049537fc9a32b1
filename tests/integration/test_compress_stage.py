"""The compress stage end to end on the tiny preset, in this process (`ray.workers=0`): one
run builds five variants (gradual unstructured pruning, channel pruning, QAT int8, int4
weights, dynamic int8), then the tests check the frontier report, the variant folders, the
manifest, a no-op re-run and a refused recipe."""

import contextlib
import csv
import io
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, free_port

from distillery import artifacts, data
from distillery.cli.main import main
from distillery.core.files import sha256_file
from distillery.serving.predictor import catalog
from distillery.training.loop import batches, evaluate

TINY = str(ROOT / "configs" / "tiny.yaml")
VARIANTS = ("compress.variants=["
            "{name: sparse, steps: [{kind: prune_unstructured, sparsity: 0.5}, "
            "{kind: finetune, epochs: 2}]}, "
            "{name: slim, steps: [{kind: prune_channels, mac_ratio: 1.5, round_to: 4}, "
            "{kind: finetune, epochs: 1}]}, "
            # max_drop -1: always QAT
            "{name: q8, steps: [{kind: int8_static, max_drop: -1.0, qat_epochs: 1}]}, "
            "{name: w4, steps: [{kind: weight_only, bits: 4, group_size: 16}]}, "
            "{name: dyn, steps: [{kind: int8_dynamic}]}]")
NAMES = ("sparse", "slim", "q8", "w4", "dyn")
BASES = ("teacher", "student", "student_scratch")
FAST = ["--set", "ray.workers=0", "--set", "serve.enabled=false", "--set", "compress.bench.latency_runs=20",
        "--set", "compress.bench.throughput_runs=2", "--set", "compress.bench.throughput_batch=32",
        "--set", "compress.bench.modes=[eager]"]


def _main(storage, *args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([*args, "--config", TINY, "--set", f"storage_path={storage}", *FAST])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(storage path, run directory, stdout) of one full `distillery run` with the variants above."""
    storage = tmp_path_factory.mktemp("compress") / "runs"
    rc, out, err = _main(storage, "run", "--set", VARIANTS)
    assert rc == 0, err
    return storage, storage / "tiny", out


def _frontier(root) -> dict:
    return json.loads((root / "frontier.json").read_text())


def test_the_variant_list_given_on_the_command_line_is_what_ran(run):
    _, root, out = run
    manifest = json.loads((root / "manifest.json").read_text())
    assert [v["name"] for v in manifest["config"]["compress"]["variants"]] == list(NAMES)
    assert manifest["config"]["compress"]["bench"]["modes"] == ["eager"]
    # every step is in the run's log; the console has the verdict
    log = (root / "logs" / "run.log").read_text()
    for name in NAMES:
        assert f"[compress] {name}: student -> " in log and f"[compress] {name}: student -> " not in out
    assert "quantization-aware training" in log and "[qat] epoch 1/1" in log
    assert "[finetune:sparse] epoch 2/2" in log and "[finetune:slim] epoch 1/1" in log
    assert "[compress] recommended: " in out


def test_frontier_report_lists_every_model_with_measured_figures(run):
    _, root, _ = run
    for ext in ("json", "csv", "md", "png"):
        assert (root / f"frontier.{ext}").stat().st_size > 0
    assert (root / "frontier.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    report = _frontier(root)
    records = {r["name"]: r for r in report["variants"]}
    assert list(records) == [*BASES, *NAMES]
    for name, r in records.items():
        assert 0.0 <= r["test_accuracy"] <= 1.0, name
        assert r["p50_ms"] > 0 and r["throughput"] > 0 and r["best_mode"] == "eager", name
        folder = root / (f"variants/{name}" if name in NAMES else name)
        assert r["size_bytes"] == (folder / "model.safetensors").stat().st_size, name
    assert {records[n]["role"] for n in NAMES} == {"variant"} and records["teacher"]["parent"] is None
    assert report["settings"]["latency_runs"] == 20 and report["settings"]["modes"] == ["eager"]
    assert report["floor"] == pytest.approx(records["teacher"]["val_accuracy"] - 0.01)  # chosen on validation
    assert report["chosen_on"] == "validation"
    rec = report["recommended"]
    if rec is not None:
        best = records[rec["name"]]
        assert best["val_accuracy"] >= report["floor"] and not best["not_faster"]
        assert rec["val_accuracy"] == best["val_accuracy"] and "Chosen on validation." in rec["reason"]
    rows = list(csv.DictReader(io.StringIO((root / "frontier.csv").read_text())))
    assert [row["name"] for row in rows] == [*BASES, *NAMES]
    md = (root / "frontier.md").read_text()
    assert all(f"| {name} |" in md for name in records)


def test_variants_are_saved_reloadable_and_scored_as_saved(run):
    _, root, _ = run
    records = {r["name"]: r for r in _frontier(root)["variants"]}
    test_split = data.load_split(root / "data", "test")
    formats = {"sparse": "dense", "slim": "dense", "q8": "pt2e", "w4": "torchao", "dyn": "torchao"}
    for name in NAMES:
        folder = root / "variants" / name
        assert sorted(p.name for p in folder.iterdir()) == ["arch.json", "metrics.json", "model.safetensors",
                                                            "recipe.json"], name
        recipe = json.loads((folder / "recipe.json").read_text())  # how the weights beside it were made
        assert recipe["name"] == name and recipe["parent"] == records[name]["parent"], name
        assert " -> ".join([recipe["parent"], *(step["kind"] for step in recipe["steps"])]) \
            == re.sub(r"\([^)]*\)", "", records[name]["recipe"]), name
        model, arch = artifacts.load(folder)
        assert arch["format"] == formats[name], name
        metrics = json.loads((folder / "metrics.json").read_text())
        # the reported accuracy is that of the model on disk
        assert evaluate(model, batches(*test_split, 1024))["accuracy"] == metrics["test_accuracy"] \
            == records[name]["test_accuracy"], name


def test_each_recipe_did_what_it_says(run):
    _, root, _ = run
    records = {r["name"]: r for r in _frontier(root)["variants"]}
    steps = {name: json.loads((root / "variants" / name / "metrics.json").read_text())["steps"]
             for name in NAMES}

    assert steps["q8"][-1]["kind"] == "int8_static" and steps["q8"][-1]["method"] == "qat"
    assert steps["q8"][-1]["qat_epochs"] == 1
    assert json.loads((root / "variants/q8/arch.json").read_text())["quant"]["qat"] is True

    assert steps["sparse"][0] == {"kind": "prune_unstructured", "gradual": True}
    layers = steps["sparse"][1]["layers"]
    assert set(layers) == {"conv1", "conv2", "fc1", "fc2"}
    total = sum(v["weights"] for v in layers.values())
    assert sum(v["weights"] * v["sparsity"] for v in layers.values()) / total == pytest.approx(0.5, abs=1e-3)
    arch = json.loads((root / "variants/sparse/arch.json").read_text())
    assert arch["format"] == "dense" and arch["sparse"]  # stored as mask + values
    model, _ = artifacts.load(root / "variants" / "sparse")
    zeros = sum(int((m.weight == 0).sum()) for m in (model.conv1, model.conv2, model.fc1, model.fc2))
    assert abs(zeros - 0.5 * total) <= 1  # fine-tuning kept the pruned weights at zero

    assert steps["slim"][0]["kind"] == "prune_channels" and steps["slim"][0]["mac_ratio"] >= 1.5
    assert records["slim"]["params"] < records["student"]["params"]
    assert records["slim"]["macs"] * 1.5 <= records["student"]["macs"]
    assert json.loads((root / "variants/slim/arch.json").read_text())["layers"]  # resized layers recorded

    assert records["w4"]["size_bytes"] < records["student"]["size_bytes"]


def test_manifest_records_the_stage_and_its_files(run):
    _, root, _ = run
    manifest = json.loads((root / "manifest.json").read_text())
    stage = manifest["stages"]["compress"]
    assert stage["status"] == "done" and stage["metrics"]["variants"] == len(NAMES)
    expected = {f"frontier.{ext}" for ext in ("json", "csv", "md", "png")} | {
        f"variants/{name}/{f}" for name in NAMES for f in ("arch.json", "model.safetensors", "metrics.json")}
    assert expected <= set(stage["files"])
    for rel in stage["files"]:
        assert manifest["files"][rel] == sha256_file(root / rel), rel
    assert stage["metrics"]["recommended"] == (_frontier(root)["recommended"] or {}).get("name")


def test_rerun_is_a_no_op(run):
    storage, root, _ = run
    before = {p: p.stat().st_mtime_ns for p in root.glob("frontier.*")}
    rc, out, err = _main(storage, "run", "--set", VARIANTS)
    assert rc == 0, err
    assert "[compress] done already" in out and out.count("done already") == 7
    assert "[compress] running" not in out
    assert {p: p.stat().st_mtime_ns for p in root.glob("frontier.*")} == before


def test_a_recipe_naming_an_unknown_layer_is_refused_before_any_work(run, tmp_path):
    storage = tmp_path / "runs"
    shutil.copytree(run[0], storage)  # a copy: this test changes the manifest
    root = storage / "tiny"
    frontier = (root / "frontier.json").read_bytes()
    bad = "compress.variants=[{name: bad, steps: [{kind: prune_unstructured, sparsity: 0.5, " \
          "exclude: [nope]}]}]"
    rc, out, err = _main(storage, "compress", "--set", bad)
    assert rc == 2
    assert "compress.variants.bad: prune_unstructured.exclude: no conv/linear layer named nope" in err
    assert "conv1, conv2, fc1, fc2" in err and "Traceback" not in err
    assert (root / "frontier.json").read_bytes() == frontier
    assert not (root / "variants" / "bad").exists()
    assert not list(root.rglob("*.tmp"))
    # The recipe is refused before the stage starts: its record stays done, its files verify,
    # and the original config is still a no-op.
    manifest = json.loads((root / "manifest.json").read_text())
    stage = manifest["stages"]["compress"]
    assert stage["status"] == "done"
    for rel in stage["files"]:
        assert manifest["files"][rel] == sha256_file(root / rel), rel
    rc, out, _ = _main(storage, "compress", "--set", VARIANTS)
    assert rc == 0 and "[compress] done already" in out


# --- the finished run as Serve configs (no deployment needed) ---------------------------------

def test_generated_serve_config_names_every_application(run, tmp_path):
    _, run_dir, _ = run
    out = tmp_path / "config.yaml"
    assert main(["serve", "build", str(run_dir), "-o", str(out)]) == 0
    doc = yaml.safe_load(out.read_text())
    names = [m.name for m in catalog(run_dir)]
    assert [a["name"] for a in doc["applications"]] == [*names, "auto", "server", "grpc"]
    assert {a["import_path"] for a in doc["applications"]} == {"serve.app:build_app"}
    assert doc["http_options"]["host"] == "127.0.0.1"
    assert doc["grpc_options"]["port"] == 8001 and doc["grpc_options"]["grpc_servicer_functions"] == [
        "tritonclient.grpc.service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server"]
    model_app = doc["applications"][0]
    assert model_app["route_prefix"] == f"/v2/models/{names[0]}" and model_app["args"]["kind"] == "model"


def test_serve_env_prints_the_ingress_environment_for_serve_run(run, capsys):
    _, run_dir, _ = run
    assert main(["serve", "env", str(run_dir)]) == 0
    env = dict(line.removeprefix("export ").split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["DISTILLERY_SERVE_HOST"] == "127.0.0.1"
    assert env["DISTILLERY_HAPROXY_STATS_HOST"] == "127.0.0.1"
    assert env["RAY_SERVE_HAPROXY_BINARY_PATH"].endswith("distillery-haproxy")
    assert main(["serve", "env", str(run_dir), "--set", "serve.ingress=proxy"]) == 0
    assert "RAY_SERVE_ENABLE_HA_PROXY=0" in capsys.readouterr().out


# --- the finished run served: `distillery serve` as quiet as `run` ----------------------------

def test_serve_prints_its_own_few_lines_and_sends_ray_s_to_the_run_s_log(run):
    _, run_dir, _ = run
    port = free_port()
    serve = subprocess.Popen([str(Path(sys.executable).parent / "distillery"), "serve", str(run_dir),
                              "--set", f"serve.port={port}", "--set", f"serve.grpc_port={free_port()}",
                              "--set", "serve.auto=false"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(serve.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 240
        while not any(line.startswith("serving http") for line in lines):
            assert serve.poll() is None and time.time() < deadline, "".join(lines)
            time.sleep(0.5)
    finally:
        serve.send_signal(signal.SIGINT)  # ours, by process id: it takes its deployments and Ray down
        serve.wait(timeout=120)
        reader.join(timeout=10)
    out = "".join(lines)
    shown = [line for line in out.splitlines() if line.strip()]
    assert shown[0].startswith("logs: ") and shown[-1].startswith(f"serving http://127.0.0.1:{port}/v2"), out
    strays = [line for line in shown if not line.startswith(("logs: ", "[serve] ", "serving ", "  "))]
    assert not strays, out  # no line of Ray's, Serve's or a library's
    assert len(shown) <= 6, out
    log = (run_dir / "logs" / "serve.log").read_text()
    assert "[serve] running in" in log  # ours, and Ray's and Serve's own:
    assert re.search(r"^\S+ \S+ ray[\w.]* (INFO|WARNING|ERROR) ", log, re.M), log[-3000:]
