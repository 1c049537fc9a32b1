"""Cutting a model into pipeline stages, micro-batches and strategy choice: all in one process
(tests/integration/test_parallel.py trains under each strategy on 2 processes)."""

import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tiny_models import CONFIGS, assert_same_state, fixed_data, model_of, spec_of

from distillery.core.errors import UserError
from distillery.models.architectures import stage_layers
from distillery.training.parallel import make_strategy
from distillery.training.pipeline_parallel import microbatch_count, split_points


@pytest.mark.parametrize("kind", CONFIGS)
def test_stage_layers_compose_to_the_forward(kind):
    model, x = model_of(kind, 0).eval(), fixed_data()[0]
    out = x
    for _, layer in stage_layers(model, spec_of(kind)):
        out = layer(out)
    torch.testing.assert_close(out, model(x))
    prefixes = [n for n, _ in stage_layers(model, spec_of(kind))]
    assert all(sum(k.startswith(p + ".") for p in prefixes) == 1 for k in model.state_dict())


def _layer_macs(kind: str) -> list[int]:
    """MACs of each piece of stage_layers on one image, via models.count_macs."""
    from distillery.models.architectures import count_macs

    model, spec = model_of(kind, 0).eval(), spec_of(kind)
    costs, x = [], torch.zeros(1, *spec["in_shape"])
    for _, layer in stage_layers(model, spec):
        costs.append(count_macs(layer, list(x.shape[1:])))
        with torch.no_grad():
            x = layer(x)
    return costs


def _stage_sums(costs: list[int], cuts) -> list[int]:
    bounds = [0, *cuts, len(costs)]
    return [sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("kind", CONFIGS)
@pytest.mark.parametrize("stages", [1, 2, 3])
def test_split_points_cover_all_layers_contiguously_and_balance_macs(kind, stages):
    model, spec = model_of(kind, 0), spec_of(kind)
    costs = _layer_macs(kind)
    n = len(costs)
    cuts = split_points(spec, stages, model)
    assert len(cuts) == stages - 1 and cuts == sorted(set(cuts)) and all(0 < c < n for c in cuts)
    largest = max(_stage_sums(costs, cuts))
    # Optimal: no other contiguous split has a smaller largest stage.
    assert largest == min(max(_stage_sums(costs, c)) for c in itertools.combinations(range(1, n), stages - 1))
    assert largest <= sum(costs) / stages + max(costs)


def test_split_points_put_the_cnn_cut_before_its_costliest_conv():
    """conv2 holds most MACs, so 2 stages are conv1-relu-pool | the rest; among the equally balanced
    cuts, the one after pooling sends the fewest values."""
    model, spec = model_of("cnn", 0), spec_of("cnn")
    names = [n for n, _ in stage_layers(model, spec)]
    assert names[split_points(spec, 2, model)[0]] == "conv2"


@pytest.mark.parametrize("kind", CONFIGS)
def test_split_points_reject_more_stages_than_layers(kind):
    model, spec = model_of(kind, 0), spec_of(kind)
    n = len(stage_layers(model, spec))
    assert split_points(spec, n, model) == list(range(1, n))
    for bad in (n + 1, 0):
        with pytest.raises(UserError, match="stages"):
            split_points(spec, bad, model)


def test_microbatches_are_equal_divisors():
    assert [microbatch_count(n, 4) for n in (16, 6, 7, 1, 3, 9)] == [4, 3, 1, 1, 3, 3]


@pytest.mark.parametrize("bad", [{"name": "tp"}, {"name": "none", "world_size": 2},
                                 {"rank": 2}, {"name": "pipeline", "microbatches": 0}])
def test_make_strategy_rejects_bad_layouts(bad):
    args = {"name": "ddp", "rank": 0, "world_size": 2, "microbatches": 4, **bad}
    with pytest.raises(UserError):
        make_strategy(args.pop("name"), **args)


def test_none_strategy_needs_no_process_group_and_round_trips(tmp_path):
    assert not dist.is_initialized()
    strategy = make_strategy("none", rank=0, world_size=1)
    x, y, _ = fixed_data()
    model = strategy.wrap(model_of("cnn", 0), spec_of("cnn"))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    losses = [strategy.train_step(model, x, y, F.cross_entropy, opt) for _ in range(3)]
    assert losses[-1] < losses[0]
    torch.save(strategy.optimizer_state(model, opt), tmp_path / "opt.pt")
    state = strategy.owned_state(model)
    assert_same_state(state, model.state_dict(), atol=0)
    assert strategy.local_parameter_names(model) == {n for n, _ in model.named_parameters()}

    resumed = model_of("cnn", 1)
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=0.01)
    strategy.load_owned_state(resumed, state)
    strategy.load_optimizer_state(resumed, opt2, torch.load(tmp_path / "opt.pt", weights_only=True))
    for m, o in [(model, opt), (resumed, opt2)]:
        strategy.train_step(m, x, y, F.cross_entropy, o)
    assert_same_state(resumed.state_dict(), model.state_dict(), atol=0)
    torch.testing.assert_close(strategy.predict(resumed, x), model.eval()(x))
