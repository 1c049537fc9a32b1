"""What the served models are doing, counted in the replicas and exported by Ray's metrics
agent on every node (Ray's public `ray.util.metrics`, labelled with the replica's application
and id): no extra server, on a cluster too.

    distillery_requests_total{model, version, protocol, outcome}    ok | client_error | refused | failed
    distillery_request_seconds{model, version, protocol}    an answered request, arrival -> reply (histogram)
    distillery_queue_seconds{model, version}       joining the batcher -> its forward pass starts (histogram)
    distillery_forward_seconds{model, version}     one forward pass (histogram)
    distillery_batch_size{model, version}          requests per forward pass (histogram)
    distillery_forward_passes_total, distillery_batched_requests_total{model, version}    their exact mean
    distillery_request_images{model, version}      images per request (histogram)
    distillery_cascade_rows_total{model, version, escalated}    rows a cascade's small model kept or sent on
    distillery_auto_rung{model}                    auto's shared decision: its rung (0: most accurate)
    distillery_auto_requests_total{model}          the model that answered each auto request
    distillery_auto_spills_total, distillery_auto_handovers_total    sent to a faster rung: arriving, waiting

With `serve.request_log_sample` above 0, that share of requests is also logged, one JSON line
each in `requests_<pid>.jsonl` beside the replica's own log (the Ray session's logs/serve/ on
its node): its id (the client's, or one made here and returned as `x-request-id`), model,
images, outcome and times.

Ray's exporter puts `ray_` before every name; the Prometheus config `distillery serve` writes
(`prometheus_config`) takes it off again. `serve.metrics: false` turns all of it off.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, Protocol, cast

from ray import serve
from ray.util import metrics

from distillery.compat.logs import session_logs
from distillery.serving.batcher import Answer, OnPass
from distillery.serving.protocol import MODEL_VERSION, ProtocolError
from distillery.serving.tally import Tally

SECONDS = [0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]
COUNTS: list[float] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096]
MODEL = ("model", "version")
REPLICA = ("application", "replica")  # on every series, as Serve's own metrics name a replica
PROTOCOL, OUTCOME = (*MODEL, "protocol"), (*MODEL, "protocol", "outcome")
EXPORT_S = 1.0  # how often a replica hands its tally to Ray (whose agent reports every 10 s)


class Spec(NamedTuple):
    """A metric: a histogram is exported as Prometheus shows one, `_bucket{le}`, `_sum`, `_count`,
    from this process's own tally (Ray's histograms cost a call per observation, and rebuild
    `_sum` from bucket midpoints)."""

    kind: str  # counter, gauge or histogram
    name: str
    description: str
    labels: tuple[str, ...]
    buckets: Sequence[float] = ()  # a histogram's


METRICS = {  # by the attribute the tally counts under
    "requests": Spec("counter", "distillery_requests", "Inference requests by model, protocol, outcome",
                     OUTCOME),
    "latency": Spec("histogram", "distillery_request_seconds", "Answered, arrival to reply", PROTOCOL,
                    SECONDS),
    "queue": Spec("histogram", "distillery_queue_seconds", "Waiting in the batcher for a pass", MODEL,
                  SECONDS),
    "forward": Spec("histogram", "distillery_forward_seconds", "One forward pass", MODEL, SECONDS),
    "batch": Spec("histogram", "distillery_batch_size", "Requests per forward pass", MODEL, COUNTS),
    "passes": Spec("counter", "distillery_forward_passes", "Forward passes", MODEL),
    "batched": Spec("counter", "distillery_batched_requests", "Requests answered by forward passes", MODEL),
    "images": Spec("histogram", "distillery_request_images", "Images per request", MODEL, COUNTS),
    "cascade": Spec("counter", "distillery_cascade_rows", "Rows a cascade kept (escalated=false) or sent on",
                    (*MODEL, "escalated")),
    "rung": Spec("gauge", "distillery_auto_rung",
                 "auto's decision: its place on the ladder (0: most accurate)", ("model",)),
    "auto": Spec("counter", "distillery_auto_requests", "The model that answered each auto request",
                 ("model",)),
    "spills": Spec("counter", "distillery_auto_spills", "auto requests sent to a faster model at arrival",
                   ()),
    "handovers": Spec("counter", "distillery_auto_handovers", "auto requests moved to a faster model", ()),
    # Ray's agent reports every 10 s what a replica last handed it: a rate read from the agent
    # divides by this replica's own clock, not the reader's (`top`), else it aliases.
    "exported": Spec("gauge", "distillery_export_timestamp_seconds",
                     "When this replica last handed its figures to Ray (Unix time)", ()),
}
UNKNOWN = "(unknown)"  # the label of a request for a model this replica does not serve: names stay bounded
log = logging.getLogger("distillery.requests")  # pure JSON lines, a file of their own (`_request_log`)


def request_id() -> str:
    """An id for a request that came without one (logged, and returned as `x-request-id`)."""
    return uuid.uuid4().hex[:16]


def outcome(error: BaseException | None) -> str:
    if error is None:
        return "ok"
    if isinstance(error, ProtocolError):
        return "refused" if error.status == 503 else "client_error"
    return "failed"


class RayMetrics(NamedTuple):
    """The Ray metrics the tally is exported to, by attribute: a Counter per counter, a Gauge
    per gauge, and per histogram three Gauges (`_bucket` with `le`, `_sum`, `_count`)."""

    counters: dict[str, metrics.Counter]
    gauges: dict[str, metrics.Gauge]
    histograms: dict[str, tuple[metrics.Gauge, metrics.Gauge, metrics.Gauge]]


def _ray_metrics() -> RayMetrics:
    """Every metric, labelled with this replica's application and id (Ray's core
    `ray.util.metrics`, labelled as Serve's own are)."""
    out = RayMetrics({}, {}, {})
    for attr, (kind, name, description, labels, _) in METRICS.items():
        keys = (*labels, *REPLICA)
        if kind == "counter":
            out.counters[attr] = metrics.Counter(name, description, tag_keys=keys)
        elif kind == "gauge":
            out.gauges[attr] = metrics.Gauge(name, description, tag_keys=keys)
        else:
            out.histograms[attr] = (
                metrics.Gauge(f"{name}_bucket", description, tag_keys=(*labels, "le", *REPLICA)),
                metrics.Gauge(f"{name}_sum", description, tag_keys=keys),
                metrics.Gauge(f"{name}_count", description, tag_keys=keys))
    here = _replica()
    for m in [*out.counters.values(), *out.gauges.values(), *(g for h in out.histograms.values() for g in h)]:
        m.set_default_tags(here)
    return out


def _replica() -> dict[str, str]:
    """This replica's application and id (empty outside a Serve replica)."""
    try:
        context = serve.get_replica_context()
    except Exception:  # noqa: BLE001 - not a replica (a test, a benchmark in process)
        return dict.fromkeys(REPLICA, "")
    return {"application": context.app_name, "replica": context.replica_tag}


class Escalating(Protocol):
    """A cascade's counts (`models.cascade.Cascade`): rows answered, and of them sent on."""

    rows: int
    escalated: int


class Counted:
    """One request being counted and timed (`ReplicaMetrics.counted`): a class, where a
    generator-based context manager costs each request about a microsecond more."""

    __slots__ = ("metrics", "labels", "record", "start")

    def __init__(self, metrics: ReplicaMetrics | None, labels: tuple[str, ...], record: dict) -> None:
        self.metrics, self.labels, self.record = metrics, labels, record

    def __enter__(self) -> dict:
        self.start = time.perf_counter()
        return self.record

    def __exit__(self, kind: type | None, error: BaseException | None, trace: object) -> None:
        if self.metrics is not None:  # None: `serve.metrics: false`
            self.metrics.done(self.labels, time.perf_counter() - self.start, error, self.record)


class ReplicaMetrics:
    """One per replica process (Ray keeps a metric per name and process): events go into a
    `Tally`, which a task on the replica's event loop hands to Ray every EXPORT_S."""

    def __init__(self) -> None:
        self.log_share = 0.0  # `serve.request_log_sample`
        self.tally, self.ray = Tally(), _ray_metrics()
        self._exporter: asyncio.Task | None = None

    def export(self) -> None:
        """Hand the tally to Ray: counters by their increments, histograms and gauges whole."""
        for (attr, values), n in self.tally.take_counts().items():
            self.ray.counters[attr].inc(n, tags=dict(zip(METRICS[attr].labels, values)))
        for (attr, values), value in self.tally.values.items():
            self.ray.gauges[attr].set(value, tags=dict(zip(METRICS[attr].labels, values)))
        for (attr, values) in list(self.tally.hists):
            tags, (bucket, total, count) = dict(zip(METRICS[attr].labels, values)), self.ray.histograms[attr]
            buckets, value_sum, n = self.tally.cumulative((attr, values), METRICS[attr].buckets)
            for le, cumulative in buckets:
                bucket.set(cumulative, tags={**tags, "le": le})
            total.set(value_sum, tags=tags)
            count.set(n, tags=tags)
        self.ray.gauges["exported"].set(time.time())  # last: every figure above is as of this time

    def _exporting(self) -> None:
        """Start the export task on the running loop (the replica's), once."""
        if self._exporter is None:
            with contextlib.suppress(RuntimeError):  # no running loop: nothing to export from
                self._exporter = asyncio.get_running_loop().create_task(self._export_every(EXPORT_S))

    async def _export_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                self.export()
            except Exception as e:  # noqa: BLE001 - metrics never take a replica down
                logging.getLogger("ray.serve").warning("metrics: export to Ray failed (%s: %s)",
                                                       type(e).__name__, e)

    def counted(self, model: str, protocol: str, record: dict | None = None) -> Counted:
        """Count one inference request under its outcome: a ProtocolError (re-raised) is the
        client's (4xx) or a refusal under overload (503); any other error a failure. Its `with`
        gives the request's record (`record`, or a new one), which the handler fills (id, images,
        times) for the request log."""
        self._exporting()
        return Counted(self, (model, MODEL_VERSION, protocol), {} if record is None else record)

    def done(self, labels: tuple[str, ...], seconds: float, error: BaseException | None,
             record: dict) -> None:
        """A counted request has ended (`Counted`)."""
        if error is None:
            self.tally.inc("requests", (*labels, "ok"))
            self.tally.observe("latency", labels, seconds, SECONDS)
        else:
            self.tally.inc("requests", (*labels, outcome(error)))
        if self.log_share and random.random() < self.log_share:
            log.info(json.dumps({"t": round(time.time(), 6), **dict(zip(PROTOCOL, labels)),
                                 "outcome": outcome(error), "ms": round(1e3 * seconds, 3), **record}))

    def answered(self, model: str, images: int, answer: Answer, record: dict | None = None) -> None:
        """A request's answer: its images and queue time; when the request may be logged, its
        record gets those, the pass's time and the model that answered."""
        labels = (model, MODEL_VERSION)
        if record is not None and self.log_share:
            record.update(answered_by=model, images=images, queue_ms=round(1e3 * answer.queued_s, 3),
                          forward_ms=round(1e3 * answer.forward_s, 3), batched_requests=answer.together)
        self.tally.observe("images", labels, images, COUNTS)
        self.tally.observe("queue", labels, answer.queued_s, SECONDS)

    def on_pass(self, model: str, module: object) -> OnPass | None:
        """The batcher's hook for `model` (its forward passes); `module` is what runs, read for a
        cascade's counts."""
        labels, tally = (model, MODEL_VERSION), self.tally
        seen = {"rows": 0, "escalated": 0}

        def observe(requests: int, images: int, seconds: float) -> None:
            tally.observe("batch", labels, requests, COUNTS)
            tally.inc("passes", labels)
            tally.inc("batched", labels, requests)
            tally.observe("forward", labels, seconds, SECONDS)
            if hasattr(module, "escalated"):
                self._cascade(labels, cast(Escalating, module), seen)

        return observe

    def _cascade(self, labels: tuple[str, ...], module: Escalating, seen: dict[str, int]) -> None:
        """The rows a cascade answered since the last pass, kept by its small model or escalated."""
        escalated, rows = module.escalated - seen["escalated"], module.rows - seen["rows"]
        seen.update(rows=module.rows, escalated=module.escalated)
        for flag, n in (("true", escalated), ("false", rows - escalated)):
            if n:
                self.tally.inc("cascade", (*labels, flag), n)

    def auto_decision(self, rung: int) -> None:
        self.tally.set("rung", ("auto",), rung)

    def auto_answer(self, model: str, spilled: bool) -> None:
        self.tally.inc("auto", (model,))
        if spilled:
            self.tally.inc("spills", ())

    def handed_over(self, n: int) -> None:
        if n:
            self.tally.inc("handovers", (), n)


class NoMetrics(ReplicaMetrics):
    """`serve.metrics: false`: every call a no-op (the benchmark's 'off')."""

    def __init__(self) -> None:
        pass

    def counted(self, model: str, protocol: str, record: dict | None = None) -> Counted:
        return Counted(None, (), {} if record is None else record)

    def answered(self, model: str, images: int, answer: Answer, record: dict | None = None) -> None:
        pass

    def on_pass(self, model: str, module: object) -> OnPass | None:
        return None

    def auto_decision(self, rung: int) -> None:
        pass

    def auto_answer(self, model: str, spilled: bool) -> None:
        pass

    def handed_over(self, n: int) -> None:
        pass


_METRICS: ReplicaMetrics | None = None


def replica_metrics(enabled: bool, log_share: float = 0.0) -> ReplicaMetrics:
    """This process's metrics (created once: a second Counter of one name would be refused),
    logging `log_share` of its requests."""
    global _METRICS
    if not enabled:
        return NoMetrics()
    if _METRICS is None:
        _METRICS = ReplicaMetrics()
    _METRICS.log_share = log_share
    if log_share and not log.handlers:
        _request_log()
    return _METRICS


def _request_log() -> None:
    """`log` -> requests_<pid>.jsonl in this node's Ray session logs/serve/ (or the working
    folder outside Ray), one JSON object a line, nothing else."""
    folder = session_logs()
    path = (folder / "serve" if folder else Path(".")) / f"requests_{os.getpid()}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # not also into the replica's own log and stderr
