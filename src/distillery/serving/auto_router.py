"""`auto` on Ray Serve: one shared controller, and a router in every replica that answers `auto`.

`AutoState` is a one-replica deployment of the `auto` application holding the `auto_policy.Controller`.
Every replica that answers `auto` (the HTTP `Auto` replicas and the gRPC replicas) keeps a
`Router`: per request it picks from the last shared decision (no call on the request path),
times the request from arrival to reply, and ten times a second sends what it measured (and
the age of its oldest request still unanswered, per model) to `AutoState`, which pools every
replica's figures, counts the replicas that report, updates the controller and returns the new
decision. When that decision steps down, the requests still waiting at the slower models move
to the new one (`hand_down`).
Between decisions a replica spills a request to a faster model when it is further behind than
the spill budget (`spill`: queued forward passes, or its oldest unanswered request's age): a
sudden rise is met at once, not a report later, when a queue has formed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import Counter

import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from distillery.serving import auto_policy
from distillery.serving.batcher import Batcher
from distillery.serving.metrics import NoMetrics, ReplicaMetrics
from distillery.serving.predictor import Predictor, ServedModel
from distillery.serving.protocol import auto_targets

STATE = "AutoState"
QUEUE = 2  # requests in flight on a model before the oldest one's age counts as a queue
SYNC_S = 0.1  # a report costs ~3 ms of CPU; a queue can grow by a tenth of a second of load meanwhile
log = logging.getLogger("ray.serve")


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class AutoState:
    def __init__(self, names: list[str], slo_ms: float):
        self.controller = auto_policy.Controller(names, slo_ms)
        self.replicas: dict[str, tuple[float, dict[str, int]]] = {}

    def report(self, replica: str, samples: list[tuple[float, str, float]], inflight: dict[str, int],
               oldest_ms: dict[str, float], spilled: int = 0) -> dict:
        now = time.time()
        self.replicas = {r: v for r, v in self.replicas.items()
                         if now - v[0] < 4 * SYNC_S + 1} | {replica: (now, inflight)}
        self.controller.observe(samples, oldest_ms, now, spilled)
        model = self.controller.update(now, replicas=len(self.replicas))
        ongoing = sum((Counter(counts) for _, counts in self.replicas.values()), Counter())
        return {"model": model, "p95_ms": {n: self.controller.p95(n, now) for n in self.controller.names},
                "spill_ms": self.controller.spill_at * self.controller.slo_ms,
                "replicas": len(self.replicas), "ongoing": dict(ongoing)}

    def state(self) -> dict:
        return self.controller.state(time.time()) | {"replicas": len(self.replicas)}


def batchers(
    served: list[ServedModel], max_batch: int, wait_s: float, metrics: ReplicaMetrics
) -> dict[str, Batcher]:
    """A replica's batcher for each served model, by name, each telling `metrics` of its passes."""
    out = {}
    for m in served:
        predictor = Predictor(m)  # verifies sha256; a bad artifact fails the replica here
        out[m.name] = Batcher(predictor, max_batch, wait_s, m.name, metrics.on_pass(m.name, predictor.model))
    return out


class Router:
    """`auto` inside one replica: the pick, the timing, the reports to `AutoState`; `batchers`
    (the replica's, one per served model by name) run the picks."""

    def __init__(
        self,
        served: list[ServedModel],
        state: DeploymentHandle | None,
        batchers: dict[str, Batcher],
        metrics: ReplicaMetrics | None = None,
    ):
        self.rungs, self.batchers, self.metrics = auto_policy.ladder(served), batchers, metrics or NoMetrics()
        self.by_name = {m.name: m for m in served}
        self.state, self.id = state, uuid.uuid4().hex[:8]
        self.decision: dict = {}
        self.samples: list[tuple[float, str, float]] = []
        self.spilled = 0  # requests spilled to a faster rung since the last report
        self.started: dict[int, tuple[str, float]] = {}  # request -> (model, perf_counter at arrival)
        self._ids = itertools.count()
        self._task: asyncio.Task | None = None

    async def answer(self, parameters: dict, x: torch.Tensor, arrived: float,
                     record: dict | None = None) -> tuple[ServedModel, torch.Tensor, dict]:
        """Pick a model for `parameters`, run it on `x`, record the time from `arrived`
        (perf_counter when the request reached the replica: reading and parsing count) to the
        answer; return (the model that answered, logits, the reply's parameters). A request
        under the default objective may be handed down to a faster model while it waits; one
        with its own targets stays with the model they chose."""
        if self._task is None and self.state is not None:
            self._task = asyncio.get_running_loop().create_task(self._sync(self.state))
        targets = auto_targets(parameters)
        pick, movable = auto_policy.choose(self.rungs, self.decision, *targets), targets == (None, None)
        spilled = False
        if movable:
            chosen, pick = pick, self.spill(pick)
            spilled = pick is not chosen
            self.spilled += spilled
        key = next(self._ids)
        self.started[key] = (pick.name, arrived)
        try:
            answer = await self.batchers[pick.name](x, movable=movable)
        finally:
            self.started.pop(key, None)
        pick, ms = self.by_name[answer.by], 1e3 * (time.perf_counter() - arrived)
        self.samples.append((time.time(), pick.name, ms))
        self.metrics.answered(pick.name, len(x), answer, record)
        self.metrics.auto_answer(pick.name, spilled)
        return pick, answer.logits, {"batched_requests": answer.together, "replica_ms": round(ms, 3),
                                     "val_accuracy": pick.val_accuracy, "test_accuracy": pick.test_accuracy,
                                     "slo_model": self.decision.get("model", self.rungs[0].name)}

    def spill(self, pick: ServedModel) -> ServedModel:
        """`pick`, or a faster rung for how far behind this replica is: the forward-pass time
        already waiting (its models share one thread, so a request waits about for all of it,
        whichever it joins), or the age of its oldest unanswered request if that is longer
        (which also counts the reading and parsing that no queue shows)."""
        backlog = sum(b.waiting_ms() for b in self.batchers.values())
        if self.started:
            backlog = max(backlog, 1e3 * (time.perf_counter() - min(t for _, t in self.started.values())))
        return auto_policy.spill(self.rungs, pick, backlog, self.decision.get("spill_ms"))

    def hand_down(self, model: str) -> int:
        """The shared decision is now `model`: the requests waiting at the more accurate (slower)
        rungs above it, under the default objective, move to it. Returns how many moved."""
        names = [m.name for m in self.rungs]
        if model not in names:
            return 0
        self.metrics.auto_decision(names.index(model))
        moved = sum(self.batchers[m].hand_over(self.batchers[model]) for m in names[:names.index(model)])
        self.metrics.handed_over(moved)
        return moved

    async def _sync(self, state: DeploymentHandle) -> None:
        while True:
            await asyncio.sleep(SYNC_S)
            samples, self.samples = self.samples, []
            spilled, self.spilled = self.spilled, 0
            now = time.perf_counter()
            oldest: dict[str, float] = {}
            inflight = Counter(model for model, _ in self.started.values())
            for model, arrived in self.started.values():
                if inflight[model] >= QUEUE:  # one slow request (a cold start) is not a queue
                    oldest[model] = max(oldest.get(model, 0.0), 1e3 * (now - arrived))
            try:
                self.decision = await state.report.remote(self.id, samples, dict(inflight), oldest, spilled)
                self.hand_down(self.decision["model"])
            except Exception as e:  # noqa: BLE001 - keep answering with the last decision
                log.warning("auto: no report to %s (%s: %s); keeping the last decision", STATE,
                            type(e).__name__, e)
                await asyncio.sleep(1.0)
