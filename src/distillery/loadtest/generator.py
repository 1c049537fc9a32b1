"""An HTTP load generator for the Open Inference Protocol, in one process: asyncio, one
keep-alive connection pool (aiohttp), the request body encoded once.

closed loop  `concurrency` clients, each sending its next request when the last one answers,
             for `duration_s`: the throughput a given number of users gets.
open loop    requests sent on a schedule of (duration_s, requests/s) steps whatever the
             server does, latency counted from the *scheduled* send time: a stalled server
             cannot hide its queue by slowing the sender (no coordinated omission).

Every request is recorded (scheduled and actual send time, latency, status, answering
variant); `per_second` aggregates them, and a sampler records the deployment's replica count.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import statistics
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import aiohttp

ReplicaFn = Callable[[], Awaitable[int | None]]
T = TypeVar("T")


@dataclass
class Sample:
    scheduled: float     # s since the run started: when the request was due
    sent: float          # when it actually left
    latency_ms: float    # from `scheduled` to the full answer
    status: int          # HTTP status; CONNECTION_FAILED or TIMED_OUT when there was none
    variant: str | None  # parameters.variant of a 200 answer


CONNECTION_FAILED, TIMED_OUT = 0, -1  # a request without an HTTP status
LOST_KINDS = {str(CONNECTION_FAILED): "connection failed",
              str(TIMED_OUT): "no answer in time (client timeout)",
              "408": "server's request timeout", "500": "server error"}


def lost_by_kind(errors: dict[str, int]) -> dict[str, int]:
    """{what went wrong: count} for the requests lost, from {status: count} of everything but
    200: a 503 is a request refused under overload (backpressure), not lost."""
    return {LOST_KINDS.get(code, f"HTTP {code}"): n for code, n in sorted(errors.items())
            if code != "503" and n}


def infer_body(x: list[float], shape: list[int], **parameters: Any) -> bytes:
    doc = {"inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": x}]}
    return json.dumps({**doc, **({"parameters": parameters} if parameters else {})}).encode()


async def _send(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict, t0: float,
                scheduled: float) -> Sample:
    sent = time.perf_counter() - t0
    try:
        async with session.post(url, data=body, headers=headers) as response:
            payload = await response.read()
            status = response.status
    except asyncio.TimeoutError:
        payload, status = b"", TIMED_OUT
    except aiohttp.ClientError:
        payload, status = b"", CONNECTION_FAILED
    latency = 1e3 * (time.perf_counter() - t0 - scheduled)
    variant = None
    if status == 200:
        # The variant name sits near the end of the reply: find it without parsing the logits.
        tail = payload[-300:].decode(errors="replace")
        start = tail.find('"variant":"')
        if start >= 0:
            variant = tail[start + 11:tail.find('"', start + 11)]
    return Sample(scheduled, sent, latency, status, variant)


def _session(connections: int, timeout_s: float) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=connections, keepalive_timeout=60)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s))


async def closed_loop(url: str, body: bytes, concurrency: int, duration_s: float, headers: dict,
                      timeout_s: float = 60.0, stop: asyncio.Event | None = None,
                      into: list[Sample] | None = None) -> list[Sample]:
    """`concurrency` clients back to back for `duration_s`, or until `stop` is set if sooner
    (requests in flight at the end finish). Each answer is appended to `into` as it arrives,
    where given, so that a caller can watch the load and decide when to stop it."""
    samples: list[Sample] = [] if into is None else into
    async with _session(concurrency, timeout_s) as session:
        t0 = time.perf_counter()

        async def client() -> None:
            while time.perf_counter() - t0 < duration_s and not (stop and stop.is_set()):
                samples.append(await _send(session, url, body, headers, t0, time.perf_counter() - t0))
        await asyncio.gather(*(client() for _ in range(concurrency)))
    return samples


def schedule_times(steps: list[tuple[float, float]]) -> list[float]:
    """Send times (s from the start) for steps of (duration_s, requests/s), evenly spaced."""
    times, start = [], 0.0
    for duration, rate in steps:
        n = int(round(duration * rate))
        times += [start + i / rate for i in range(n)]
        start += duration
    return times


async def open_loop(url: str, body: bytes, steps: list[tuple[float, float]], headers: dict,
                    max_connections: int = 256, timeout_s: float = 60.0,
                    stop: asyncio.Event | None = None) -> list[Sample]:
    """Requests on the schedule, never waiting for answers before the next send; none sent once
    `stop` is set, where given (those in flight then finish)."""
    times = schedule_times(steps)
    async with _session(max_connections, timeout_s) as session:
        t0 = time.perf_counter()
        tasks = []
        for due in times:
            delay = due - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            if stop is not None and stop.is_set():
                break
            tasks.append(asyncio.create_task(_send(session, url, body, headers, t0, due)))
        return list(await asyncio.gather(*tasks))


async def sample_replicas(replicas: ReplicaFn, every_s: float, stop: asyncio.Event,
                          t0: float) -> list[tuple[float, int | None]]:
    """(s since t0, replica count) every `every_s` until `stop` is set."""
    out = []
    while not stop.is_set():
        out.append((round(time.perf_counter() - t0, 3), await replicas()))
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except asyncio.TimeoutError:
            pass
    return out


async def with_replicas(run: Awaitable[list[Sample]], replicas: ReplicaFn | None,
                        every_s: float = 1.0) -> tuple[list[Sample], list[tuple[float, int | None]], float]:
    """Run a load while sampling replicas; return (samples, replica samples, generator CPU share)."""
    stop, t0, cpu0 = asyncio.Event(), time.perf_counter(), time.process_time()
    sampler = asyncio.create_task(sample_replicas(replicas, every_s, stop, t0)) if replicas else None
    samples = await run
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    stop.set()
    return samples, (await sampler if sampler else []), cpu / max(wall, 1e-9)


def run_niced(coro: Coroutine[Any, Any, T], niceness: int = 15) -> T:
    """Run a load in a thread of its own at `niceness`, Ray's for its worker processes: at the
    default priority a load that fills the cores starved a starting replica (nice 15) until
    the load ended, so autoscaling could not help. Latency counts from the scheduled time, so
    a generator slowed by the machine shows up as latency, not as less load."""
    out: dict[str, Any] = {}

    def work() -> None:
        with contextlib.suppress(OSError):  # raising one's own niceness needs no privilege
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
        # The process's objects so far (torch, Ray's driver) leave the garbage collector's view
        # during the load: a full collection over them stalled the sender here.
        gc.freeze()
        try:
            out["value"] = asyncio.run(coro)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            out["error"] = e
        finally:
            gc.unfreeze()

    thread = threading.Thread(target=work, name="loadgen")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def summarize(samples: list[Sample], duration_s: float) -> dict[str, Any]:
    """Totals of one load level: requests, 200s, errors by status, throughput, p50/p95/p99."""
    ok = [s.latency_ms for s in samples if s.status == 200]
    return {"requests": len(samples), "ok": len(ok),
            "errors": dict(Counter(str(s.status) for s in samples if s.status != 200)),
            "throughput": len(ok) / duration_s if duration_s > 0 else 0.0,
            "p50_ms": percentile(ok, 50), "p95_ms": percentile(ok, 95), "p99_ms": percentile(ok, 99),
            "variants": dict(Counter(s.variant for s in samples if s.variant))}


def per_second(samples: list[Sample]) -> list[dict[str, Any]]:
    """One row per second of scheduled time, up to the last second a request was due in:
    answered requests, throughput, p50/p95/p99, errors. A second without a request (a stalled
    client or server) is a row of zeros rather than missing, so row i is second i."""
    buckets: dict[int, list[Sample]] = {}
    for s in samples:
        buckets.setdefault(int(s.scheduled), []).append(s)
    rows = ((sec, summarize(buckets.get(sec, []), 1.0)) for sec in range(max(buckets, default=-1) + 1))
    return [{"second": sec, **{k: v for k, v in row.items() if k != "variants"}} for sec, row in rows]


def records(samples: list[Sample]) -> list[dict[str, Any]]:
    return [asdict(s) for s in samples]
