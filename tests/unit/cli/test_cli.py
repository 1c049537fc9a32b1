"""The command line as a user meets it: help, one-line refusals with exit code 2, quick
commands (tests/integration/test_cli_runs.py runs the stages themselves)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from distillery.cli.main import main

TINY = str(ROOT / "configs" / "tiny.yaml")


def test_evaluate_before_training_says_what_to_do(tmp_path, capsys):
    assert main(["evaluate", "--config", TINY, "--set", f"storage_path={tmp_path / 'runs'}"]) == 2
    assert "run `distillery train`" in capsys.readouterr().err


def _cli(*args, cwd=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "distillery.cli.main", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=120)


def test_a_user_mistake_is_one_line_and_exit_2_in_a_fresh_process(tmp_path):
    """As a user sees it: nothing else on stderr, no import-time warning or traceback."""
    out = _cli("run", "--set", "teacher.train.epochs=-3", "--set", f"storage_path={tmp_path}", cwd=tmp_path)
    assert out.returncode == 2
    assert "teacher.train.epochs: Input should be greater than or equal to 1" in out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0


@pytest.mark.parametrize("args, message", [
    (["run", "--config", "no/such.yaml"], "config file not found: no/such.yaml"),
    (["data", "prepare", "cifar10", "--path", "/no/such/dir"], "/no/such/dir"),
    (["train", "--model", "student_scratch", "--set", "distill.baseline=false"],
     "this config trains no student_scratch (distill.baseline: false); set distill.baseline=true"),
])
def test_user_mistakes_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)  # in this process (a fresh one costs 3 s of imports; one test above does it)
    assert main([*args, "--set", f"storage_path={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.strip().count("\n") == 0


def test_unknown_dataset_is_refused(tmp_path):
    out = _cli("data", "prepare", "mnist")
    assert out.returncode == 2 and "invalid choice: 'mnist'" in out.stderr


@pytest.mark.parametrize("command", [[], ["data", "prepare"], ["train"], ["distill"], ["evaluate"], ["run"]])
def test_help(command):
    out = _cli(*command, "--help")
    assert out.returncode == 0 and "usage: distillery" in out.stdout


def test_data_prepare_command(tmp_path, capsys):
    assert main(["data", "prepare", "synthetic", "--set", f"storage_path={tmp_path}",
                 "--set", "data.num_samples=100", "--set", "name=syn"]) == 0
    data_manifest = json.loads((tmp_path / "syn" / "data" / "manifest.json").read_text())
    assert data_manifest["source"] == "synthetic"
    assert sum(c["total"] for c in data_manifest["counts"].values()) == 100


def test_serving_a_finished_run_may_name_another_cluster_but_not_retrain(tmp_path):
    """A run made on one cluster (its config records `ray.address`) served on another."""
    from distillery.cli.serve import _run_config
    from distillery.core.errors import UserError

    (tmp_path / "config.yaml").write_text((ROOT / "configs" / "tiny.yaml").read_text()
                                          + "ray: {address: 10.0.0.1:6379}\n")
    (tmp_path / "frontier.json").write_text("{}")
    _, cfg = _run_config(str(tmp_path), ["ray.address=127.0.0.1:7000", "serve.port=9000"])
    assert (cfg.ray.address, cfg.serve.port) == ("127.0.0.1:7000", 9000)
    with pytest.raises(UserError,
                       match="only serve.. settings, ray.address and ray.shared_filesystem can change"):
        _run_config(str(tmp_path), ["teacher.train.epochs=9"])


def test_search_flags_set_the_budget_and_a_wrong_one_is_one_line(tmp_path, capsys):
    from distillery.cli.main import build_parser, search_overrides
    from distillery.config import load_config

    args = build_parser().parse_args(["search", "--max-p50-ms", "2e-1", "--as-fast-as", "null",
                                      "--min-accuracy", "0.985", "--maximise", "throughput", "--trials", "6"])
    s = load_config(None, search_overrides(args)).search
    assert s.enabled and s.trials == 6
    assert (s.budget.max_p50_ms, s.budget.as_fast_as, s.budget.min_accuracy, s.budget.maximise) == \
        (0.2, None, 0.985, "throughput")
    code = main(["search", "--min-accuracy", "1.5", "--set", f"storage_path={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "search.budget.min_accuracy" in err and "Traceback" not in err


@pytest.mark.parametrize("flag, value, message", [
    ("--adaptive", "6:x", "--adaptive: expected SECONDS:LOAD"),
    ("--ramp", "0:1", "--ramp: seconds and rates must be positive"),
    ("--concurrency", "0,4", "--concurrency: expected integers >= 1"),
])
def test_a_wrong_load_test_flag_is_named(tmp_path, capsys, flag, value, message):
    assert main(["loadtest", "--run-dir", str(tmp_path), flag, value]) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0
