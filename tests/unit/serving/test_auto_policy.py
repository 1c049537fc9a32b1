"""`auto`'s adaptation (`distillery.serving.auto_policy`): the ladder, a request's choice, and the
controller stepping down under load and back up, on made-up latencies with a made-up clock."""

from __future__ import annotations

import pytest

from distillery.serving.auto_policy import Controller, choose, ladder, spill
from distillery.serving.predictor import ServedModel
from distillery.serving.protocol import ProtocolError


def _m(name, acc, p50):
    return ServedModel(name, "x", [1, 8, 8], 10, acc, acc, p50, "eager")


TEACHER, STUDENT, PRUNED, TINY = _m("teacher", 0.990, 5.0), _m("student", 0.985, 2.0), \
    _m("pruned", 0.98, 1.5), _m("tiny", 0.90, 0.3)
SLOW_AND_WORSE = _m("slow_worse", 0.95, 3.0)
RUNGS = ladder([TINY, STUDENT, SLOW_AND_WORSE, TEACHER, PRUNED])


def test_the_ladder_is_most_accurate_first_and_each_rung_faster():
    assert [m.name for m in RUNGS] == ["teacher", "student", "pruned", "tiny"]  # slow_worse helps nobody
    tie = ladder([_m("a", 0.95, 1.2), _m("b", 0.95, 0.7)])
    assert [m.name for m in tie] == ["b"]  # equally accurate: the faster only


def test_a_request_spills_one_rung_faster_per_budget_of_queued_work_down_to_the_fastest():
    assert spill(RUNGS, TEACHER, backlog_ms=29.0, budget_ms=30.0) is TEACHER      # under one budget: stays
    assert spill(RUNGS, TEACHER, backlog_ms=30.0, budget_ms=30.0) is STUDENT
    assert spill(RUNGS, TEACHER, backlog_ms=65.0, budget_ms=30.0) is PRUNED
    assert spill(RUNGS, STUDENT, backlog_ms=500.0, budget_ms=30.0) is TINY       # never past the fastest
    assert spill(RUNGS, TEACHER, backlog_ms=500.0, budget_ms=None) is TEACHER    # no decision yet: no spill


def test_a_request_gets_the_shared_rung_within_its_floor():
    assert choose(RUNGS, {}, None, None) is TEACHER  # before any decision: the most accurate
    assert choose(RUNGS, {"model": "pruned"}, None, None) is PRUNED
    assert choose(RUNGS, {"model": "tiny"}, 0.98, None) is PRUNED  # the floor wins over speed
    assert choose(RUNGS, {"model": "student"}, 0.98, None) is STUDENT
    with pytest.raises(ProtocolError) as info:
        choose(RUNGS, {}, 0.995, None)
    assert info.value.status == 422 and "teacher" in info.value.message and "0.9900" in info.value.message


def test_a_request_objective_takes_the_most_accurate_rung_measured_within_it():
    decision = {"model": "teacher", "p95_ms": {"teacher": 80.0, "student": 30.0, "pruned": None, "tiny": 5.0}}
    assert choose(RUNGS, decision, None, 100.0) is TEACHER
    assert choose(RUNGS, decision, None, 50.0) is STUDENT
    assert choose(RUNGS, decision, None, 20.0) is PRUNED  # not measured lately: tried
    all_measured = decision | {"p95_ms": {"teacher": 80.0, "student": 30.0, "pruned": 25.0, "tiny": 5.0}}
    assert choose(RUNGS, all_measured, None, 1.0) is TINY  # nothing within: the fastest
    assert choose(RUNGS, decision, 0.985, 20.0) is STUDENT  # the floor stops the descent


def _load(c: Controller, t0: float, seconds: float, rate: float, latency: dict[str, float]) -> float:
    """Feed `rate` requests/s for `seconds`, each answered by the controller's current pick in
    `latency[pick]` ms; return the end time."""
    t = t0
    while t < t0 + seconds:
        model = c.update(t)
        c.observe([(t, model, latency[model])])
        t += 1 / rate
    return t


def test_the_controller_steps_down_under_overload_and_back_up_when_it_ends():
    c = Controller(["teacher", "student", "tiny"], slo_ms=100.0)
    calm = {"teacher": 20.0, "student": 10.0, "tiny": 5.0}
    t = _load(c, 0.0, 5.0, 50, calm)
    assert c.names[c.level] == "teacher" and c.history == []  # low load: the most accurate, no flapping
    overloaded = {"teacher": 250.0, "student": 40.0, "tiny": 5.0}  # the teacher cannot keep up
    t = _load(c, t, 6.0, 200, overloaded)
    assert c.names[c.level] == "student" and c.capacity[0][0] == pytest.approx(200, rel=0.1)
    t = _load(c, t, 10.0, 200, overloaded)  # still 200/s: the teacher's known capacity keeps it down
    assert c.names[c.level] == "student"
    t = _load(c, t, 5.0, 50, calm)  # load falls: back up
    assert c.names[c.level] == "teacher"
    assert [m for _, m in c.history] == ["student", "teacher"]


def test_a_forgotten_capacity_lets_the_controller_try_again_and_more_replicas_raise_it():
    c = Controller(["teacher", "student"], slo_ms=100.0, forget_s=5.0)
    busy = {"teacher": 250.0, "student": 20.0}
    t = _load(c, 0.0, 4.0, 100, busy)
    assert c.names[c.level] == "student"
    # twice the replicas: twice the capacity
    assert c._fits(0, t, replicas=2) and not c._fits(0, t, replicas=1)
    t = _load(c, t, 6.0, 100, busy)
    assert [m for _, m in c.history][:2] == ["student", "teacher"]  # tried again once forgotten...
    assert c.names[c.level] == "student"  # ...and stepped down again: still too much for it


def test_a_queue_steps_down_before_any_slow_answer_arrives():
    c = Controller(["teacher", "student"], slo_ms=100.0)
    _load(c, 0.0, 3.0, 50, {"teacher": 20.0, "student": 10.0})
    c.observe([], {"teacher": 75.0}, now=3.0)  # unanswered for 75 ms: past 60% of the objective
    assert c.update(3.0) == "student"
    c2 = Controller(["teacher", "student"], slo_ms=100.0)
    _load(c2, 0.0, 3.0, 50, {"teacher": 20.0, "student": 10.0})
    c2.observe([], {"teacher": 30.0}, now=3.0)
    assert c2.update(3.0) == "teacher"


def test_a_queue_in_any_replica_counts_until_its_report_is_stale():
    c = Controller(["teacher", "student"], slo_ms=100.0)
    c.observe([], {"teacher": 80.0}, now=1.00)  # replica 1: a request waiting 80 ms
    c.observe([], {}, now=1.05)                 # replica 2: nothing waiting
    assert c.pressure("teacher", 1.1) == 80.0
    assert c.pressure("teacher", 1.5) is None   # replica 1's report is 0.5 s old: stale



def _spilling(c: Controller, t0: float, seconds: float, rate: float, share: dict[str, float]) -> float:
    """`rate` requests/s answered by the current pick in 40 ms (within the objective), with
    replicas reporting every 0.1 s that `share[pick]` of them were spilled to a faster rung."""
    t = t0
    while t < t0 + seconds:
        n = round(rate / 10)
        model = c.update(t)
        c.observe([(t + i / rate, model, 40.0) for i in range(n)], now=t, spilled=round(share[model] * n))
        t += 0.1
    return t


def test_replicas_spilling_past_a_share_of_requests_step_the_controller_down_though_latency_looks_fine():
    names = ["teacher", "student", "tiny"]
    calm = Controller(names, slo_ms=100.0)
    _spilling(calm, 0.0, 3.0, 200, {"teacher": 0.05})  # the odd burst spills: no step
    assert calm.names[calm.level] == "teacher" and calm.history == []
    busy = Controller(names, slo_ms=100.0)
    # half spilled: past the teacher's capacity
    _spilling(busy, 0.0, 3.0, 200, {"teacher": 0.5, "student": 0.0})
    assert busy.capacity[0][0] == pytest.approx(200, rel=0.1)
    # One step only: the student keeps up, spilling nothing.
    assert [m for _, m in busy.history] == ["student"]
