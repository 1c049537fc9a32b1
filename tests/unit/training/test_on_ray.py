"""Training on Ray Train: what distillery adds around `TorchTrainer.fit()`. No Ray started."""

import pytest
import ray.train

from distillery.training.on_ray import fit_again_after_controller_errors


class _Trainer:
    """Stands in for a TorchTrainer whose `fit()` ends in Ray Train's controller errors first
    (the placement-group timeout seen on the rig), then returns."""

    def __init__(self, outcomes: list):
        self.outcomes = outcomes

    def fit(self):
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def test_training_starts_again_after_controller_errors_up_to_the_limit_then_raises(caplog):
    def controller_error():
        return ray.train.ControllerError(RuntimeError("There was timeout in removing the placement group"))

    outcomes = [controller_error(), controller_error(), "result"]
    assert fit_again_after_controller_errors(lambda: _Trainer(outcomes), 2, "teacher") == "result"
    out = caplog.text  # the console's lines
    assert out.count("[teacher] Ray Train's controller failed") == 2 and "2 of ray.max_failures=2" in out
    assert "removing the placement group" in out

    outcomes = [controller_error(), controller_error()]
    with pytest.raises(ray.train.ControllerError):  # one more than allowed: Ray Train's error
        fit_again_after_controller_errors(lambda: _Trainer(outcomes), 1, "teacher")
    outcomes = [ValueError("a worker's own error")]
    with pytest.raises(ValueError):  # only the controller's errors start training again
        fit_again_after_controller_errors(lambda: _Trainer(outcomes), 3, "teacher")
