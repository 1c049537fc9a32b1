"""Kill the driver mid-run; the same command resumes from the last registered checkpoint,
with the run in a local folder or in a bucket (Ray Train's checkpoints then live there)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, STORE_SERVERS, make_bucket

from distillery.run import storage


def _train(storage_path, env):
    cmd = [sys.executable, "-m", "distillery.cli.main", "train", "--model", "teacher", "--config",
           str(ROOT / "configs" / "tiny.yaml"), "--set", f"storage_path={storage_path}",
           "--set", "teacher.train.epochs=12"]
    # A session of its own, so killing it takes its local Ray instance down too.
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=env)


def _read(location: str, rel: str) -> bytes | None:
    """A file of the run as it stands at its location (a folder or a bucket); None if absent."""
    fs, path = storage.filesystem(storage.join(location, rel))
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except (FileNotFoundError, OSError):
        return None


def registered_epoch(location: str) -> int:
    """The epoch of the latest checkpoint Ray Train has registered (its own snapshot file)."""
    for rel in storage.list_files(storage.join(location, "ray")):
        if rel.startswith("teacher-") and rel.endswith("/checkpoint_manager_snapshot.json"):
            try:
                snapshot = json.loads(_read(location, "ray/" + rel) or b"{}")
                latest = snapshot.get("latest_checkpoint_result") or {}
            except json.JSONDecodeError:  # being rewritten right now
                continue
            return latest.get("metrics", {}).get("epoch", 0)
    return 0


@pytest.fixture(params=["folder", "s3", "gs"])
def run_storage(request, tmp_path):
    """(storage_path, the run's location, environment for the command) in a folder or in an
    S3 or GCS bucket."""
    env = dict(os.environ)
    if request.param == "folder":
        return str(tmp_path), str(tmp_path / "tiny"), env
    server = request.getfixturevalue(STORE_SERVERS[request.param])
    env.update(server, DISTILLERY_CACHE=str(tmp_path / "cache"))
    bucket = make_bucket("resume", request.param)
    return f"{bucket}/runs", f"{bucket}/runs/tiny", env


def test_killed_driver_resumes_with_the_same_command(run_storage):
    storage_path, location, env = run_storage
    first = _train(storage_path, env)
    deadline = time.time() + 240
    while registered_epoch(location) < 2 and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, \
        "the first run ended before two checkpoints were registered: " + first.stdout.read()[-2000:]
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    manifest = json.loads(_read(location, "manifest.json"))
    assert manifest["stages"]["teacher"]["status"] == "running"  # it died mid-stage

    second = _train(storage_path, env)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out[-3000:]
    history = json.loads(_read(location, "teacher/metrics.json"))["history"]
    assert [h["epoch"] for h in history] == list(range(1, 13))
    assert any(h.get("resumed_from", 0) >= 2 for h in history), "the second run started from scratch"
    trial_runs = {rel.split("/")[0] for rel in storage.list_files(storage.join(location, "ray"))
                  if rel.startswith("teacher-")}
    assert len(trial_runs) == 1  # the same Ray Train run, resumed
