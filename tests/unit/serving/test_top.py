"""`distillery top`'s arithmetic on two samples of the agents' figures, without Ray: rates,
quantiles as Prometheus' histogram_quantile takes them, batch sizes, replicas. (The figures
as Ray's agents export them: tests/integration/test_metrics.py.)"""

import math

import pytest

from distillery.serving.top import quantile, rows, step_rates


def _sample(ok: float, buckets: dict[float, float], batch_sum: float, batch_count: float, replicas=("r1",)):
    out = {}
    for r in replicas:
        labels = {"model": "m", "outcome": "ok", "replica": r, "version": "1", "protocol": "http"}
        out[("distillery_requests_total", tuple(sorted(labels.items())))] = ok / len(replicas)
    for le, c in buckets.items():
        out[("distillery_request_seconds_bucket", (("le", str(le)), ("model", "m")))] = c
    out[("distillery_batched_requests_total", (("model", "m"),))] = batch_sum
    out[("distillery_forward_passes_total", (("model", "m"),))] = batch_count
    return out


def test_rates_quantiles_and_batches_are_what_happened_between_the_samples():
    old = _sample(10, {0.001: 5, 0.01: 10, math.inf: 10}, 20, 10)
    new = _sample(110, {0.001: 55, 0.01: 108, math.inf: 110}, 220, 60, replicas=("r1", "r2"))
    (row,) = rows(old, new, seconds=10.0)
    assert row.model == "m" and row.answered == 100 and row.rps == pytest.approx(10.0)
    assert row.p50_ms == pytest.approx(1.0)  # 50 of the 100 new answers fell in the first bucket
    assert 1.0 < row.p99_ms <= 10.0 and row.batch == pytest.approx(4.0) and row.replicas == 2


def test_a_quantile_without_new_answers_is_unknown_and_the_last_bucket_is_its_lower_edge():
    same = [(0.001, 3.0), (math.inf, 3.0)]
    assert quantile(0.5, same, same) is None
    assert quantile(0.99, [(0.001, 0.0), (math.inf, 0.0)], [(0.001, 0.0), (math.inf, 4.0)]) == 0.001


def _history(times_values, replica="r1"):
    labels = tuple(sorted({"model": "m", "outcome": "ok", "replica": replica}.items()))
    return [(t, {("distillery_requests_total", labels): v}) for t, v in times_values]


def test_a_rate_is_taken_over_whole_reporting_periods_not_the_scrapes_own_times():
    # 100 requests/s, reported every 10 s (at 0.5, 10.5, 20.5), scraped every second from 0 to 25:
    # the scrapes' 25 s saw three reports' worth (30 s of requests); between the steps, 20 s exactly.
    reports = [0.5, 10.5, 20.5]
    history = [(t, 100 * 10 * sum(r <= t for r in reports)) for t in range(26)]
    assert step_rates(_history(history)) == pytest.approx({"m": 100.0}, rel=0.1)
    assert (history[-1][1] - history[0][1]) / 25 == pytest.approx(120.0)  # what the scrapes' times would say


def test_an_idle_model_falls_to_zero_and_replicas_add_up():
    idle = [(t, 500.0) for t in range(30)]
    assert step_rates(_history(idle)) == {"m": 0.0}
    stopped = [(t, 1000.0 * min(t // 10, 1)) for t in range(40)]  # one step at 10 s, then nothing for 29 s
    assert step_rates(_history(stopped))["m"] == pytest.approx(1000 / 39)
    both = _history([(t, 50 * (t // 10)) for t in range(30)]) + _history([(t, 70 * (t // 10)) for t in range(30)], "r2")
    merged = [(t, {**a, **b}) for (t, a), (_, b) in zip(both[:30], both[30:])]
    assert step_rates(merged) == pytest.approx({"m": 12.0})
