"""`distillery top`'s arithmetic on two samples of the agents' figures, without Ray: rates,
quantiles as Prometheus' histogram_quantile takes them, batch sizes, replicas. (The figures
as Ray's agents export them: tests/integration/test_metrics.py.)"""

import math

import pytest

from distillery.serving.top import quantile, replica_rates, rows


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



def _at(clock: float, counts: dict[str, float]) -> dict:
    """A sample from the agent: each replica's ok count and its export timestamp."""
    out = {}
    for replica, n in counts.items():
        where = {"application": "app", "replica": replica}
        labels = tuple(sorted({**where, "model": "m", "outcome": "ok"}.items()))
        out[("distillery_requests_total", labels)] = n
        out[("distillery_export_timestamp_seconds", tuple(sorted(where.items())))] = clock
    return out


def test_a_rate_is_taken_over_the_replicas_own_clock_not_the_scrapes():
    # 100 requests/s; the agent last heard from the replica at 1000.5 and 1020.5 (its reports
    # are 10 s apart): however far apart the scrapes were, 2,000 requests in 20 s.
    rates = replica_rates(_at(1000.5, {"r1": 5_000}), _at(1020.5, {"r1": 7_000}))
    assert rates == pytest.approx({"m": 100.0})


def test_replicas_add_up_an_idle_one_counts_zero_and_a_new_one_waits_for_its_second_report():
    old, new = _at(100.0, {"r1": 50, "r2": 80}), _at(110.0, {"r1": 150, "r2": 80, "r3": 40})
    assert replica_rates(old, new) == pytest.approx({"m": 10.0})
    assert replica_rates(new, new) == {}  # nothing handed over between them: `rows` falls back to the scrapes
