"""What to serve and how to run it: the catalog of a run's measured models and a plain
predictor. No Ray here: the benchmark, the tests and a Serve replica all
use the same `Predictor`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from distillery import artifacts
from distillery.core.errors import UserError
from distillery.core.files import read_json
from distillery.core.roles import SEARCHED, TRAINED
from distillery.measure import timing
from distillery.models.runner import SERVABLE_MODES, runner
from distillery.run import storage
from distillery.run.rundir import local_view


@dataclass(frozen=True)
class ServedModel:
    """One model as the frontier measured it, in the mode a replica runs it."""

    name: str
    folder: str          # a local (or shared) folder, or a URI
    in_shape: list[int]
    num_classes: int
    test_accuracy: float  # reported
    val_accuracy: float   # what choices read: the ladder of `auto`, a request's accuracy floor
    p50_ms: float        # batch 1, in `mode`, 1 thread, from the frontier
    mode: str
    recommended: bool = False
    files: dict[str, str] = field(default_factory=dict)  # at a URI: what to fetch, with sha256


def catalog(run_dir: str | Path, names: list[str] | None = None) -> list[ServedModel]:
    """The models to serve from a run's frontier: `names`, or by default the Pareto front and
    the recommended variant (and the searched one). Unknown names are refused, listing what the
    run has. A run at a URI is read from this node's copy of its manifest, frontier and arch
    files."""
    location = str(run_dir)
    run_dir, recorded = local_view(location, lambda rel: rel == "frontier.json" or rel.endswith("/arch.json"))
    front = read_json(run_dir / "frontier.json")
    records = {r["name"]: r for r in front["variants"]}
    recommended = (front.get("recommended") or {}).get("name")
    extra = records.keys() & {recommended, SEARCHED}  # a searched model is what its budget asked for
    wanted = names or sorted(set(front["pareto"]) | extra,
                             key=lambda n: records[n]["p50_ms"])
    unknown = [n for n in wanted if n not in records]
    if unknown:
        raise UserError(f"{run_dir}: no measured model named {', '.join(unknown)} (the run has "
                        f"{', '.join(records)})")
    return [_served(location, run_dir, recorded, records[n], n == recommended) for n in wanted]


def _served(location: str, run_dir: Path, recorded: dict[str, str], rec: dict,
            recommended: bool) -> ServedModel:
    rel = rec["name"] if rec["name"] in TRAINED else f"variants/{rec['name']}"
    arch = read_json(run_dir / rel / "arch.json")
    mode, p50 = _serving_mode(rec)
    files = {f.removeprefix(f"{rel}/"): sha for f, sha in recorded.items() if f.startswith(f"{rel}/")}
    folder = storage.join(location, rel) if storage.is_uri(location) else str(run_dir / rel)
    return ServedModel(rec["name"], folder, arch["spec"]["in_shape"], arch["spec"]["num_classes"],
                       rec["test_accuracy"], rec["val_accuracy"], p50, mode, recommended, files)


def _serving_mode(rec: dict) -> tuple[str, float]:
    """(mode, batch-1 p50) a replica runs `rec` in: its frontier figures' mode (serve what was
    measured). A frontier written before compiled modes stopped counting may name `compile`:
    then the best servable mode it timed, chosen as the compression stage now chooses."""
    if rec["best_mode"] in SERVABLE_MODES:
        return rec["best_mode"], rec["p50_ms"]
    timed = {m: f for m, f in rec["modes"].items() if "p50_ms" in f}
    mode, servable = timing.best_mode(timed) if timed else (rec["best_mode"], False)
    if not servable:
        raise UserError(f"{rec['name']}: measured only in {rec['best_mode']} mode, which a replica does not "
                        f"run ({' or '.join(SERVABLE_MODES)} failed); it cannot be served")
    return mode, timed[mode]["p50_ms"]


class Predictor:
    """A verified model (sha256 checked on load) run in its serving mode, one thread."""

    def __init__(self, served: ServedModel, threads: int = 1):

        torch.set_num_threads(threads)
        folder = storage.fetch(served.folder, served.files)  # a run at a URI: this node's copy
        model, _ = artifacts.load(folder)
        self.served, self._run = served, runner(model, served.mode)
        self.model = getattr(self._run, "model", self._run)  # the module that runs (a copy in channels_last)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C, H, W] float32 -> logits [N, K] float32."""
        return self._run(x).float()
