import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from distillery.config import load_config

ROOT = Path(__file__).resolve().parents[1]
# Helpers moved out of the test modules keep their asserts' detail: pytest rewrites these as it
# does the tests (a failure shows the values compared).
pytest.register_assert_rewrite("serving_helpers", "rig_helpers")


def pytest_collection_modifyitems(items):
    """Everything under tests/integration/ is marked `integration` (real Ray, HTTP servers,
    process groups): `-m "not integration"` or `pytest tests/unit` is the fast tier."""
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The tiny preset run once for the session, in this process and without serving
    (`ray.workers=0`, `serve.enabled=false`): tests that serve or load it take their own copy
    (`copy_run`), a finished run where nothing is redone."""
    from distillery.cli.main import main

    storage = tmp_path_factory.mktemp("tiny-run") / "runs"
    assert main(["run", "--config", str(ROOT / "configs" / "tiny.yaml"), "--set", f"storage_path={storage}",
                 "--set", "ray.workers=0", "--set", "serve.enabled=false"]) == 0
    return storage / "tiny"


def copy_run(run_dir: Path, folder: Path) -> Path:
    """A copy of the run `run_dir` in `folder` (its files are where its manifest says, relative
    to the copy), so what one test module writes into it no other sees."""
    shutil.copytree(run_dir, folder / run_dir.name)
    return folder / run_dir.name


@pytest.fixture
def tiny_cfg(tmp_path):
    """The tiny preset, writing its run directory under tmp_path."""
    return load_config(ROOT / "configs" / "tiny.yaml", [f"storage_path={tmp_path / 'runs'}"])


@contextlib.contextmanager
def _object_store(cmd: list[str], env: dict[str, str], url: str, log: Path):
    """Run a storage server on 127.0.0.1 until it answers `url`, with `env` set in this
    process (for pyarrow and the clients here; subprocesses get it from os.environ)."""
    server = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    saved = {k: os.environ.get(k) for k in env}
    try:
        for _ in range(150):
            assert server.poll() is None, log.read_text()
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except urllib.error.HTTPError:  # it answers
                break
            except OSError:
                time.sleep(0.2)
        os.environ.update(env)
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """An S3-compatible server on 127.0.0.1 (moto's, a real HTTP server speaking the S3 API):
    yields the environment a client needs to reach it (endpoint, throwaway credentials).
    Every test makes its own bucket with `make_bucket`."""
    port = free_port()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    with _object_store([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env,
                       env["AWS_ENDPOINT_URL"], tmp_path_factory.mktemp("moto") / "moto.log") as env:
        yield env


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """A GCS emulator on 127.0.0.1 (gcp-storage-emulator: a real HTTP server speaking GCS's
    JSON API), found through STORAGE_EMULATOR_HOST as Google's clients find one. Buckets:
    `make_bucket(name, "gs")`."""
    port = free_port()
    env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}"}
    cmd = [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port),
           "--in-memory"]
    with _object_store(cmd, env, f"{env['STORAGE_EMULATOR_HOST']}/storage/v1/b",
                       tmp_path_factory.mktemp("gcs") / "gcs.log") as env:
        yield env


STORE_SERVERS = {"s3": "s3_server", "gs": "gcs_server"}  # scheme -> the fixture serving it


def make_bucket(name: str, scheme: str = "s3") -> str:
    """A new empty bucket on `s3_server` (or `gcs_server` for "gs"); returns its URI."""
    if scheme == "gs":
        request = urllib.request.Request(f"{os.environ['STORAGE_EMULATOR_HOST']}/storage/v1/b?project=test",
                                         data=json.dumps({"name": name}).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10)
        return f"gs://{name}"
    import boto3

    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"
