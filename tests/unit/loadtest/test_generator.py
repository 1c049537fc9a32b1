"""The load generator's runner: a load runs at Ray's worker priority, in its own thread. No Ray."""

from __future__ import annotations

import asyncio
import os
import threading

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
