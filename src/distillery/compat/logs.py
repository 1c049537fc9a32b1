"""Ray's and Ray Train's own console output, sent where a distillery run wants it (written
against Ray 2.60): Ray Train's chatty loggers quietened, the raylet's messages to a driver
sent to the run's log, and the run's log folder linked to Ray's session logs.

No public API serves: Ray Train names its context logger by file path, the raylet's messages
are printed straight to stdout past `log_to_driver`, and a session's log folder is known only
to Ray's private node object.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import ray

# Ray Train's context logger is named by its file's path, not its module name. Importing the
# module to read that path costs a second (it imports Ray Data); the path is known.
TRAIN_CONTEXT_LOGGER = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution",
                                    "context.py")
PLACEMENT_GROUP_CLEANER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_ray_train_logs() -> None:
    """Drop Ray Train's per-report INFO line and, without the dashboard's state API, the
    placement-group cleaner's warning every few seconds; both would bury the epoch lines.
    Other Ray Train warnings still show."""
    logging.getLogger(TRAIN_CONTEXT_LOGGER).setLevel(logging.WARNING)
    logging.getLogger(PLACEMENT_GROUP_CLEANER).setLevel(logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # "dataset execution finished" for every epoch


def route_raylet_messages(to: Callable[[str], None]) -> None:
    """What the raylet reports to a driver ("N worker processes have been started", a task
    retried at shutdown) Ray prints straight to stdout, past `log_to_driver`: to `to` instead,
    one line at a time. Ray's listener thread looks the printer up at each call."""
    from ray._private import worker

    def printer(data: dict, ignore_prefix: bool) -> None:
        for line in data.get("lines", []):
            to(f"({data.get('pid', 'ray')}) {line}")

    worker.print_to_stdstream = printer


def session_logs() -> Path | None:
    """This Ray session's log folder on this node (workers, replicas, the raylet; Serve's
    replica logs under serve/); None when this process started or joined no Ray node."""
    node = getattr(ray._private.worker.global_worker, "node", None)
    return Path(node.get_logs_dir_path()) if node is not None else None


def link_session_logs(link: Path) -> None:
    """`link` -> this Ray session's log folder, which Ray keeps in its session folder on this node."""
    target = session_logs()
    if target is None:
        return
    with contextlib.suppress(OSError):
        link.unlink(missing_ok=True)
        link.symlink_to(target, target_is_directory=True)
