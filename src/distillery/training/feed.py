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
from pathlib import Path
from typing import Callable, Iterator

import ray.train


class EpochFeed(ray.train.UserCallback):
    """Runs in Ray Train's controller, which Ray places on the driver's node: appends each
    epoch's metrics, as rank 0 reported them, to a file the driver follows (`following`).
    The workers may be on other nodes, and their own output goes to Ray's log files."""

    def __init__(self, path: Path):
        self.path = path

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics[0]) + "\n")


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
        return [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True) if line.endswith("\n")]
    except FileNotFoundError:
        return []

