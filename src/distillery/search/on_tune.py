"""The search on Ray Tune: random settings from `search.space`, trials on the cluster's CPUs
(one process each, `search.cpus_per_trial`), ASHA stopping the trials whose validation
accuracy (ties broken by validation loss: `trial.val_score`) trails at a rung. The only module
of `search` that imports Ray.

Progress is a trial's share of its own schedule (percent), not epochs: a 400-epoch trial is
judged at 15% of its schedule against others at 15% of theirs, not against a 50-epoch trial
that has already cooled down. Tune's experiment lives in the run's `search/` folder (or at its
URI), so running the search again resumes it: finished trials are kept, unfinished ones go on.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from distillery.config import PipelineConfig
from distillery.config.search import SpaceConfig
from distillery.core import console
from distillery.run import storage
from distillery.run.cluster import ensure_ray
from distillery.run.rundir import RunDir
from distillery.search.trial import COMPLETED, FAILED, STOPPED, TrialData, flat, run_trial
from distillery.training.epoch_feed import one_line
from distillery.training.on_ray import checkpoint_storage


def param_space(space: SpaceConfig, models: list[list]) -> dict[str, Any]:
    """Tune's sampling space: `models` are the [width, recipe index] pairs to draw from (the
    recipe as an index into `space.recipe`, so configs stay JSON)."""
    return {"model": tune.choice(models), "temperature": tune.choice(space.temperature),
            "alpha": tune.choice(space.alpha), "epochs": tune.choice(space.epochs),
            "augment": tune.choice(space.augment)}


def trainable(settings: dict[str, Any], data: TrialData) -> None:
    """One trial in a Tune worker process: reports while training, then the saved model."""
    torch.set_num_threads(max(1, int(data.cfg.search.cpus_per_trial)))
    with tempfile.TemporaryDirectory(prefix="distillery-trial-") as tmp:
        folder = Path(tmp) / "model"
        final = run_trial(settings, data, folder, tune.report)
        tune.report(final, checkpoint=tune.Checkpoint.from_directory(str(folder)))


# The running search's console progress. Tune pickles its callbacks into the experiment
# state, so a resumed search brings back the old callback: it finds the new progress here.
_progress: list[Callable[..., None]] = [lambda *a, **k: None]


class TrialsDone(tune.Callback):
    """Moves the console's progress on by one trial as each one ends (finished, stopped, failed)."""

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        _progress[0](1, note=trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        _progress[0](1, note=f"{trial.trial_id} failed")


def run_trials(cfg: PipelineConfig, run: RunDir, data: TrialData, name: str, models: list[list], out: Path,
               advance: Callable[..., None] = lambda *a, **k: None) -> list[dict[str, Any]]:
    """Run (or resume) the search `name`; copy each completed trial's model to `out/<trial>`;
    return every trial's outcome: settings, status, epochs run, last metrics, error."""
    ensure_ray(cfg)  # with Tune's legacy (quiet at verbose=0) output switched on
    where = checkpoint_storage(run, "search")
    fn = tune.with_resources(tune.with_parameters(trainable, data=data), {"cpu": cfg.search.cpus_per_trial})
    fs, path = storage.filesystem(run.location_of(f"search/{name}"))
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        console.say(f"[search] resuming the search in {run.location_of(f'search/{name}')}")
        tuner = tune.Tuner.restore(path, fn, storage_filesystem=fs)
    else:
        tuner = tune.Tuner(fn, param_space=param_space(cfg.search.space, models),
                           tune_config=_tune_config(cfg),
                           run_config=tune.RunConfig(name=name, **where, verbose=0, callbacks=[TrialsDone()],
                                                     failure_config=tune.FailureConfig(max_failures=0)))
    _progress[0] = advance
    try:
        # ResultGrid iterates by __getitem__ and __len__, which mypy does not count as iterable
        return [_outcome(result, out) for result in tuner.fit()]  # type: ignore[attr-defined]
    finally:
        _progress[0] = lambda *a, **k: None


def _tune_config(cfg: PipelineConfig) -> tune.TuneConfig:
    s = cfg.search
    # Ray annotates grace_period as an int but computes its rungs in floats: a share of `progress`
    asha = ASHAScheduler(time_attr="progress", max_t=100, reduction_factor=s.reduction_factor,
                         grace_period=s.grace_percent)  # type: ignore[arg-type]
    return tune.TuneConfig(metric="val_score", mode="max", scheduler=asha, num_samples=s.trials,
                           max_concurrent_trials=s.max_concurrent,
                           search_alg=BasicVariantGenerator(random_state=cfg.seed))


def _outcome(result: tune.Result, out: Path) -> dict[str, Any]:
    metrics = dict(result.metrics or {})
    trial = metrics.get("trial_id") or Path(result.path).name
    done = result.error is None and metrics.get("progress") == 100.0 and result.checkpoint is not None
    status = FAILED if result.error is not None else COMPLETED if done else STOPPED
    outcome = {"trial": trial, "settings": flat(result.config or _params(result)), "status": status,
               "epochs_run": metrics.get("epoch", 0),
               "error": one_line(result.error) if result.error else None,
               "metrics": {k: v for k, v in metrics.items() if k in _KEPT}}
    if done:
        assert result.checkpoint is not None  # `done` says it has one
        result.checkpoint.to_directory(str(out / trial))
        outcome["folder"] = str(out / trial)
    return outcome


def _params(result: tune.Result) -> dict[str, Any]:
    """A trial's settings as Tune wrote them when it started: a trial that failed before its
    first report has no result to carry them."""
    with result.filesystem.open_input_stream(f"{result.path}/params.json") as f:
        return json.loads(f.read())


_KEPT = ("progress", "epoch", "val_accuracy", "val_loss", "val_score", "trained_val_accuracy", "macs",
         "params", "size_bytes", "numerics")
