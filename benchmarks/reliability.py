"""Training under faults, on the digits teacher (Ray Train, 2 DDP workers, seed 0):

  undisturbed     the stage run to the end
  worker killed   SIGKILL one Ray Train worker once a few checkpoints are registered; Ray
                  restarts the group from the last registered checkpoint
  driver killed   SIGKILL the whole `distillery train` process group at the same point, then
                  run the same command again

For each: test accuracy, the epoch the run resumed from against the last checkpoint registered
when it was killed (the epochs of work redone), and wall time.
Writes benchmarks/results/reliability_<machine>_<date>.json.

    python benchmarks/reliability.py [--kill-after 5]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import PRESET, machine, machine_lines, publish, table

WHICH = "teacher"


def start(storage: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "distillery.cli.main", "train", "--model", WHICH, "--config", str(PRESET),
           "--set", f"storage_path={storage}"]
    # Its own session: killing the group takes its local Ray instance down too (a dead driver).
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def registered_epoch(root: Path) -> int:
    """The epoch of Ray Train's latest registered checkpoint (its own snapshot file)."""
    for snapshot in root.glob(f"ray/{WHICH}-*/checkpoint_manager_snapshot.json"):
        try:
            return (json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}).get(
                "metrics", {}).get("epoch", 0)
        except (json.JSONDecodeError, OSError):  # being rewritten
            return 0
    return 0


def worker_pids(root_pid: int) -> list[int]:
    """Ray Train workers descending from `root_pid` (not another Ray instance's)."""
    rows = [r.split(None, 2) for r in subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True,
                                                       text=True).stdout.splitlines()]
    parent = {int(pid): int(ppid) for pid, ppid, *_ in rows}
    mine, new = set(), {root_pid}
    while new:
        mine |= new
        new = {pid for pid, ppid in parent.items() if ppid in mine} - mine
    return [int(r[0]) for r in rows if len(r) > 2 and "RayTrainWorker" in r[2] and int(r[0]) in mine]


def wait_for_epoch(proc: subprocess.Popen, root: Path, epoch: int) -> int:
    while proc.poll() is None:
        if (seen := registered_epoch(root)) >= epoch:
            return seen
        time.sleep(0.05)
    raise RuntimeError("the stage ended before the fault could be injected")


def outcome(root: Path, killed_at: int | None, seconds: float) -> dict:
    metrics = json.loads((root / WHICH / "metrics.json").read_text())
    resumed = [h["resumed_from"] for h in metrics["history"] if "resumed_from" in h]
    return {"test_accuracy": metrics["test_accuracy"], "epochs": len(metrics["history"]),
            "killed_after_checkpoint": killed_at, "resumed_from": resumed[0] if resumed else None,
            "finished_epochs_redone": (killed_at - resumed[0]) if resumed and killed_at else 0,
            "seconds": round(seconds, 1)}


def undisturbed(storage: Path, _: int) -> dict:
    t0 = time.perf_counter()
    proc = start(storage)
    assert proc.wait() == 0
    return outcome(storage / "digits", None, time.perf_counter() - t0)


def worker_killed(storage: Path, after: int) -> dict:
    t0 = time.perf_counter()
    proc = start(storage)
    killed_at = wait_for_epoch(proc, storage / "digits", after)
    os.kill(worker_pids(proc.pid)[-1], signal.SIGKILL)
    assert proc.wait() == 0, "the stage did not survive a killed worker"
    return outcome(storage / "digits", killed_at, time.perf_counter() - t0)


def driver_killed(storage: Path, after: int) -> dict:
    t0 = time.perf_counter()
    proc = start(storage)
    killed_at = wait_for_epoch(proc, storage / "digits", after)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    again = start(storage)  # the same command
    assert again.wait() == 0, "the same command did not resume"
    return outcome(storage / "digits", killed_at, time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill-after", type=int, default=5, help="registered checkpoints before the fault")
    args = parser.parse_args()
    rows = {}
    for name, scenario in (("undisturbed", undisturbed), ("worker killed", worker_killed),
                           ("driver killed", driver_killed)):
        with tempfile.TemporaryDirectory() as tmp:
            rows[name] = scenario(Path(tmp), args.kill_after)
        print(f"{name}: {rows[name]}", flush=True)
    base = rows["undisturbed"]["test_accuracy"]
    info = machine("1 (one Ray Train worker per core)")
    report = table(["run", "test acc", "vs undisturbed", "killed after epoch", "resumed from",
                    "finished epochs redone", "wall s"],
                   [[name, f"{r['test_accuracy']:.2%}", f"{100 * (r['test_accuracy'] - base):+.2f} pt",
                     r["killed_after_checkpoint"] or "-", r["resumed_from"] or "-",
                     r["finished_epochs_redone"], r["seconds"]] for name, r in rows.items()])
    publish("reliability", report + "\n\n" + machine_lines(info),
            {"machine": info, "which": WHICH, "runs": rows}, quick=False)

if __name__ == "__main__":
    main()
