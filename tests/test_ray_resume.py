"""Kill the driver mid-run; the same command resumes from the last registered checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from test_ray_train import _registered_epoch

pytestmark = pytest.mark.integration


def _train(tmp_path):
    cmd = [sys.executable, "-m", "distillery.cli", "train", "--model", "teacher", "--config",
           str(ROOT / "configs" / "tiny.yaml"), "--set", f"storage_path={tmp_path}", "--set", "teacher.train.epochs=12"]
    # A session of its own, so killing it takes its local Ray instance down too.
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_killed_driver_resumes_with_the_same_command(tmp_path):
    root = tmp_path / "tiny"
    first = _train(tmp_path)
    deadline = time.time() + 240
    while _registered_epoch(root) < 2 and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, "the first run ended before two checkpoints were registered"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["stages"]["teacher"]["status"] == "running"  # it died mid-stage

    second = _train(tmp_path)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out[-3000:]
    history = json.loads((root / "teacher" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == list(range(1, 13))
    assert any(h.get("resumed_from", 0) >= 2 for h in history), "the second run started from scratch"
    assert len(list((root / "ray").glob("teacher-*"))) == 1  # the same Ray Train run, resumed
