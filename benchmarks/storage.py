"""What a run at an object-store URI costs against a local folder: the digits pipeline (Ray
Train with 2 workers, compression; serving left out) run fresh twice, once with
`storage_path` a local folder and once at s3:// on moto's S3 server on 127.0.0.1, then each
re-run from a driver with nothing local (the URI run's cache emptied) to see every stage
found done. Loopback S3 measures distillery's own extra work (uploads, downloads, sha256
checks, Ray Train checkpoints through S3), not a real network's bandwidth or latency.
Writes benchmarks/results/storage_<machine>_<date>.json.

    python benchmarks/storage.py
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import PRESET, ROOT, machine, machine_lines, publish, read_json, table

STAGES = ["data", "teacher", "student_scratch", "student", "evaluate", "compress", "report"]


def moto(port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}", timeout=1)
            return server
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("moto's S3 server did not start")


def pipeline(storage: str, env: dict[str, str]) -> tuple[float, int]:
    """One `distillery run` of the digits preset without serving: (wall seconds, stages it
    found done already)."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "distillery.cli.main", "run", "--config", str(PRESET),
                          "--set", f"storage_path={storage}", "--set", "serve.enabled=false"],
                         env=env, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - start, out.count("done already")


def stage_seconds(manifest: Path) -> dict[str, float]:
    stages = read_json(manifest)["stages"]
    return {name: stages[name]["metrics"]["seconds"] for name in STAGES}


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = Path(tempfile.mkdtemp(prefix="distillery-storage-"))
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "DISTILLERY_CACHE": str(tmp / "cache")}
    server = moto(port)
    try:
        os.environ.update(env)
        import boto3

        boto3.client("s3").create_bucket(Bucket="bench")
        runs = {}
        places = (("local folder", str(tmp / "runs")), ("s3:// (moto, loopback)", "s3://bench/runs"))
        for kind, storage in places:
            fresh, _ = pipeline(storage, env)
            local = (tmp / "runs" / "digits" if kind == "local folder"
                     else tmp / "cache" / "s3" / "bench" / "runs" / "digits")
            seconds = stage_seconds(local / "manifest.json")
            if kind != "local folder":
                shutil.rmtree(tmp / "cache")  # a driver with nothing local
            rerun, skipped = pipeline(storage, env)
            assert skipped == len(STAGES), f"{kind}: the re-run found {skipped} of {len(STAGES)} stages done"
            student = read_json(local / "results.json")["models"]["student"]
            runs[kind] = {"fresh_s": round(fresh, 1), "rerun_s": round(rerun, 1), "stages_s": seconds,
                          "test_accuracy": student["test_accuracy"]}
        pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket="bench")
        stored = sum(o["Size"] for page in pages for o in page.get("Contents", []))
    finally:
        server.terminate()
    info = machine("1 (cpus_per_worker 1)")
    rows = [[kind, r["fresh_s"], *(r["stages_s"][s] for s in STAGES), r["rerun_s"],
             f"{r['test_accuracy']:.2%}"] for kind, r in runs.items()]
    report = "\n".join([
        "digits pipeline without serving, one run each, fresh run directory (seconds):", "",
        table(["storage_path", "fresh run", *STAGES, "re-run (all done)", "student test acc"], rows), "",
        f"The bucket held {stored / 2**20:.1f} MiB after the runs (Ray Train checkpoints included).",
        "The s3:// re-run started from an empty cache (another driver): it downloads and checks the run.",
        machine_lines(info)])
    publish("storage", report, {"machine": info, "runs": runs, "bucket_mib": round(stored / 2**20, 1)},
            quick=False)


if __name__ == "__main__":
    main()
