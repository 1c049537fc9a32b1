"""Honest model-level speed measurement: the numbers every "faster" claim rests on.

A compressed model is only worth deploying if it is measurably faster, and on this CPU the
fastest way to run a model differs per model (a PT2E int8 graph is slow until compiled; a
small fp32 CNN may be fastest in eager). So each model is timed in every execution mode and
keeps its best one. Timing rules that make the figures comparable between models:

- a fixed thread count (restored afterwards) and the same inputs for every mode: the caller's
  images (a cascade's cost depends on them: the run's validation images), else seeded noise; batch-1
  runs go through the images one by one;
- warm-up at both batch sizes before any timing, so compilation and first-call allocation
  are never timed (compile time is reported on its own as `compile_s`);
- latency is batch 1 (p50 and p99 over many runs), throughput is batch `throughput_batch`
  (batch / median seconds), and achieved GFLOP/s is set against the machine's stated peak.

Plain PyTorch: no Ray, so the benchmark job and the tests use it in-process.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from distillery.models.runner import MODES, SERVABLE_MODES, runner


@dataclass(frozen=True)
class BenchSettings:
    threads: int = 1
    """torch.set_num_threads during the measurement, restored afterwards."""
    latency_runs: int = 200
    """Timed batch-1 runs after warm-up; p50 and p99 come from these."""
    warmup: int = 20
    """Untimed batch-1 runs before the latency runs (the first ones compile, in compile mode)."""
    throughput_batch: int = 256
    throughput_runs: int = 10
    """Timed runs at `throughput_batch`; throughput = batch / median seconds."""
    throughput_warmup: int = 2
    """Untimed runs at `throughput_batch` (at least 1): a big batch is warm after one or two, and each
    costs a lot."""
    peak_gflops_per_core: float = 250.0
    """Stated fp32 peak of this machine (PLATFORM.md: ~500 GFLOP/s on 2 cores)."""
    peak_int8_gops_per_core: float = 1000.0
    """Stated int8 VNNI peak (~2 TOP/s on 2 cores)."""

    def __post_init__(self) -> None:
        for name in ("threads", "latency_runs", "warmup", "throughput_batch", "throughput_runs",
                     "throughput_warmup"):
            if getattr(self, name) < 1:
                raise ValueError(f"BenchSettings.{name} must be >= 1, got {getattr(self, name)}")
        if self.latency_runs < 2:
            raise ValueError(f"BenchSettings.latency_runs must be >= 2 for a p99, got {self.latency_runs}")


def machine_info() -> dict:
    """What a speed figure was measured on: CPU model, logical cores, torch and Python versions."""
    return {
        "cpu": _cpu_model() or platform.processor() or "unknown",
        "logical_cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def measure(model: nn.Module, in_shape: list[int], macs: int, settings: BenchSettings,
            modes: Sequence[str] = MODES, int8: bool = False, images: Tensor | None = None) -> dict:
    """Time `model` in each mode and keep the fastest servable one (`SERVABLE_MODES`; any mode
    when none of those ran, with "servable": False); best = highest throughput at batch
    `settings.throughput_batch`.

    Per mode: {"p50_ms", "p99_ms" (batch 1), "throughput" (images/s), "gflops" (achieved,
    2 * macs * throughput / 1e9), "peak_fraction" (gflops / (peak per core * threads); the int8
    peak when `int8`), and "compile_s" for compile}. A mode that raises is recorded as
    {"error": "<ExceptionType>: message"} and the others still run (a quantized graph may not
    support channels_last). Returns {"threads", "batch", "runs", "modes", "best_mode"} plus the
    best mode's figures at the top level; raises ValueError, with the errors, if every mode failed.
    The model runs in eval mode under inference_mode; its training flags are restored afterwards.
    Compile mode first calls torch._dynamo.reset(), which drops every other compiled function of
    the process (recompiling is quick: inductor's on-disk cache survives, keyed on thread count).
    """
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:  # a typo is a caller's bug, not a mode that failed to run
        raise ValueError(f"unknown mode(s) {unknown}; expected some of {MODES}")
    x1, xb = _inputs(in_shape, settings.throughput_batch, images)
    results: dict[str, dict] = {}
    with _threads(settings.threads), _eval_mode(model):
        for mode in modes:
            try:
                run = _fresh_runner(model, mode)
                with torch.inference_mode():
                    figures, first_calls_s = _measure_mode(run, x1, xb, macs, settings, int8)
                results[mode] = {**figures, "compile_s": first_calls_s} if mode == "compile" else figures
            except Exception as e:  # noqa: BLE001 - one broken mode must not lose the others' figures
                results[mode] = {"error": f"{type(e).__name__}: {e}"}
    return _summarize(results, settings)


def _fresh_runner(model: nn.Module, mode: str) -> Callable[[Tensor], Tensor]:
    # Built outside inference_mode: a deep copy made inside it would hold inference tensors.
    if mode == "compile":
        # Every compiled module adds cache entries to one code object that all compiled modules
        # share, and past 8 of them dynamo gives up: without a reset the 5th model measured in a
        # process could not be compiled. This discards the process's other compiled code too.
        import torch._dynamo  # only to compile: a second of start-up for every importer

        torch._dynamo.reset()
    return runner(model, mode)


def _inputs(in_shape: list[int], batch: int, images: Tensor | None) -> tuple[list[Tensor], Tensor]:
    """(batch-1 inputs to cycle through, one throughput batch): shared by all modes, so that
    every mode does exactly the same work."""
    if images is None or len(images) == 0:
        gen = torch.Generator().manual_seed(0)
        return [torch.randn(1, *in_shape, generator=gen)], torch.randn(batch, *in_shape, generator=gen)
    images = images.float()
    repeats = -(-batch // len(images))  # fewer images than a batch: repeat them
    return list(images.split(1)), images.repeat(repeats, *[1] * (images.dim() - 1))[:batch].contiguous()


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
    except NotImplementedError:
        pass  # an exported (e.g. PT2E-quantized) graph refuses eval(); its mode was fixed at export
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag  # by attribute: train() is refused by exported graphs too


def _measure_mode(run: Callable[[Tensor], Tensor], x1: list[Tensor], xb: Tensor, macs: int,
                  settings: BenchSettings, int8: bool) -> tuple[dict, float]:
    """(figures, seconds of the first call at each batch size: the compile time in compile mode)."""
    # The first call per batch size compiles (compile mode) or allocates; warm both before timing any.
    first_calls_s = _time_once(run, x1[0]) + _time_once(run, xb)
    for i in range(settings.warmup - 1):
        run(x1[i % len(x1)])
    for _ in range(settings.throughput_warmup - 1):
        run(xb)
    latencies = [_time_once(run, x1[i % len(x1)]) for i in range(settings.latency_runs)]
    batch_s = statistics.median(_time_once(run, xb) for _ in range(settings.throughput_runs))
    throughput = xb.shape[0] / batch_s
    gflops = 2 * macs * throughput / 1e9
    peak = settings.peak_int8_gops_per_core if int8 else settings.peak_gflops_per_core
    figures = {
        "p50_ms": statistics.median(latencies) * 1e3,
        "mean_ms": statistics.fmean(latencies) * 1e3,  # what a cascade's rare escalations move
        # inclusive: interpolates between measured runs, so p50 <= p99 <= slowest run
        "p99_ms": statistics.quantiles(latencies, n=100, method="inclusive")[98] * 1e3,
        "throughput": throughput,
        "gflops": gflops,
        "peak_fraction": gflops / (peak * settings.threads),
    }
    return figures, first_calls_s


def _time_once(run: Callable[[Tensor], Tensor], x: Tensor) -> float:
    start = time.perf_counter()
    run(x)
    return time.perf_counter() - start


def _summarize(results: dict[str, dict], settings: BenchSettings) -> dict:
    ok = {mode: r for mode, r in results.items() if "error" not in r}
    if not ok:
        errors = "; ".join(f"{mode}: {r['error']}" for mode, r in results.items())
        raise ValueError(f"every mode failed to run: {errors or 'no modes given'}")
    best, servable = best_mode(ok)
    runs = {"warmup": settings.warmup, "latency": settings.latency_runs,
            "throughput": settings.throughput_runs}
    return {"threads": settings.threads, "batch": settings.throughput_batch, "runs": runs,
            "modes": results, "best_mode": best, "servable": servable, **ok[best]}


def best_mode(timed: dict[str, dict]) -> tuple[str, bool]:
    """(the mode with the highest throughput among those a replica runs, True), or among all
    of `timed` ({mode: figures}, errors left out) when none of those ran (False)."""
    servable = [mode for mode in timed if mode in SERVABLE_MODES]
    return max(servable or timed, key=lambda mode: timed[mode]["throughput"]), bool(servable)


def is_faster(variant: dict, parent: dict, *, min_gain: float = 0.0) -> bool:
    """True when the variant's best mode beats the parent's best mode on throughput at the
    throughput batch OR on p50 latency at batch 1 (both as returned by `measure`).

    `min_gain` is the relative margin a win must exceed (0.05 = 5%), to keep timing noise from
    counting as a speed-up; the default 0 compares the figures as they are.
    """
    more_throughput = variant["throughput"] > parent["throughput"] * (1 + min_gain)
    lower_latency = variant["p50_ms"] * (1 + min_gain) < parent["p50_ms"]
    return more_throughput or lower_latency
