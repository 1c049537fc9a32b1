"""The RAY_* switches distillery sets beyond the ingress's (`compat.ingress`), each read by
Ray 2.60 from the environment of the process that starts Ray, Ray Train or Tune; no public
API takes them. `tests/unit/compat` checks Ray still reads every one, and that no other
module of the package names a RAY_* variable.
"""

from __future__ import annotations

import os
import sys


def fast_train_reports() -> None:
    """Ray Train's controller takes one report per poll of its workers (every 2 s by default)
    and a worker's next report waits for that: on small data that wait, not training, set
    the epoch time (2.0 s per epoch against 0.2 s of work on digits). 0.05 s against 0.2 s
    took a 15-epoch tiny fit from 49-53 s to 43 s (2 runs each). Read by the controller
    and its workers from this process's environment; an explicit setting wins."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.05")


def no_preemption_watcher() -> None:
    """No node of a local instance is ever preempted: no watcher actor per training run (a
    process, and an error line about its arguments from Ray 2.60's core worker)."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def legacy_tune_output() -> None:
    """Tune's new console output prints its experiment table whatever `verbose` says; the
    legacy reporter at verbose=0 prints nothing. The search's own lines say what is going on."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def ask_for_token_auth(address: str | None) -> None:
    """A local Ray instance with token authentication asked for, as Ray 2.60 would turn it on
    by default anyway, but without its console warning that it did. Only before Ray is
    imported: it reads the mode once."""
    if not (address or os.environ.get("RAY_ADDRESS")) and "ray" not in sys.modules:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
