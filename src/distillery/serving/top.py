"""`distillery top`: each served model's requests/s, p50/p99, batch size, replicas and `auto`'s
rung, read from the replicas' metrics (`serving.metrics`) where Prometheus would read them:
every node's Ray metrics agent, named by the run's `serve/prometheus.yml`. No Prometheus and no
Ray connection needed, and nothing sent to the models.

Ray's agents take each replica's figures every `metrics_report_interval_ms` (10 s by default),
so a counter read every second moves in steps 10 s apart: a rate over the scrapes' own times
would alias (a 20 s window holds one step or three). Each replica's rate is taken over its own
clock instead, the export timestamp it hands over with its figures; `window_s` (30 s) holds
two reports at least.
"""

from __future__ import annotations

import time
import urllib.request
from collections import defaultdict, deque
from dataclasses import dataclass

import yaml
from prometheus_client.parser import text_string_to_metric_families

from distillery.core.errors import UserError

PREFIX = "ray_"  # Ray's exporter's prefix of application metrics
Sample = dict[tuple[str, tuple[tuple[str, str], ...]], float]  # (name, sorted labels) -> value


def targets_of(prometheus_yml: str) -> list[str]:
    """The `ray` job's targets of a scrape config `distillery serve` wrote."""
    try:
        doc = yaml.safe_load(open(prometheus_yml))
        jobs = {job["job_name"]: job for job in doc["scrape_configs"]}
        return [t for group in jobs["ray"]["static_configs"] for t in group["targets"]]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise UserError(
            f"{prometheus_yml}: no `ray` scrape job to read targets from ({type(e).__name__}: {e}); "
            "serve the run with `distillery serve` first, or give --targets"
        ) from None


def scrape(targets: list[str], timeout_s: float = 2.0) -> Sample:
    """Every distillery_* sample the agents export now, summed over the nodes that export it."""
    out: Sample = defaultdict(float)
    for target in targets:
        try:
            with urllib.request.urlopen(f"http://{target}/metrics", timeout=timeout_s) as r:
                text = r.read().decode()
        except OSError:
            continue  # a node gone: the others still count
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.startswith(PREFIX + "distillery_"):
                    out[(s.name.removeprefix(PREFIX), tuple(sorted(s.labels.items())))] += s.value
    return dict(out)


@dataclass
class Row:
    model: str
    answered: float  # requests answered between the two samples
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    batch: float | None
    replicas: int


def _by_model(sample: Sample, name: str, **match: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for (n, labels), v in sample.items():
        d = dict(labels)
        if n == name and all(d.get(k) == want for k, want in match.items()):
            out[d.get("model", "")] += v
    return out


def _buckets(sample: Sample, model: str) -> list[tuple[float, float]]:
    out: dict[float, float] = defaultdict(float)
    for (n, labels), v in sample.items():
        d = dict(labels)
        if n == "distillery_request_seconds_bucket" and d.get("model") == model:
            out[float(d["le"])] += v
    return sorted(out.items())


def quantile(q: float, old: list[tuple[float, float]], new: list[tuple[float, float]]) -> float | None:
    """The q-quantile of what a histogram's cumulative buckets gained between two samples (linear
    within a bucket, as Prometheus' histogram_quantile)."""
    before = dict(old)
    gained = [(le, c - before.get(le, 0.0)) for le, c in new]
    total = gained[-1][1] if gained else 0.0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for le, c in gained:
        if c >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * ((rank - below) / (c - below) if c > below else 1.0)
        lower, below = le, c
    return lower


def rows(old: Sample, new: Sample, seconds: float) -> list[Row]:
    """Per model: what happened between two samples `seconds` apart; its rate over its replicas'
    own clocks (`replica_rates`), or over `seconds` where they did not move on between them."""
    rates = replica_rates(old, new)
    ok_new, ok_old = _by_model(new, "distillery_requests_total", outcome="ok"), \
        _by_model(old, "distillery_requests_total", outcome="ok")
    batched_new, batched_old = (_by_model(s, "distillery_batched_requests_total") for s in (new, old))
    passes_new, passes_old = (_by_model(s, "distillery_forward_passes_total") for s in (new, old))
    out = []
    for model in sorted(ok_new):
        p = [quantile(q, _buckets(old, model), _buckets(new, model)) for q in (0.5, 0.99)]
        passes = passes_new.get(model, 0.0) - passes_old.get(model, 0.0)
        batched = batched_new.get(model, 0.0) - batched_old.get(model, 0.0)
        answered = ok_new[model] - ok_old.get(model, 0.0)
        p50_ms, p99_ms = (x * 1e3 if x is not None else None for x in p)
        out.append(Row(model, answered, rates.get(model, answered / seconds), p50_ms, p99_ms,
                       batched / passes if passes > 0 else None, _replicas(new, model)))
    return out


def _replicas(sample: Sample, model: str) -> int:
    return len({dict(labels).get("replica") for (n, labels), _ in sample.items()
                if n == "distillery_requests_total" and dict(labels).get("model") == model})


def auto_rung(sample: Sample) -> float | None:
    values = [v for (n, _), v in sample.items() if n == "distillery_auto_rung"]
    return max(values) if values else None


EXPORTED = "distillery_export_timestamp_seconds"  # a replica's clock when it handed its figures over


def replica_rates(old: Sample, new: Sample, name: str = "distillery_requests_total",
                  outcome: str = "ok") -> dict[str, float]:
    """Per model, `name`'s rate summed over its replicas, each over the time between the two
    hand-overs to Ray the samples hold (the replica's own export timestamps), not between the
    scrapes. A replica whose figures did not move on between the samples is left out."""
    clocks = {_replica_of(labels): v for (n, labels), v in new.items() if n == EXPORTED}
    before = {_replica_of(labels): v for (n, labels), v in old.items() if n == EXPORTED}
    out: dict[str, float] = defaultdict(float)
    for (n, labels), v in new.items():
        d, replica = dict(labels), _replica_of(labels)
        if n != name or d.get("outcome") != outcome or replica not in before:
            continue
        seconds = clocks.get(replica, 0.0) - before[replica]
        if seconds > 0:
            out[d.get("model", "")] += (v - old.get((n, labels), 0.0)) / seconds
    return dict(out)


def _replica_of(labels: tuple[tuple[str, str], ...]) -> tuple[str | None, str | None]:
    d = dict(labels)
    return d.get("application"), d.get("replica")


class Watch:
    """Samples over time; `rows()` over the last `window_s` seconds of them."""

    def __init__(self, targets: list[str], window_s: float = 30.0):
        self.targets, self.window_s = targets, window_s
        self.samples: deque[tuple[float, Sample]] = deque()

    def tick(self) -> tuple[list[Row], float | None, float]:
        now = time.monotonic()
        self.samples.append((now, scrape(self.targets)))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window_s:
            self.samples.popleft()
        (t0, old), (t1, new) = self.samples[0], self.samples[-1]
        return rows(old, new, max(t1 - t0, 1e-9)), auto_rung(new), t1 - t0
