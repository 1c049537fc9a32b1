import csv
import json

import pytest

from distillery.measure.frontier import CSV_COLUMNS, pareto_front, recommend, validate, write_frontier


def rec(name, p50, acc, *, role="variant", parent="teacher", not_faster=False, throughput=None, size=40_000,
        macs=200_000, numerics="fp32", test=None):
    """`acc` is the validation accuracy choices read; `test` (default: the same) only reports."""
    return {"name": name, "parent": parent, "recipe": f"prune_channels(mac_ratio=2) -> finetune | {name}",
            "val_accuracy": acc, "test_accuracy": acc if test is None else test, "params": 10_000,
            "macs": macs, "numerics": numerics, "size_bytes": size,
            "best_mode": "eager",
            "p50_ms": p50, "p99_ms": p50 * 1.5, "throughput": throughput or 1000 / p50, "peak_fraction": 0.12,
            "not_faster": not_faster, "role": role}


@pytest.fixture
def records():
    return [
        rec("teacher", 2.0, 0.99, role="teacher", parent=None, size=400_000, macs=2_000_000),
        rec("student", 0.5, 0.97, role="student"),
        rec("scratch", 0.5, 0.95, role="student_scratch"),  # dominated by student (same speed, less accurate)
        rec("int8", 0.3, 0.96, parent="student", size=12_000, numerics="int8_static"),
        rec("slow_int8", 0.6, 0.97, parent="student", not_faster=True, numerics="int8_dynamic"),  # dominated
        rec("pruned", 0.2, 0.90, parent="student", size=20_000, macs=80_000),
    ]


def test_pareto_excludes_dominated_points_and_sorts_by_latency(records):
    assert pareto_front(records) == ["pruned", "int8", "student", "teacher"]


def test_pareto_equal_points_are_both_on_the_front_and_a_single_record_is_its_front():
    assert pareto_front([rec("a", 1.0, 0.9), rec("b", 1.0, 0.9)]) == ["a", "b"]
    assert pareto_front([rec("only", 1.0, 0.5)]) == ["only"]
    assert pareto_front([]) == []


def test_pareto_on_other_axes(records):
    # throughput is better when higher: minimise size, maximise throughput instead
    assert pareto_front(records, x="size_bytes", y="throughput") == ["int8", "pruned"]


def test_recommend_respects_the_floor(records):
    assert recommend(records, 0.95)["name"] == "int8"
    assert recommend(records, 0.97)["name"] == "student"
    assert recommend(records, 0.0)["name"] == "pruned"
    r = recommend(records, 0.985)
    assert r["name"] == "teacher" and r["floor"] == 0.985
    assert "2.000 ms" in r["reason"] and "99.00%" in r["reason"]


def test_recommend_skips_not_faster_variants():
    records = [rec("parent", 1.0, 0.95), rec("child", 0.9, 0.96, not_faster=True)]
    assert recommend(records, 0.9)["name"] == "parent"


def test_recommend_breaks_ties_on_throughput_then_size():
    a, b = rec("a", 1.0, 0.9, throughput=900), rec("b", 1.0, 0.9, throughput=1000)
    c = rec("c", 1.0, 0.9, throughput=1000, size=10)
    assert recommend([a, b], 0.5)["name"] == "b"
    assert recommend([a, b, c], 0.5)["name"] == "c"


def test_recommend_none_when_nothing_meets_the_floor(records):
    assert recommend(records, 0.995) is None
    only_slow = [rec("slow", 1.0, 0.99, not_faster=True)]
    assert recommend(only_slow, 0.9) is None


def test_missing_key_names_the_record_and_key(records):
    del records[3]["p99_ms"]
    with pytest.raises(ValueError, match=r"'int8'.*missing key 'p99_ms'"):
        validate(records)
    with pytest.raises(ValueError, match=r"'int8'.*missing key 'p99_ms'"):
        recommend(records, 0.9)
    with pytest.raises(ValueError, match="missing key 'p50_ms'"):
        pareto_front([{"name": "x", "val_accuracy": 0.5}])
    with pytest.raises(ValueError, match=r"#0.*missing key 'name'"):
        validate([{"p50_ms": 1.0}])


def test_bad_role_and_repeated_name(records):
    with pytest.raises(ValueError, match="role 'boss'"):
        validate([rec("x", 1.0, 0.9, role="boss")])
    with pytest.raises(ValueError, match="'student': name used twice"):
        validate([*records, rec("student", 1.0, 0.9)])


def test_write_frontier_writes_four_files(tmp_path, records):
    machine = {"cpu": "Test CPU 9000", "logical_cores": 2, "torch": "2.13.0"}
    settings = {"threads": 1, "latency_runs": 200, "warmup": 20, "throughput_batch": 256,
                "throughput_runs": 10}
    paths = write_frontier(tmp_path / "report", records, floor=0.95, machine=machine, settings=settings)

    assert [p.name for p in paths] == ["frontier.json", "frontier.csv", "frontier.md", "frontier.png"]
    assert all(p.is_file() for p in paths)
    # no temp files
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(p.name for p in paths)

    report = json.loads(paths[0].read_text())
    assert report["variants"] == records
    assert report["pareto"] == ["pruned", "int8", "student", "teacher"]
    assert report["recommended"]["name"] == "int8"
    assert (report["machine"], report["settings"], report["floor"]) == (machine, settings, 0.95)

    with open(paths[1], newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) - 1 == len(records)
    assert [row[0] for row in rows[1:]] == [r["name"] for r in records]

    md = paths[2].read_text()
    assert "**Recommended** (int8)" in md
    assert "Test CPU 9000" in md and "1 thread(s)" in md
    assert "not faster than its parent" in md
    assert "finetune \\| int8" in md  # a pipe in a recipe is escaped, not a new column
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(records)
    assert all(line.count(" | ") == table[0].count(" | ") for line in table[2:])

    png = paths[3].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000


def test_write_frontier_without_a_recommendation(tmp_path, records):
    paths = write_frontier(tmp_path, records, floor=0.999, machine={}, settings={})
    assert "No variant" in paths[2].read_text()
    assert json.loads(paths[0].read_text())["recommended"] is None
    with pytest.raises(ValueError, match="no variant records"):
        write_frontier(tmp_path, [], floor=0.9, machine={}, settings={})


def test_recommend_prefers_the_more_accurate_of_two_equally_fast_records():
    fast_alone = rec("alone", p50=0.080, acc=0.986)
    distilled = rec("distilled", p50=0.083, acc=0.992)  # 4% slower: timing noise on one machine
    assert recommend([fast_alone, distilled], floor=0.98)["name"] == "alone"  # no margin: strictly fastest
    best = recommend([fast_alone, distilled], floor=0.98, margin=0.05)
    assert best["name"] == "distilled" and "equally fast" in best["reason"]
    # another network, 12.5% slower: outside the margin
    slower = rec("slower", p50=0.090, acc=0.999, macs=300_000)
    assert recommend([fast_alone, slower], floor=0.98, margin=0.05)["name"] == "alone"


def test_the_same_network_timed_slower_still_counts_as_equally_fast():
    alone = rec("alone", p50=0.077, acc=0.986)
    distilled = rec("distilled", p50=0.082, acc=0.992)  # 6.5% slower, same MACs, params and numerics
    sparse = rec("sparse", p50=0.070, acc=0.989, size=20_000)  # zeros stored sparsely, computed densely
    best = recommend([alone, distilled, sparse], floor=0.98, margin=0.05)
    assert best["name"] == "distilled" and "same network" in best["reason"]
    int8 = rec("int8", p50=0.082, acc=0.999, numerics="int8_static")  # other arithmetic: not the same network
    assert recommend([alone, int8], floor=0.98, margin=0.05)["name"] == "alone"


def test_pareto_the_same_computation_timed_faster_does_not_displace_the_more_accurate():
    alone, distilled = rec("alone", 0.077, 0.986), rec("distilled", 0.083, 0.992)  # one network, timer noise
    assert pareto_front([alone, distilled]) == ["distilled"]
    assert pareto_front([alone, rec("other", 0.083, 0.992, macs=300_000)]) == ["alone", "other"]


def test_recommend_names_the_variants_whose_accuracy_ties_within_the_noise():
    # 360 validation images: 0.97 vs 0.9667 is one or two images, a tie; 0.90 is 25 images fewer.
    fast, close, far = (dict(r, val_images=360) for r in (rec("fast", 0.2, 0.97), rec("close", 0.5, 0.9667),
                                                           rec("far", 0.6, 0.90)))
    reason = recommend([fast, close, far], 0.5)["reason"]
    assert "ties with that of close: within the 95% noise of 360 validation images " \
        "(one image is 0.28 points)" in reason and reason.endswith("Chosen on validation.")
    assert "far" not in reason.split("ties with")[1]
    # n unknown
    assert "ties" not in recommend([rec("fast", 0.2, 0.97), rec("close", 0.5, 0.9667)], 0.5)["reason"]


class Sealed(float):
    """A test figure no choice may read: any comparison, arithmetic or formatting raises."""

    def _refuse(self, *_):
        raise AssertionError("a choice read a test figure")

    __lt__ = __le__ = __gt__ = __ge__ = __eq__ = __ne__ = __add__ = __sub__ = __mul__ = __neg__ = \
        __float__ = __format__ = __hash__ = _refuse


def test_choices_read_no_test_figure(records):
    """The recommendation, the front and the search's choice are made on `choice_view`: records
    whose test figures refuse to be read give the choices of the same records with any others."""
    from distillery.config.search import BudgetConfig
    from distillery.measure.frontier import choice_view
    from distillery.search.budget import bounds, choose

    sealed = [dict(r, test_accuracy=Sealed(0.5), test_images=Sealed(360), test_escalation=Sealed(0.1))
              for r in records]
    reversed_test = [dict(r, test_accuracy=1 - r["test_accuracy"]) for r in records]
    assert all(not k.startswith("test_") for r in choice_view(sealed) for k in r)
    for floor in (0.0, 0.95, 0.97, 0.999):
        assert recommend(choice_view(sealed), floor, 0.05) == recommend(reversed_test, floor, 0.05) \
            == recommend(records, floor, 0.05)
    assert pareto_front(choice_view(sealed)) == pareto_front(reversed_test) == pareto_front(records)
    budget = BudgetConfig(max_p50_ms=0.55, as_fast_as=None)
    picked = choose(sealed, budget, bounds(budget))
    assert picked["chosen"] is sealed[1] and picked["within"] == ["student", "int8", "scratch", "pruned"]
    assert choose(reversed_test, budget, bounds(budget))["within"] == picked["within"]


def test_the_plot_draws_intervals_at_100_percent_and_for_a_model_that_could_not_be_scored():
    from distillery.measure.frontier import plot_png

    perfect = dict(rec("perfect", 0.2, 1.0), test_images=48)  # Wilson's upper bound rounds below 1.0
    unscored = dict(rec("unscored", 0.3, 0.9, test=float("nan")), test_images=48)
    png = plot_png([perfect, unscored, dict(rec("same", 0.2, 1.0), test_images=48)], ["perfect"], None, 0.9)
    assert png.startswith(b"\x89PNG")
