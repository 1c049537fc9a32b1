"""Counts and histograms kept in a replica between exports to Ray (`metrics`): a dict update
per event, 0.1 us, where a Ray metric call costs 2-4 us; at the 8 a request takes, Ray's calls
alone cost the student 12% of its requests/s at concurrency 32 (benchmarks/metrics_cost.py).
Plain Python, no Ray."""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Sequence

Key = tuple[str, tuple[str, ...]]  # (metric, its label values in the metric's label order)


class Tally:
    def __init__(self) -> None:
        self.counts: dict[Key, float] = defaultdict(float)  # since the last `take_counts`
        self.hists: dict[Key, list[float]] = {}  # per bucket (not cumulative) and +Inf, then sum, count
        self.values: dict[Key, float] = {}  # gauges: the last value set

    def inc(self, metric: str, labels: tuple[str, ...], n: float = 1.0) -> None:
        self.counts[(metric, labels)] += n

    def observe(self, metric: str, labels: tuple[str, ...], value: float, bounds: Sequence[float]) -> None:
        h = self.hists.get((metric, labels))
        if h is None:
            h = self.hists[(metric, labels)] = [0.0] * (len(bounds) + 3)
        h[bisect_left(bounds, value)] += 1  # the first bucket whose bound is >= value (`le`)
        h[-2] += value
        h[-1] += 1

    def set(self, metric: str, labels: tuple[str, ...], value: float) -> None:
        self.values[(metric, labels)] = value

    def take_counts(self) -> dict[Key, float]:
        """The counts since the last call (a counter is exported by its increments)."""
        counts, self.counts = self.counts, defaultdict(float)
        return {key: n for key, n in counts.items() if n}

    def cumulative(self, key: Key, bounds: Sequence[float]) -> tuple[list[tuple[str, float]], float, float]:
        """A histogram as Prometheus shows it: ([(le, observations <= le)], sum, count)."""
        h, total, out = self.hists[key], 0.0, []
        for bound, n in zip([*(f"{b:g}" for b in bounds), "+Inf"], h[:-2]):
            total += n
            out.append((bound, total))
        return out, h[-2], h[-1]
