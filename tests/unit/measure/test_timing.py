import pytest
import torch
from torch import nn

from distillery.measure.timing import BenchSettings, is_faster, machine_info, measure
from distillery.models.architectures import count_macs
from distillery.models.runner import MODES, runner

FAST = BenchSettings(latency_runs=20, warmup=3, throughput_batch=32, throughput_runs=3)
IN_SHAPE = [1, 8, 8]


def tiny_model(c_in: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(c_in, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


class RefusesChannelsLast(nn.Module):
    """Raises on channels_last input, as some quantized graphs do; needs C > 1 to tell the formats apart."""

    def __init__(self):
        super().__init__()
        self.body = tiny_model(c_in=3)

    def forward(self, x):
        if not x.is_contiguous():
            raise RuntimeError("channels_last not supported")
        return self.body(x)


def test_measure_eager_and_channels_last():
    model = tiny_model()
    macs = count_macs(model, IN_SHAPE)
    result = measure(model, IN_SHAPE, macs, FAST, modes=("eager", "channels_last"))

    assert set(result["modes"]) == {"eager", "channels_last"}
    for figures in result["modes"].values():
        assert figures["p50_ms"] > 0 and figures["throughput"] > 0 and figures["peak_fraction"] > 0
        assert figures["p99_ms"] >= figures["p50_ms"]
        assert figures["gflops"] == pytest.approx(2 * macs * figures["throughput"] / 1e9)
        assert figures["peak_fraction"] == pytest.approx(figures["gflops"] / FAST.peak_gflops_per_core)
        assert "compile_s" not in figures
    best = result["best_mode"]
    assert best in result["modes"]
    assert result["throughput"] == result["modes"][best]["throughput"]
    assert result["p50_ms"] == result["modes"][best]["p50_ms"]
    assert result["throughput"] == max(f["throughput"] for f in result["modes"].values())
    assert (result["threads"], result["batch"]) == (1, 32)
    assert result["runs"] == {"warmup": 3, "latency": 20, "throughput": 3}


def test_measure_all_modes_compiles_both_batch_sizes_before_timing():
    model = tiny_model()
    result = measure(model, IN_SHAPE, count_macs(model, IN_SHAPE), FAST)
    assert set(result["modes"]) == set(MODES)
    compiled = result["modes"]["compile"]
    assert "error" not in compiled, compiled
    assert compiled["compile_s"] > 0
    # Had a compile been timed, one run would take as long as compiling (seconds, not ms).
    assert compiled["p99_ms"] / 1e3 < compiled["compile_s"] / 10
    assert 32 / compiled["throughput"] < compiled["compile_s"] / 10


def test_compile_mode_never_reports_eager_figures_past_the_recompile_limit():
    # Dynamo's cache entries pile up on one code object shared by all compiled modules; past the
    # limit it silently runs eager. Lowered to 2 here (one model, two batch sizes) to keep this fast.
    with torch._dynamo.config.patch(recompile_limit=2), torch.no_grad():
        for _ in range(2):  # measure resets dynamo, so each model compiles afresh
            result = measure(tiny_model(), IN_SHAPE, 1000, FAST, modes=("compile",))
            assert "error" not in result["modes"]["compile"]
        run = runner(tiny_model(), "compile")  # a third model without a reset: refused, not eager
        with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
            run(torch.randn(1, *IN_SHAPE))


def test_int8_uses_the_int8_peak():
    model = tiny_model()
    result = measure(model, IN_SHAPE, 1000, FAST, modes=("eager",), int8=True)
    assert result["peak_fraction"] == pytest.approx(result["gflops"] / FAST.peak_int8_gops_per_core)


def test_a_failing_mode_is_recorded_and_the_others_still_measure():
    result = measure(RefusesChannelsLast(), [3, 8, 8], 1000, FAST, modes=("eager", "channels_last"))
    assert result["modes"]["channels_last"] == {"error": "RuntimeError: channels_last not supported"}
    assert result["best_mode"] == "eager"
    assert result["modes"]["eager"]["throughput"] > 0


def test_every_mode_failing_raises_with_the_errors():
    with pytest.raises(ValueError, match="channels_last: RuntimeError: channels_last not supported"):
        measure(RefusesChannelsLast(), [3, 8, 8], 1000, FAST, modes=("channels_last",))
    with pytest.raises(ValueError, match=r"unknown mode\(s\) \['fast'\]"):
        measure(tiny_model(), IN_SHAPE, 1000, FAST, modes=("eager", "fast"))


def test_threads_and_training_flag_restored():
    model = tiny_model().train()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = measure(model, IN_SHAPE, 1000, FAST, modes=("eager",))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert result["threads"] == 1
    assert model.training and all(m.training for m in model.modules())


def test_channels_last_runner_does_not_mutate_the_model():
    model = tiny_model(c_in=3).eval()
    weight = model[0].weight
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        out = runner(model, "channels_last")(x)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    assert model[0].weight is weight and weight.is_contiguous()
    assert not weight.is_contiguous(memory_format=torch.channels_last)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_compile_runner_matches_eager():
    model = tiny_model().eval()
    x = torch.randn(4, *IN_SHAPE)
    with torch.no_grad():  # freezing applies only without autograd
        expected = model(x)
        torch.testing.assert_close(runner(model, "compile")(x), expected, rtol=1e-5, atol=1e-5)
    assert model[0].weight.is_contiguous() and model.training is False


def test_unknown_mode_and_bad_settings():
    with pytest.raises(ValueError, match="unknown mode"):
        runner(tiny_model(), "tensorrt")
    with pytest.raises(ValueError, match="latency_runs"):
        BenchSettings(latency_runs=1)
    with pytest.raises(ValueError, match="threads"):
        BenchSettings(threads=0)
    assert MODES == ("eager", "channels_last", "compile")


def test_is_faster():
    parent = {"throughput": 1000.0, "p50_ms": 1.0}
    assert is_faster({"throughput": 1500.0, "p50_ms": 1.2}, parent)  # throughput wins
    assert is_faster({"throughput": 900.0, "p50_ms": 0.8}, parent)  # latency wins
    assert not is_faster({"throughput": 900.0, "p50_ms": 1.2}, parent)
    assert not is_faster(dict(parent), parent)  # a tie is not faster
    assert not is_faster({"throughput": 1020.0, "p50_ms": 1.0}, parent, min_gain=0.05)
    assert is_faster({"throughput": 1100.0, "p50_ms": 1.0}, parent, min_gain=0.05)


def test_machine_info():
    info = machine_info()
    assert info["cpu"] and info["logical_cores"] >= 1
    assert info["torch"] == torch.__version__
