import pytest

from distillery.config.search import BudgetConfig
from distillery.search.budget import bounds, choose, misses


def _rec(name, val, p50, throughput=1000.0, size=10_000, macs=100, params=10, numerics="fp32"):
    return {"name": name, "val_accuracy": val, "p50_ms": p50, "throughput": throughput, "size_bytes": size,
            "macs": macs, "params": params, "numerics": numerics}


STUDENT = _rec("student", 0.98, 0.100)


def test_the_most_accurate_within_the_budget_is_chosen_and_the_next_one_is_the_runner_up():
    records = [_rec("fast", 0.97, 0.05), _rec("best-but-slow", 0.995, 0.30, macs=90),
               _rec("good", 0.99, 0.09), _rec("good-slower", 0.99, 0.095, macs=80)]
    limits = bounds(BudgetConfig(), STUDENT, margin=0.05)
    choice = choose(records, BudgetConfig(), limits)
    assert choice["chosen"]["name"] == "good"  # ties on validation: the faster
    assert choice["runner_up"]["name"] == "good-slower"
    assert "best-but-slow" not in choice["within"] and "as fast as student" in choice["message"]


def test_the_same_network_as_the_reference_meets_its_latency_whatever_the_timer_said():
    same = _rec("same-net", 0.99, 0.130)  # the student's MACs, params, numerics; timed 30% slower
    other = _rec("other-net", 0.99, 0.130, macs=99)
    limits = bounds(BudgetConfig(), STUDENT, margin=0.05)
    assert misses(same, limits) == [] and [b.key for b in misses(other, limits)] == ["p50_ms"]


def test_throughput_size_and_accuracy_bounds_and_maximising_throughput():
    budget = BudgetConfig(as_fast_as=None, min_throughput=500, max_size_kib=20, min_accuracy=0.95,
                          maximise="throughput")
    records = [_rec("a", 0.96, 1.0, throughput=800), _rec("b", 0.99, 1.0, throughput=600),
               _rec("c", 0.99, 1.0, throughput=5000, size=40 * 1024), _rec("d", 0.90, 1.0, throughput=9000)]
    choice = choose(records, budget, bounds(budget))
    assert choice["chosen"]["name"] == "a" and choice["runner_up"]["name"] == "b"
    assert choice["within"] == ["a", "b"]


def test_a_budget_nothing_meets_names_the_closest_model_and_what_it_misses():
    budget = BudgetConfig(as_fast_as=None, max_p50_ms=0.01)
    records = [_rec("slow", 0.99, 0.5), _rec("closest", 0.9, 0.02)]
    choice = choose(records, budget, bounds(budget))
    assert choice["chosen"] is None
    assert "no model meets the budget" in choice["message"] and "the closest is closest" in choice["message"]
    assert "p50 0.020 ms against p50 0.010 ms" in choice["message"]


@pytest.mark.parametrize("bad, word", [({"maximise": "speed"}, "maximise"),
                                       ({"as_fast_as": "nobody"}, "as_fast_as"),
                                       ({"max_p50_ms": -1.0}, "max_p50_ms")])
def test_a_wrong_budget_is_refused_naming_the_key(bad, word):
    from distillery.config import load_config
    from distillery.core.errors import UserError

    key, value = next(iter(bad.items()))
    with pytest.raises(UserError, match=word):
        load_config(None, [f"search.budget.{key}={value}"])


@pytest.mark.parametrize("recipe, words", [
    ("[[{kind: cascade, to: teacher}]]", "no cascade step"),
    ("[[{kind: finetune}]]", "finetune must follow a prune step"),
    ("[[{kind: int8_static}, {kind: prune_unstructured, sparsity: 0.5}]]", "must be the last")])
def test_a_wrong_search_recipe_is_refused_before_any_trial(recipe, words):
    from distillery.config import load_config
    from distillery.core.errors import UserError

    with pytest.raises(UserError, match=words):
        load_config(None, [f"search.space.recipe={recipe}"])


def test_validation_loss_breaks_ties_on_validation_accuracy_and_never_outweighs_an_image():
    from distillery.search.trial import val_score

    records = [_rec("sure", 0.99, 0.10), _rec("unsure", 0.99, 0.05)]
    records[0]["val_loss"], records[1]["val_loss"] = 0.02, 0.30
    budget = BudgetConfig(as_fast_as=None)
    # not the one the timer favoured
    assert choose(records, budget, bounds(budget))["chosen"]["name"] == "sure"
    n = 180
    assert val_score(1.0, 0.30, n) < val_score(1.0, 0.02, n)
    assert val_score(1.0, 1e9, n) > val_score(1.0 - 1 / n, 0.0, n)  # one more right answer always wins


def test_as_fast_as_also_bounds_the_work_a_slow_timing_of_the_reference_cannot_let_a_bigger_model_in():
    slow_reference = {**STUDENT, "p50_ms": 0.136}  # timed slow this once
    bigger = _rec("wider", 0.997, 0.134, macs=2 * STUDENT["macs"])
    limits = bounds(BudgetConfig(), slow_reference, margin=0.05)
    assert [b.key for b in misses(bigger, limits)] == ["macs"]
    assert "MACs <= 100 (student's)" in "; ".join(b.text for b in limits)
