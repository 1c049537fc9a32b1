"""The README's main job, run as a user runs it: `distillery run --no-keep-serving`, timed.

    python benchmarks/default_run.py            # 7-10 minutes on 2 cores
    python benchmarks/default_run.py --read RUN_DIR   # read back a finished run (a check of this script)

The job runs from a snapshot of HEAD (a git worktree in a temp folder, this checkout's .venv
linked into it), so edits made to the tree during the run cannot change what is measured; its
storage is a temp folder, so every stage runs fresh. Records the console's lines, the wall time
and the time to the serving URL, and from the run directory each model's test accuracy with its
95% interval, size and speed, the recommended model and the served requests/s; copies the
frontier plot to docs/assets/frontier.png.
Writes benchmarks/results/default_run_<machine>_<date>.json (--read: results/quick/).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, read_json, write_result

from distillery.measure.accuracy import interval

FRONTIER_PNG = ROOT / "docs" / "assets" / "frontier.png"
URL_LINE = re.compile(r"\[serve\] running in .*?(http://\S+?);?(\s|$)")


def run_job(tree: Path, storage: Path) -> dict[str, Any]:
    """Run the job from `tree` with its storage at `storage`; the console's lines as they came,
    with their seconds since the start, the wall time and the time to the serving URL."""
    command = [sys.executable, "-m", "distillery.cli.main", "run", "--no-keep-serving",
               "--set", f"storage_path={storage}"]
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}  # the snapshot's code, not the editable install's
    start = time.perf_counter()
    lines, to_url = [], None
    with subprocess.Popen(command, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as job:
        for line in job.stdout:
            elapsed = time.perf_counter() - start
            print(line, end="", flush=True)
            lines.append(f"{elapsed:6.1f} s  {line.rstrip()}")
            if to_url is None and URL_LINE.search(line):
                to_url = elapsed
    wall = time.perf_counter() - start
    return {"command": "distillery run --no-keep-serving --set storage_path=<temp folder>",
            "exit_code": job.returncode, "wall_s": round(wall, 1),
            "to_url_s": None if to_url is None else round(to_url, 1), "console": lines}


def read_run(run_dir: Path) -> dict[str, Any]:
    """What the run directory says: each model's test accuracy (95% Wilson interval), size and
    speed from frontier.json; the recommendation; stage times; served requests/s."""
    frontier = read_json(run_dir / "frontier.json")
    keep = ("role", "test_accuracy", "test_images", "val_accuracy", "params", "macs", "size_bytes", "p50_ms",
            "throughput")
    models = {v["name"]: {k: v[k] for k in keep} | {
        "mode": v["best_mode"], "interval": list(interval(v["test_accuracy"], v["test_images"]))}
        for v in frontier["variants"]}
    out = {"run_name": run_dir.name, "models": models, "recommended": frontier["recommended"],
           "distillation": read_json(run_dir / "results.json")["distillation"],
           "stages_s": {name: s["metrics"]["seconds"] for name, s in read_json(run_dir / "manifest.json")
                        ["stages"].items() if "seconds" in s.get("metrics", {})}}
    loadtest = run_dir / "serve" / "loadtest" / "loadtest.json"
    if loadtest.is_file():
        sweeps = read_json(loadtest)["sweeps"]
        out["served_c32"] = {s["model"]: s["throughput"] for s in sweeps if s["concurrency"] == 32}
    return out


def in_snapshot(measure) -> Any:
    """`measure(tree)` with `tree` a worktree of HEAD (the .venv linked in), removed afterwards."""
    tree = Path(tempfile.mkdtemp(prefix="wt-default-")) / "tree"
    subprocess.run(["git", "worktree", "add", "-f", "--detach", str(tree), "HEAD"], cwd=ROOT, check=True)
    try:
        (tree / ".venv").symlink_to(ROOT / ".venv")
        return measure(tree)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
        shutil.rmtree(tree.parent, ignore_errors=True)


def measure(tree: Path) -> Path:
    with tempfile.TemporaryDirectory(prefix="default-run-") as storage:
        job = run_job(tree, Path(storage))
        run_dir = Path(storage) / "digits"
        if job["exit_code"] != 0:  # keep the run's logs: the temp folders go when this returns
            logs = shutil.copytree(run_dir / "logs", tempfile.mkdtemp(prefix="default-run-logs-"),
                                   dirs_exist_ok=True)
            sys.exit(f"default_run: the job failed (exit code {job['exit_code']}); its logs: {logs}")
        figures = job | read_run(run_dir)
        FRONTIER_PNG.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / "frontier.png", FRONTIER_PNG)
        # The commit is the snapshot's: the measured code is HEAD as it was, whatever the tree holds now.
        return write_result("default_run", figures, quick=False, root=tree)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--read", type=Path, metavar="RUN_DIR",
                        help="read back a finished run instead (no timing): a check of this script")
    args = parser.parse_args()
    if args.read:
        untimed = {"wall_s": None, "to_url_s": None, "console": []}
        path = write_result("default_run", untimed | read_run(args.read), quick=True)
    else:
        path = in_snapshot(measure)
    print(f"figures: {path}")


if __name__ == "__main__":
    main()
