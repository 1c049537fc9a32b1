"""What the replicas' metrics cost (the target: at most 5% of the student's requests/s at
concurrency 32 through HAProxy), side by side in one run.

    python benchmarks/metrics_cost.py [--seconds 4] [--rounds 24] [--quick]

One local Ray with the HAProxy ingress serves the digits-shaped student (the digits preset's
network, 1x8x8, random weights: speed only) three times, as applications that differ only in
`serve.metrics`: `on` (every request counted, timed and its batch recorded), `off` (no-ops), and
`off2`, a second `off`: what two identical replicas differ by here is the noise a difference
must exceed. The load is `hey` (an external Go tool, `apt-get install hey`), closed loop at
concurrency 32, 1-image JSON requests, one application at a time. The machine's speed drifts (by
up to 20% between the rounds of one run here), so each round loads `on` between the two offs and
compares it with their mean, which takes out a drift that is steady over the round; the offs swap
places every round, so a drift cancels out of off2 against off too. Figures are medians over the
rounds, and each round's ratios are kept (their mean with a 95% interval). Writes
benchmarks/results/metrics_cost_<machine>_<date>.json.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from common import machine, machine_lines, mean_interval, median, publish, table  # noqa: E402
from serving import JSON, ONE, body, deploy, hey, hey_rounds, start_serve, stop_serve  # noqa: E402

from distillery.artifacts import save_model  # noqa: E402
from distillery.config import CNNConfig  # noqa: E402
from distillery.core.files import atomic_write_json  # noqa: E402
from distillery.models.architectures import build_model, make_spec  # noqa: E402

CONCURRENCY = 32
APPS = {"on": True, "off": False, "off2": False}  # serve.metrics of each


def student_run(folder: Path) -> Path:
    """A run directory holding the digits preset's student (random weights) and a frontier
    naming it, in eager mode (what a replica runs)."""
    torch.manual_seed(0)
    spec = make_spec(CNNConfig(width_mult=0.5), [1, 8, 8], 10)
    save_model(folder / "student", build_model(spec).eval(), spec)
    record = {"name": "student", "test_accuracy": 0.0, "val_accuracy": 0.0, "best_mode": "eager",
              "p50_ms": 0.1,
              "modes": {"eager": {"p50_ms": 0.1}}}
    atomic_write_json(folder / "frontier.json",
                      {"variants": [record], "pareto": ["student"], "recommended": None})
    return folder


def measure(seconds: float, rounds: int) -> dict:
    run_dir = student_run(Path(tempfile.mkdtemp(prefix="metrics-cost-")))
    base = start_serve("haproxy")
    try:
        for app, on in APPS.items():
            deploy(run_dir, "student", app, ONE.model_copy(update={"metrics": on}))
        request = body(torch.rand(1, 1, 8, 8))
        for app in APPS:  # warm-up: replica start, first passes
            hey(f"{base}/v2/models/{app}/infer", request, CONCURRENCY, 2.0, JSON)
        out: dict[str, list[dict]] = {app: [] for app in APPS}
        for r in range(rounds):  # `on` between the two offs, whose order alternates (see the docstring)
            for app in ("off", "on", "off2") if r % 2 == 0 else ("off2", "on", "off"):
                out[app].append(hey(f"{base}/v2/models/{app}/infer", request, CONCURRENCY, seconds, JSON))
                time.sleep(0.5)
        return out
    finally:
        stop_serve()
        shutil.rmtree(run_dir, ignore_errors=True)


def in_process_us(n: int = 50_000) -> dict[str, float]:
    """What the metrics add to one request in a replica's own code, in microseconds: the calls a
    request makes (counted, the pass hook, answered), on and off, without the network; on an
    event loop, as in a replica (whose first request starts the export task)."""
    from distillery.serving.batcher import Answer
    from distillery.serving.metrics import NoMetrics, ReplicaMetrics

    answer = Answer(torch.zeros(1, 10), 1, "student", 1e-4, 2e-4)

    async def per_request(metrics: ReplicaMetrics) -> float:
        hook, start = metrics.on_pass("student", object()), time.perf_counter()
        for _ in range(n):
            with metrics.counted("student", "http") as record:
                if hook:
                    hook(1, 1, 2e-4)
                metrics.answered("student", 1, answer, record)
        return round(1e6 * (time.perf_counter() - start) / n, 2)

    return {name: asyncio.run(per_request(metrics)) for name, metrics in (("on", ReplicaMetrics()),
                                                                          ("off", NoMetrics()))}


def report(runs: dict, info: dict, per_request_us: dict[str, float]) -> tuple[str, dict]:
    rps = {app: median([r["throughput"] for r in rounds]) for app, rounds in runs.items()}
    p99 = {app: median([r["p99_ms"] for r in rounds]) for app, rounds in runs.items()}
    per_round = {app: [r["throughput"] for r in rounds] for app, rounds in runs.items()}
    offs = [(a + b) / 2 for a, b in zip(per_round["off"], per_round["off2"])]
    on = mean_interval([a / o for a, o in zip(per_round["on"], offs)])  # against both replicas without
    noise = mean_interval([a / b for a, b in zip(per_round["off2"], per_round["off"])])
    rows = [[app, f"{rps[app]:,.0f}", f"{p99[app]:.1f}", ", ".join(f"{v:,.0f}" for v in per_round[app]),
             sum(r["errors"] for r in runs[app])] for app in APPS]
    cost = 1 - on[0]
    text = "\n".join([
        f"# What the replicas' metrics cost: the student at concurrency {CONCURRENCY} through HAProxy",
        machine_lines(info), "",
        table(["serve.metrics", "requests/s (median)", "p99 ms (median)", "each round", "errors"], rows), "",
        f"metrics on, per round against the mean of off and off2: {on[0]:.3f}x [{on[1]:.3f}, {on[2]:.3f}] "
        f"(95%), a cost of {cost:+.1%} (target: at most 5%); two identical replicas (off2 against off): "
        f"{noise[0]:.3f}x [{noise[1]:.3f}, {noise[2]:.3f}]; generator CPU share "
        f"{median([r['generator_cpu'] for r in runs['on']]):.0%} of the machine",
        f"in the replica's own code a request spends {per_request_us['on']} us in metrics calls on and "
        f"{per_request_us['off']} us off (in process), of {1e6 / rps['off']:.0f} us of the machine "
        "a request"])
    return text, {"requests_per_s": rps, "p99_ms": p99, "on_to_off": on, "off2_to_off": noise,
                  "cost": round(cost, 4), "in_process_us_per_request": per_request_us, "rounds": runs}


def main() -> None:
    seconds, rounds, quick = hey_rounds(__doc__, "metrics_cost.py", 4.0, 24, quick=(3.0, 2))
    info = machine("1 (a replica runs its model on one thread)")
    text, figures = report(measure(seconds, rounds), info, in_process_us())
    figures |= {"machine": info, "concurrency": CONCURRENCY, "seconds": seconds}
    publish("metrics_cost", text, figures, quick)


if __name__ == "__main__":
    main()
