"""How `auto` adapts to load: the most accurate model that meets a latency objective now.

The served models form a ladder, most accurate first, each rung faster than the one above
(a model that is neither more accurate nor faster than another is left off). A controller
walks it from what the `auto` replicas measure end to end (arrival to reply, queueing in the
replica included), pooled across replicas:

- step down one rung when the current rung's p95 over the last `window_s` (or the age of its
  oldest request still unanswered, which shows a queue before any slow answer does) exceeds `down_at`
  of the objective (before the objective itself is missed), or when the replicas spilled more
  than `spill_down` of the requests since the last change (see below), remembering the request rate
  (the highest over the next `hold_s`) and the replica count at which that rung failed: its
  capacity;
- step up when the current rung's p95 is below `up_at` of the objective, no change happened
  for `hold_s` (hysteresis: the new rung's latency must show first; stepping down again waits
  only `down_hold_s`, since a queue grows every moment a rung is overloaded), and the rate is below
  `headroom` of the upper rung's remembered capacity, scaled by the replicas running now
  (a forgotten capacity, after `forget_s`, lets it try again).

Between decisions each replica spills a request under the default objective one rung faster
for every `spill_at` of the objective that the replica is behind (forward-pass time already
queued in it, or its oldest unanswered request's age if longer; `auto_router.Router.spill`): the
controller's signals lag a sudden rise by a report or more, by which time the queue has cost
the objective. The spills keep the rung's own latency low, so the controller counts them.

A request's own objective (`max_latency_ms`) takes the most accurate rung whose recent p95 is
within it; a floor (`min_accuracy`) cuts the ladder (`choose`). Plain Python: no Ray, no torch.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from distillery.serving.protocol import ProtocolError


class Rated(Protocol):
    # Read-only: a served model is a frozen dataclass
    @property
    def name(self) -> str: ...

    @property
    def val_accuracy(self) -> float: ...  # choices read the validation split; the test split only reports

    @property
    def p50_ms(self) -> float: ...


R = TypeVar("R", bound=Rated)  # what the caller rates (a served model) comes back as itself


def ladder(models: list[R]) -> list[R]:
    """Most accurate on validation first; each later rung strictly faster (model-level p50)
    than every one above."""
    out: list[R] = []
    for m in sorted(models, key=lambda m: (-m.val_accuracy, m.p50_ms, m.name)):
        if not out or m.p50_ms < out[-1].p50_ms:
            out.append(m)
    return out


def choose(rungs: list[R], decision: dict, min_accuracy: float | None, max_latency_ms: float | None) -> R:
    """The model for one request, from the shared `decision` ({"model": the default objective's
    rung, "p95_ms": {model: recent p95 or None}}; empty before the first: the top rung):
    that rung, or with `max_latency_ms` the most accurate rung whose recent p95 is within it
    (an unmeasured one is tried; the fastest is the last resort); never below `min_accuracy`
    (a rung under the floor gives way to the fastest one above it; 422 when none is above)."""
    if not rungs:
        raise ProtocolError(503, "no models are served")
    allowed = [m for m in rungs if min_accuracy is None or m.val_accuracy >= min_accuracy]
    if not allowed:
        raise ProtocolError(422, f"no served model reaches validation accuracy {min_accuracy:.4f} "
                                 f"(the most accurate, {rungs[0].name}, has {rungs[0].val_accuracy:.4f})")
    if max_latency_ms is None:
        current = decision.get("model", rungs[0].name)
        return next((m for m in allowed if m.name == current), allowed[-1])
    p95 = decision.get("p95_ms") or {}
    return next((m for m in allowed if p95.get(m.name) is None or p95[m.name] <= max_latency_ms), allowed[-1])


def spill(rungs: list[R], pick: R, backlog_ms: float, budget_ms: float | None) -> R:
    """`pick`, or one rung faster for every `budget_ms` of work already queued (`backlog_ms`),
    down to the fastest; no budget (no decision yet), no spill."""
    if not budget_ms:
        return pick
    return rungs[min(rungs.index(pick) + int(backlog_ms // budget_ms), len(rungs) - 1)]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


WAITING_S = 0.3  # a replica's report of its waiting requests counts this long (it reports every 0.1 s)


@dataclass
class Controller:
    names: list[str]          # the ladder, most accurate first
    slo_ms: float
    window_s: float = 2.0
    down_at: float = 0.6      # of the objective: step down before it is missed
    up_at: float = 0.3
    # Of the objective: how far behind a replica may be per rung a request spills down. Tried
    # here (benchmarks/adaptive.py, 3 repeats each, seconds within the objective / share answered
    # by the most accurate model): 0.3 counting queued forward passes only 92/92/85% / 29-49%;
    # 0.3 also counting the oldest unanswered request's age (kept) 85/88/96% / 73-87%; 0.15
    # 85/88/77% and 77/92/69% (spilling at low load too); no spill 88/92/96% / 31-36%.
    spill_at: float = 0.3
    # Step down when replicas spilled more than this share of the requests answered since the
    # last change: the rung is past its capacity even though the spill keeps its own latency low.
    spill_down: float = 0.1
    headroom: float = 0.7     # step up only below this share of the upper rung's capacity
    hold_s: float = 2.0
    down_hold_s: float = 0.5
    forget_s: float = 20.0
    min_samples: int = 8
    level: int = 0
    changed_at: float = -math.inf
    went_down: bool = False   # the last change was a step down
    samples: deque = field(default_factory=deque)  # (t, model, latency_ms)
    waiting: deque = field(default_factory=deque)  # (t, model, age of its oldest unanswered request in ms)
    spilled: deque = field(default_factory=deque)  # (t, requests a replica spilled below the decision)
    capacity: dict = field(default_factory=dict)   # rung -> (requests/s, replicas, when)
    history: list = field(default_factory=list)    # (t, model chosen)

    def observe(self, samples: list[tuple[float, str, float]], oldest_ms: dict[str, float] | None = None,
                now: float | None = None, spilled: int = 0) -> None:
        """Answered requests (t, model, latency_ms), the age of each model's oldest request
        still unanswered (the leading signal: a queue shows there before any slow answer), and
        how many requests a replica spilled to a faster rung since its last report."""
        self.samples.extend(samples)
        self.waiting.extend((now, model, age) for model, age in (oldest_ms or {}).items())
        if spilled:
            self.spilled.append((now, spilled))

    def pressure(self, model: str, now: float) -> float | None:
        """The p95 of recent answers, or the age of the oldest request still unanswered in any
        replica's last report (within `WAITING_S`) if that is longer."""
        p95 = self.p95(model, now)
        ages = [age for t, m, age in self.waiting if m == model and now - t <= WAITING_S]
        return max([p95 or 0.0, *ages]) if (p95 is not None or ages) else None

    def spill_share(self, now: float) -> float:
        """The share of requests spilled since the last change (within the window); 0 below `min_samples`."""
        since = max(now - self.window_s, self.changed_at)
        answered = sum(1 for t, _, _ in self.samples if t >= since)
        spilled = sum(n for t, n in self.spilled if t >= since)
        return spilled / answered if answered >= self.min_samples else 0.0

    def p95(self, model: str, now: float) -> float | None:
        values = [ms for t, m, ms in self.samples if m == model and t >= now - self.window_s]
        return percentile(values, 95) if len(values) >= self.min_samples else None

    def rate(self, now: float) -> float:
        """Requests/s over the window (over the time since the first of them, in a window not yet full)."""
        times = [t for t, _, _ in self.samples if t >= now - self.window_s]
        return (len(times) - 1) / max(now - times[0], 1e-3) if len(times) > 1 else 0.0

    def update(self, now: float, replicas: int = 1) -> str:
        """Decide the rung for the default objective at time `now`; return its model."""
        while self.samples and self.samples[0][0] < now - self.window_s:
            self.samples.popleft()
        while self.waiting and self.waiting[0][0] < now - WAITING_S:
            self.waiting.popleft()
        while self.spilled and self.spilled[0][0] < now - self.window_s:
            self.spilled.popleft()
        since = now - self.changed_at
        if self.went_down and since < self.hold_s:
            # Just stepped down: the rung above failed at the load arriving now, which a sudden
            # rise shows only after the step (the window still averages in the calm before).
            rate, then, when = self.capacity[self.level - 1]
            self.capacity[self.level - 1] = (max(rate, self.rate(now)), then, when)
        current = self.pressure(self.names[self.level], now)
        overloaded = (current is not None and current > self.down_at * self.slo_ms) \
            or self.spill_share(now) > self.spill_down
        if since >= self.down_hold_s and overloaded and self.level < len(self.names) - 1:
            self.capacity[self.level] = (self.rate(now), replicas, now)
            self._move(+1, now)
        elif since >= self.hold_s and self.level > 0 \
                and (current is None or current < self.up_at * self.slo_ms) \
                and self._fits(self.level - 1, now, replicas):
            self._move(-1, now)
        return self.names[self.level]

    def _fits(self, rung: int, now: float, replicas: int) -> bool:
        known = self.capacity.get(rung)
        if known is None or now - known[2] > self.forget_s:
            return True
        rate, then, _ = known
        return self.rate(now) < self.headroom * rate * replicas / max(then, 1)

    def _move(self, step: int, now: float) -> None:
        self.level += step
        self.changed_at, self.went_down = now, step > 0
        self.history.append((round(now, 3), self.names[self.level]))
        del self.history[:-100]

    def state(self, now: float) -> dict:
        return {"slo_ms": self.slo_ms, "model": self.names[self.level], "ladder": self.names,
                "requests_per_s": round(self.rate(now), 1),
                "p95_ms": {n: self.p95(n, now) for n in self.names}, "changes": self.history[-20:]}
