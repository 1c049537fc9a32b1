"""Epochs from Ray Train to the driver, as they end: `EpochFeed` runs in Ray Train's
controller and appends each reported epoch to a file; `following` hands them to the driver's
`on_epoch` while `trainer.fit()` blocks. Its own light module: the controller unpickles the
callback, and so imports this module, in every training run.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import ray.train

from distillery.core import console


class EpochFeed(ray.train.UserCallback):
    """Runs in Ray Train's controller, which Ray places on the driver's node: appends each
    epoch's metrics, as rank 0 reported them, to a file the driver follows (`following`).
    The workers may be on other nodes, and their own output goes to Ray's log files."""

    def __init__(self, path: Path):
        self.path = path

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        self._append(metrics[0])

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        """A worker failed (its error, or its node gone): Ray Train restarts the group next."""
        self._append({FAILURE: sorted({one_line(e) for e in worker_exceptions.values()})})

    def _append(self, line: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")


FAILURE = "worker_failure"  # the key of a feed line that reports failed workers, not an epoch


def one_line(e: BaseException) -> str:
    """An error as one line: its type and the last line of its message (a worker's exception
    arrives wrapped, its traceback in the message)."""
    cause = getattr(e, "cause", None) or e
    lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"[:300]


def epochs_and_failures(label: str, max_failures: int, on_epoch: Callable[[dict], None],
                        restarts: dict[int, dict]) -> Callable[[dict], None]:
    """The feed's lines: epochs to `on_epoch`, the first epoch after a restart carrying the
    failures that caused it (`worker_failures`) and the last epoch reported before them
    (also kept in `restarts`, by epoch); each failure said on the console as it happens."""
    pending: list[str] = []
    last = 0  # the last epoch reported before a failure: what a restart may have to redo

    def on_line(line: dict) -> None:
        nonlocal last
        if FAILURE in line:
            pending.extend(line[FAILURE])
            console.say(f"[{label}] worker failure ({'; '.join(line[FAILURE])}): Ray Train restarts "
                        "the worker group from its last checkpoint (up to "
                        f"ray.max_failures={max_failures} times)")
            return
        if pending:
            restarts[line["epoch"]] = {"worker_failures": list(pending), "last_epoch_before": last}
            line |= restarts[line["epoch"]]
            pending.clear()
        last = line["epoch"]
        on_epoch(line)
    return on_line


@contextlib.contextmanager
def following(path: Path, on_epoch: Callable[[dict], None]) -> Iterator[None]:
    """Hand each line `EpochFeed` appends to `on_epoch`, from a thread, while the body runs."""
    done = threading.Event()

    def follow() -> None:
        seen, finished = 0, False
        while not finished:
            finished = done.wait(0.25)  # then one last read: the final epoch may have just arrived
            lines = _read_lines(path)
            for line in lines[seen:]:
                on_epoch(json.loads(line))
            seen = len(lines)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=5)
        shutil.rmtree(path.parent, ignore_errors=True)


def _read_lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                if line.endswith("\n")]
    except FileNotFoundError:
        return []

