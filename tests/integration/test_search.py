"""The search on a real local Ray (Ray Tune, one process per trial), end to end through the
CLI on the tiny preset: trials run, ASHA stops some early, a trial that fails is recorded
with its reason, the best within the budget is chosen on validation, saved, put on the run's
frontier and in what is served; a budget nothing meets ends with a message naming the
closest model; running the search again resumes Tune's experiment instead of training anew."""

import json

import pytest
import ray
from conftest import ROOT, make_bucket

from distillery.cli.main import main
from distillery.config.search import BudgetConfig
from distillery.run import storage
from distillery.search.budget import bounds, misses
from distillery.serving.predictor import catalog

TINY = str(ROOT / "configs" / "tiny.yaml")
# 10 trials, 8 or 16 epochs, judged at 25% and 50% of their schedule (the top half go on); the last
# recipe asks the students for more channels than they have: the trials that draw it fail at once.
SEARCH = ["search.trials=10", "search.space.epochs=[8,16]", "search.grace_percent=25", "search.reports=8",
          "search.reduction_factor=2",
          "search.space.width_mult=[0.25,0.5]", "search.space.temperature=[1.0,4.0]",
          "search.space.recipe=[[], [{kind: int8_static, calibration_samples: 64}], "
          "[{kind: prune_channels, mac_ratio: 40.0, round_to: 8}, {kind: finetune, epochs: 1}]]",
          "compress.bench.latency_runs=50",
          # Size, unlike speed, is exact, and every student here is within 60 KiB (53 at most): which trials
          # finish depends on the order they reach a rung; the budget's exclusions are unit-tested.
          "search.budget.as_fast_as=null", "search.budget.max_size_kib=60"]


def _main(tmp_path, *args, search=SEARCH):
    sets = [f"storage_path={tmp_path / 'runs'}", "ray.workers=0", "serve.enabled=false", *search]
    return main([*args, "--config", TINY, *(x for s in sets for x in ("--set", s))])


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """`distillery search` once, then again with a budget nothing meets (resumed), then
    `distillery run` with the search on. Yields (run dir, [stdout, stderr] of each)."""
    tmp = tmp_path_factory.mktemp("search")
    capture = pytest.MonkeyPatch()
    outputs = []
    try:
        import io
        import sys
        for args, extra in ((["search"], []), (["search", "--max-p50-ms", "0.000001"], []),
                            (["run"], ["search.enabled=true"])):
            out, err = io.StringIO(), io.StringIO()
            capture.setattr(sys, "stdout", out)
            capture.setattr(sys, "stderr", err)
            code = _main(tmp, *args, search=SEARCH + extra)
            capture.undo()
            outputs.append((code, out.getvalue(), err.getvalue()))
        yield tmp / "runs" / "tiny", outputs
    finally:
        capture.undo()
        ray.shutdown()


def _trials(root):
    return json.loads((root / "search" / "trials.json").read_text())


def test_trials_run_some_stop_early_and_a_failing_one_is_recorded_with_its_reason(searched):
    root, outputs = searched
    code, out, err = outputs[0]
    assert code == 0, err
    found = _trials(root)
    statuses = [t["status"] for t in found["trials"]]
    assert len(statuses) == 10 and statuses.count("stopped early") >= 1 and statuses.count("completed") >= 1
    failed = [t for t in found["trials"] if t["status"] == "failed"]
    assert failed and all(t["settings"]["recipe"] == 2 and "mac_ratio" in t["error"] for t in failed)
    assert all(t["status"] == "failed" for t in found["trials"] if t["settings"]["recipe"] == 2)
    s = found["summary"]
    assert s["epochs_run"] < s["epochs_full"] and s["trials"] == 10
    stopped = [t for t in found["trials"] if t["status"] == "stopped early"]
    assert all(t["epochs_run"] < t["settings"]["epochs"] for t in stopped)
    assert f"{s['completed']} completed, {s['stopped_early']} stopped early, {s['failed']} failed" in out


def test_the_best_within_the_budget_is_chosen_on_validation_and_saved(searched):
    root, _ = searched
    found = _trials(root)
    limits = bounds(BudgetConfig(as_fast_as=None, max_size_kib=60))
    within = [r for r in found["measured"] if not misses(r, limits)]
    best = max(r["val_accuracy"] for r in within)
    chosen = next(r for r in found["measured"] if r["name"] == found["chosen"])
    assert chosen in within and chosen["val_accuracy"] == best
    assert {r["name"] for r in found["measured"]} == {f"trial-{t['trial']}" for t in found["trials"]
                                                      if t["status"] == "completed"}
    saved = json.loads((root / "variants" / "searched" / "search.json").read_text())
    assert saved["trial"] == chosen["trial"] and (root / "variants" / "searched" / "arch.json").exists()
    text = (root / "search" / "frontier.md").read_text()
    assert "Chosen on the validation split" in text and f"Chosen: {chosen['name']}" in text
    assert (root / "search" / "frontier.png").read_bytes()[:4] == b"\x89PNG"


def test_a_budget_nothing_meets_names_the_closest_model_and_the_search_resumes(searched):
    root, outputs = searched
    code, out, err = outputs[1]
    assert code == 2
    assert "no model meets the budget (p50 at batch 1 <= 0.000 ms" in err and "the closest is trial-" in err
    assert "resuming the search" in out  # the same trials, from Tune's experiment state: no training again
    assert "Traceback" not in out + err


def test_run_puts_the_searched_model_on_the_frontier_and_serves_it(searched):
    root, outputs = searched
    code, out, err = outputs[2]
    assert code == 0, err
    front = json.loads((root / "frontier.json").read_text())
    record = next(r for r in front["variants"] if r["name"] == "searched")
    assert record["recipe"].startswith("searched: cnn x")
    assert "searched" in [m.name for m in catalog(root)]
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["stages"]["search"]["status"] == "done"
    assert "variants/searched/model.safetensors" in manifest["files"]
    report = (root / "report.md").read_text()
    assert "## Search under a budget" in report
    assert f"Chosen: {_trials(root)['chosen']}" in report


def test_a_search_at_a_uri_keeps_its_experiment_in_the_bucket_and_resumes_from_it(s3_server, tmp_path,
                                                                                   monkeypatch, capsys):
    ray.shutdown()  # a Ray started after the S3 server: its workers see the endpoint
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    uri = make_bucket("search")
    sets = [f"storage_path={uri}/runs", "ray.workers=0", "serve.enabled=false", "search.trials=3",
            "search.space.epochs=[4]", "search.space.recipe=[[]]", "search.budget.as_fast_as=null",
            "compress.bench.latency_runs=20"]
    args = ["search", "--config", TINY, *(x for s in sets for x in ("--set", s))]
    try:
        assert main(args) == 0
        keys = storage.list_files(f"{uri}/runs/tiny")
        assert any(k.startswith("search/search-") and "experiment_state" in k for k in keys)
        assert {"variants/searched/model.safetensors", "search/trials.json"} <= set(keys)
        capsys.readouterr()
        assert main([*args, "--max-size-kib", "1000"]) == 0  # a new budget: the same trials, from the bucket
        assert f"resuming the search in {uri}/runs/tiny/search/search-" in capsys.readouterr().out
    finally:
        ray.shutdown()
