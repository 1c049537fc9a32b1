"""What the served models are doing, counted in the replicas and exported by Ray's metrics
agent on every node (Ray Serve's public `ray.serve.metrics`, which adds the deployment, replica
and application labels): no extra server, on a cluster too.

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

import contextlib
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from ray.serve import metrics

from distillery.compat.logs import session_logs
from distillery.serving.batcher import Answer, OnPass
from distillery.serving.protocol import MODEL_VERSION, ProtocolError

SECONDS = [0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]
COUNTS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096]
MODEL = ("model", "version")
PROTOCOL, OUTCOME = (*MODEL, "protocol"), (*MODEL, "protocol", "outcome")
# attribute: (kind, name, description, labels[, histogram buckets]). Ray's agent rebuilds a
# histogram's _sum from bucket midpoints: a mean (the batch size) comes from two counters.
Counter, Gauge, Histogram = metrics.Counter, metrics.Gauge, metrics.Histogram
METRICS = {
    "requests": (Counter, "distillery_requests", "Inference requests by model, protocol, outcome", OUTCOME),
    "latency": (Histogram, "distillery_request_seconds", "Answered, arrival to reply", PROTOCOL, SECONDS),
    "queue": (Histogram, "distillery_queue_seconds", "Waiting in the batcher for a pass", MODEL, SECONDS),
    "forward": (Histogram, "distillery_forward_seconds", "One forward pass", MODEL, SECONDS),
    "batch": (Histogram, "distillery_batch_size", "Requests per forward pass", MODEL, COUNTS),
    "passes": (Counter, "distillery_forward_passes", "Forward passes", MODEL),
    "batched": (Counter, "distillery_batched_requests", "Requests answered by forward passes", MODEL),
    "images": (Histogram, "distillery_request_images", "Images per request", MODEL, COUNTS),
    "cascade": (Counter, "distillery_cascade_rows", "Rows a cascade kept (escalated=false) or sent on",
                (*MODEL, "escalated")),
    "rung": (Gauge, "distillery_auto_rung", "auto's decision: its place on the ladder (0: most accurate)",
             ("model",)),
    "auto": (Counter, "distillery_auto_requests", "The model that answered each auto request", ("model",)),
    "spills": (Counter, "distillery_auto_spills", "auto requests sent to a faster model at arrival", ()),
    "handovers": (Counter, "distillery_auto_handovers", "auto requests moved to a faster model waiting", ()),
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


class ReplicaMetrics:
    """One per replica process: Ray keeps a metric per name and process."""

    def __init__(self) -> None:
        self.log_share = 0.0  # `serve.request_log_sample`
        for attr, (kind, name, description, tag_keys, *buckets) in METRICS.items():
            options = {"boundaries": buckets[0]} if buckets else {}
            setattr(self, attr, kind(name, description, tag_keys=tag_keys, **options))

    @contextlib.contextmanager
    def counted(self, model: str, protocol: str, record: dict | None = None) -> Iterator[dict]:
        """Count one inference request under its outcome: a ProtocolError (re-raised) is the
        client's (4xx) or a refusal under overload (503); any other error a failure. Yields the
        request's record (`record`, or a new one), which the handler fills (id, images, times)
        for the request log."""
        error: BaseException | None = None
        start, record = time.perf_counter(), {} if record is None else record
        try:
            yield record
        except BaseException as e:
            error = e
            raise
        finally:
            seconds, tags = time.perf_counter() - start, {"model": model, "version": MODEL_VERSION,
                                                          "protocol": protocol}
            self.requests.inc(tags={**tags, "outcome": outcome(error)})
            if error is None:
                self.latency.observe(seconds, tags=tags)
            if self.log_share and random.random() < self.log_share:
                log.info(json.dumps({"t": round(time.time(), 6), **tags, "outcome": outcome(error),
                                     "ms": round(1e3 * seconds, 3), **record}))

    def answered(self, model: str, images: int, answer: Answer, record: dict | None = None) -> None:
        """A request's answer: its images and queue time; its record gets those, the pass's time
        and the model that answered."""
        tags = {"model": model, "version": MODEL_VERSION}
        queued_s = answer.queued_s
        if record is not None:
            record.update(answered_by=model, images=images, queue_ms=round(1e3 * queued_s, 3),
                          forward_ms=round(1e3 * answer.forward_s, 3), batched_requests=answer.together)
        self.images.observe(images, tags=tags)
        self.queue.observe(queued_s, tags=tags)

    def on_pass(self, model: str, module: object) -> OnPass:
        """The batcher's hook for `model` (its forward passes); `module` is what runs, read for a
        cascade's counts."""
        tags = {"model": model, "version": MODEL_VERSION}
        seen = {"rows": 0, "escalated": 0}

        def observe(requests: int, images: int, seconds: float) -> None:
            self.batch.observe(requests, tags=tags)
            self.passes.inc(tags=tags)
            self.batched.inc(requests, tags=tags)
            self.forward.observe(seconds, tags=tags)
            if hasattr(module, "escalated"):
                self._cascade(tags, module, seen)

        return observe

    def _cascade(self, tags: dict[str, str], module: object, seen: dict[str, int]) -> None:
        """The rows a cascade answered since the last pass, kept by its small model or escalated."""
        escalated, rows = module.escalated - seen["escalated"], module.rows - seen["rows"]
        seen.update(rows=module.rows, escalated=module.escalated)
        for flag, n in (("true", escalated), ("false", rows - escalated)):
            if n:
                self.cascade.inc(n, tags={**tags, "escalated": flag})

    def auto_decision(self, rung: int) -> None:
        self.rung.set(rung, tags={"model": "auto"})

    def auto_answer(self, model: str, spilled: bool) -> None:
        self.auto.inc(tags={"model": model})
        if spilled:
            self.spills.inc()

    def handed_over(self, n: int) -> None:
        if n:
            self.handovers.inc(n)


class NoMetrics(ReplicaMetrics):
    """`serve.metrics: false`: every call a no-op (the benchmark's 'off')."""

    def __init__(self) -> None:
        pass

    @contextlib.contextmanager
    def counted(self, model: str, protocol: str, record: dict | None = None) -> Iterator[dict]:
        yield {} if record is None else record

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
