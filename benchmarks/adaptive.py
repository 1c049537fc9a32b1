"""`auto` under rising load against the most accurate and the fastest model alone, side by
side in one run, repeated.

    python benchmarks/adaptive.py [--run-dir runs/digits] [--repeats 3] [--images 16]
                                  [--steps 6:0.4,12:1.6,8:0.4] [--slo-ms 100] [--max-replicas 1]

One local Ray with HAProxy ingress serves the run as `distillery serve` does (its default
models and `auto`, `serve.auto_slo_ms` = --slo-ms), at most --max-replicas per application so
that repeats start alike. Each repeat is `loadtest.adaptive.scenario`: capacities measured,
then the same open-loop schedule (load a multiple of the most accurate model's capacity,
capped at 60% of the fastest's) sent to the most accurate model, to the fastest and to
`auto`. Targets: `auto`'s p99 within the objective in >= 95% of the seconds while the
accurate model alone misses it, and >= 90% of the first low-load step answered by the most
accurate model; a repeat whose peak the fastest model alone misses too is shown but not counted
(`verdict`). The generator shares the 2 cores (nice 15).
Writes benchmarks/results/adaptive_<machine>_<date>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from common import machine, machine_lines, median, publish, table  # noqa: E402

from distillery.config import ServeConfig  # noqa: E402
from distillery.loadtest import auto_scenario  # noqa: E402
from distillery.loadtest.run import held_out_images  # noqa: E402
from distillery.serving.predictor import catalog  # noqa: E402


def serve(run_dir: Path, slo_ms: float, max_replicas: int) -> str:
    import ray

    from distillery.compat import ingress
    from distillery.serving import serve_apps

    cfg = ServeConfig(grpc_port=None, auto_slo_ms=slo_ms, max_replicas=max_replicas)
    ingress.apply("haproxy", cfg.host)
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
    serve_apps.deploy(str(run_dir), cfg, None)
    time.sleep(5)  # replica processes finish starting: they share the 2 cores
    return f"http://{cfg.host}:{cfg.port}"


def verdict(doc: dict) -> str:
    """"met" or "missed" for one repeat; "beyond every model" when the fastest model alone also
    missed the objective in more than 5% of the seconds: no choice of model could meet that
    peak, so the repeat says nothing about adapting (capacities probed minutes apart moved by
    up to 1.5x on this machine, and the peak is set from the probe)."""
    top, fastest, auto = (doc["runs"][m] for m in (doc["top"], doc["fastest"], "auto"))
    if fastest["seconds_within_slo"] < 0.95:
        return "beyond every model"
    met = auto["seconds_within_slo"] >= 0.95 and top["seconds_within_slo"] < 1.0 and \
        (auto["low_load_share_top"] or 0) >= 0.9
    return "met" if met else "missed"


def summary(verdicts: list[str]) -> str:
    valid = [v for v in verdicts if v != "beyond every model"]
    beyond = len(verdicts) - len(valid)
    return (f"target met in {valid.count('met')} of {len(valid)} repeats"
            + (f" ({beyond} more had a peak that the fastest model alone missed too: beyond every model, "
               "not counted)" if beyond else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, default=Path("runs/digits"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--steps", default="6:0.4,12:1.6,8:0.4")
    ap.add_argument("--slo-ms", type=float, default=100.0)
    ap.add_argument("--max-replicas", type=int, default=1)
    args = ap.parse_args()
    steps = [[float(v) for v in step.split(":")] for step in args.steps.split(",")]
    base = serve(args.run_dir.resolve(), args.slo_ms, args.max_replicas)
    images = held_out_images(args.run_dir)[0][:args.images]
    served = catalog(args.run_dir)
    repeats = []
    for _ in range(args.repeats):
        repeats.append(auto_scenario.scenario(base, served, images, steps, args.slo_ms,
                                         {"content-type": "application/json"}, print))
        time.sleep(5)  # the last queue drains
    rows, verdicts = [], []
    for i, doc in enumerate(repeats):
        verdicts.append(verdict(doc))
        for r in doc["runs"].values():
            by_count = sorted(r["variants"].items(), key=lambda kv: -kv[1])
            ms = auto_scenario.ms_text
            rows.append([i + 1, r["model"], ms(r["p50_ms"]), ms(r["p99_ms"]),
                         sum(r["errors"].values()),
                         f"{r['seconds_within_slo']:.0%}", "-" if r["low_load_share_top"] is None
                         else f"{r['low_load_share_top']:.0%}",
                         ", ".join(f"{m} {n}" for m, n in by_count)])
    within = {m: median([d["runs"][m]["seconds_within_slo"] for d in repeats]) for m in repeats[0]["runs"]}
    first = repeats[0]
    report = table(["repeat", "sent to", "p50 ms", "p99 ms", "errors", "seconds within objective",
                    "low load by the most accurate", "answered by"], rows)
    schedule = ", ".join(f"{d:g} s at {r:g}/s" for d, r in first["steps"])
    report += (f"\n\n{args.images} image(s) a request; {first['top']} measured at "
               f"{first['capacity_rps']:g} requests/s, {first['fastest']} at "
               f"{first['fastest_capacity_rps']:g} (first repeat); schedule {schedule}; objective p99 <= "
               f"{args.slo_ms:g} ms; "
               f"at most {args.max_replicas} replica(s) per application. Median share of seconds within the "
               f"objective: {', '.join(f'{m} {v:.0%}' for m, v in within.items())}; {summary(verdicts)}. "
               + machine_lines(machine("1")))
    publish("adaptive", report, {"machine": machine("1"), "args": vars(args) | {"run_dir": str(args.run_dir)},
                                 "repeats": repeats, "median_seconds_within": within, "target_met": verdicts},
            quick=False)


if __name__ == "__main__":
    main()
