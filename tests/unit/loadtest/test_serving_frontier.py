"""The serving-level frontier the load test reports: a pure function of the sweep's rows
(its module talks to Serve, but this test starts nothing)."""

from distillery.loadtest import run as lt
from distillery.serving.predictor import ServedModel


def test_serving_frontier_takes_the_best_rate_within_the_p99_target():
    m = ServedModel("a", "x", [1, 8, 8], 10, 0.9, 0.9, 0.1, "eager")
    rows = [{"model": "a", "concurrency": c, "throughput": t, "p99_ms": p, "errors": e}
            for c, t, p, e in ((1, 50.0, 10.0, {}), (4, 150.0, 40.0, {}), (16, 300.0, 150.0, {}),
                               (8, 200.0, 60.0, {"503": 1}))]
    front = lt.serving_frontier(rows, [m], p99_target_ms=100.0)
    assert front == [{"model": "a", "test_accuracy": 0.9, "mode": "eager", "model_p50_ms": 0.1,
                      "sustained_rps": 150.0, "at_concurrency": 4, "p99_target_ms": 100.0}]
