"""The load generator's runner: a load runs at Ray's worker priority, in its own thread. No Ray."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable

import pytest

from distillery.loadtest import generator


def test_a_load_runs_niced_in_its_own_thread_and_returns_its_result():
    async def load():
        await asyncio.sleep(0)
        return threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = os.getpriority(os.PRIO_PROCESS, 0)
    tid, niceness = generator.run_niced(load())
    assert tid != threading.get_native_id() and niceness == max(before, 15)
    assert os.getpriority(os.PRIO_PROCESS, 0) == before  # this thread keeps its priority


def test_a_failing_load_raises_in_the_caller():
    async def load():
        raise ValueError("no server")

    with pytest.raises(ValueError, match="no server"):
        generator.run_niced(load())


async def _with_server(answer_s: float, load, on_request=lambda: None):
    """`load(url)` against a real server on 127.0.0.1 that calls `on_request()` on each request
    and answers it after `answer_s` seconds."""
    from aiohttp import web

    async def slow(request):
        await request.read()
        on_request()
        await asyncio.sleep(answer_s)
        return web.Response(text='{"parameters":{"variant":"slow"}}', content_type="application/json")

    app = web.Application()
    app.router.add_post("/v2/models/m/infer", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        return await load(f"http://127.0.0.1:{port}/v2/models/m/infer")
    finally:
        await runner.cleanup()


def test_the_open_loop_sends_on_schedule_without_waiting_for_answers():
    """A server that takes 2 s per answer: an open loop of 10 requests/s for 1 s sends all ten
    before the first answer, and counts latency from the scheduled time."""
    samples = generator.run_niced(_with_server(2.0, lambda url: generator.open_loop(url, b"{}", [(1.0, 10.0)],
                                                                                     {})))
    assert [s.status for s in samples] == [200] * 10 and {s.variant for s in samples} == {"slow"}
    assert [s.scheduled for s in samples] == pytest.approx([i / 10 for i in range(10)])
    first_answer = min(s.scheduled + s.latency_ms / 1e3 for s in samples)
    assert max(s.sent for s in samples) < first_answer  # a closed loop would send one at a time
    assert all(s.sent >= s.scheduled and s.latency_ms >= 2000 for s in samples)


def _stop_at(requests: int) -> tuple[asyncio.Event, list[int], Callable[[], None]]:
    """(an event set when the server has received `requests` requests, what it received, the
    server's on_request)."""
    stop, received = asyncio.Event(), []

    def count() -> None:
        received.append(1)
        if len(received) == requests:
            stop.set()
    return stop, received, count


def test_a_closed_loop_ends_when_told_to_stop_and_sends_nothing_after():
    """Two clients back to back, for at most 60 s, told to stop when the server has received its
    10th request: the load ends with what was in flight then (the 10th, and at most one more
    already sent), and sends nothing after."""
    stop, received, count = _stop_at(10)
    samples = generator.run_niced(_with_server(
        0.01, lambda url: generator.closed_loop(url, b"{}", 2, 60.0, {}, stop=stop), count))
    assert 10 <= len(samples) <= 11 and len(received) == len(samples), (len(samples), len(received))
    assert all(s.status == 200 for s in samples)


def test_a_caller_watches_a_closed_loop_s_answers_as_they_arrive_and_stops_it():
    """The caller's list fills while the load runs: the caller stops it once it holds 6 answers."""
    seen: list[generator.Sample] = []

    async def watch_and_stop(url: str) -> tuple[list, int]:
        stop = asyncio.Event()
        load = asyncio.ensure_future(generator.closed_loop(url, b"{}", 2, 60.0, {}, stop=stop, into=seen))
        while len(seen) < 6:
            await asyncio.sleep(0.005)
        at_stop = len(seen)
        stop.set()
        return await load, at_stop

    samples, at_stop = generator.run_niced(_with_server(0.01, watch_and_stop))
    assert samples is seen and 6 <= at_stop <= len(samples) <= at_stop + 2  # what was in flight finished


def test_an_open_loop_told_to_stop_sends_no_more_and_its_requests_in_flight_finish():
    """100 requests/s scheduled for 60 s against a server that answers in 0.3 s, stopped when
    the server has received its 20th: the load ends with the few already on their way (not 60 s
    of them), and every request sent is answered."""
    stop, received, count = _stop_at(20)
    samples = generator.run_niced(_with_server(
        0.3, lambda url: generator.open_loop(url, b"{}", [(60.0, 100.0)], {}, stop=stop), count))
    assert 20 <= len(samples) <= 25 and len(received) == len(samples), (len(samples), len(received))
    assert all(s.status == 200 and s.latency_ms >= 300 for s in samples)  # in flight at the stop: answered


def test_lost_requests_are_named_by_what_went_wrong():
    from distillery.loadtest.generator import lost_by_kind

    kinds = lost_by_kind({"503": 7, "0": 2, "-1": 1, "500": 3, "418": 1})
    assert kinds == {"no answer in time (client timeout)": 1, "connection failed": 2, "server error": 3,
                     "HTTP 418": 1}


def test_a_second_without_requests_is_a_row_of_zeros_so_rows_index_seconds():
    def sample(at: float, status: int = 200) -> generator.Sample:
        return generator.Sample(scheduled=at, sent=at, latency_ms=5.0, status=status, variant=None)

    rows = generator.per_second([sample(0.2), sample(0.7, generator.TIMED_OUT), sample(3.5)])
    assert [r["second"] for r in rows] == [0, 1, 2, 3]
    assert [(r["requests"], r["ok"], r["errors"]) for r in rows] == [
        (2, 1, {"-1": 1}), (0, 0, {}), (0, 0, {}), (1, 1, {})]
    assert rows[1]["throughput"] == 0.0 and rows[1]["p99_ms"] is None
    assert generator.per_second([]) == []
