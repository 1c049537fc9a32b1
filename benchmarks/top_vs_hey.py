"""Does `distillery top` show a model's rate as the client measures it (the target: within 10%
of what `hey` reports)? Side by side in one run.

    python benchmarks/top_vs_hey.py [--seconds 45] [--rounds 5] [--quick]

One local Ray with the HAProxy ingress serves the digits-shaped student (random weights: speed
only) with its metrics on. Each round `hey` (an external Go tool, `apt-get install hey`) sends
1-image JSON requests at a closed-loop concurrency for --seconds; meanwhile `top`'s `Watch`
reads Ray's metrics agent every second, as `distillery top` does, and its last view before the
load ends (a 30 s window) is compared with hey's requests/s over the whole load (the target),
and with hey's answers in the very seconds of the replica's clock that view covers (what is
left is top's own error, not the load's changes over time). The naive rate (the counter's
change over the scrapes' own times, which aliases with the agent's 10 s reports) is kept too.
Writes benchmarks/results/top_vs_hey_<machine>_<date>.json.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from common import machine, machine_lines, mean_interval, median, publish, table  # noqa: E402
from metrics_cost import student_run  # noqa: E402
from serving import JSON, ONE, body, deploy, hey, hey_rounds, start_serve, stop_serve  # noqa: E402

from distillery.serving import top  # noqa: E402

CONCURRENCIES = (4, 16)  # a light load and one near the replica's capacity, alternating by round


def one_round(url: str, request: bytes, targets: list[str], concurrency: int, seconds: float) -> dict:
    """hey's requests/s, over its whole load and over the seconds `top`'s last view covers, and
    `top`'s (and the naive rate's), read 1 s before the load ends."""
    result: dict = {}
    load = threading.Thread(target=lambda: result.update(hey(url, request, concurrency, seconds, JSON, True)))
    watch, start = top.Watch(targets, window_s=30.0), time.monotonic()
    load.start()
    rows, naive = [], {}
    while time.monotonic() - start < seconds - 1:
        rows, _, span = watch.tick()
        (t0, old), (t1, new) = watch.samples[0], watch.samples[-1]
        naive = {r.model: r.answered / max(t1 - t0, 1e-9) for r in rows}
        time.sleep(1.0)
    load.join()
    shown = {r.model: r.rps for r in rows}
    # The replica's own clock at the two hand-overs top's view is taken between (one replica).
    since, until = (next(v for (n, _), v in s.items() if n == top.EXPORTED) for s in (old, new))
    within = sum(since < t <= until for t in result.pop("answered_at"))
    return {"concurrency": concurrency, "hey_rps": result["throughput"], "hey_errors": result["errors"],
            "hey_same_seconds_rps": within / (until - since), "top_rps": shown.get("student", 0.0),
            "naive_rps": naive.get("student", 0.0), "window_s": round(span, 1),
            "replica_seconds": until - since}


def measure(seconds: float, rounds: int) -> list[dict]:
    import ray

    run_dir = student_run(Path(tempfile.mkdtemp(prefix="top-vs-hey-")))
    base = start_serve("haproxy")
    try:
        deploy(run_dir, "student", "student", ONE.model_copy(update={"metrics": True}))
        targets = [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray.nodes() if n["Alive"]]
        url, request = f"{base}/v2/models/student/infer", body(torch.rand(1, 1, 8, 8))
        hey(url, request, 16, 3.0, JSON)  # warm-up: replica start, first passes
        time.sleep(12)  # the warm-up's last report has reached the agent before the first round
        out = []
        for r in range(rounds):
            out.append(one_round(url, request, targets, CONCURRENCIES[r % 2], seconds))
            print(f"round {r + 1}: {out[-1]}", flush=True)
            time.sleep(12)  # an idle agent period between rounds: each round's window starts clean
        return out
    finally:
        stop_serve()
        shutil.rmtree(run_dir, ignore_errors=True)


def report(runs: list[dict], info: dict) -> tuple[str, dict]:
    ratio = mean_interval([r["top_rps"] / r["hey_rps"] for r in runs])
    same = mean_interval([r["top_rps"] / r["hey_same_seconds_rps"] for r in runs])
    naive = mean_interval([r["naive_rps"] / r["hey_rps"] for r in runs])
    worst = max(abs(r["top_rps"] / r["hey_rps"] - 1) for r in runs)
    rows = [[r["concurrency"], f"{r['hey_rps']:,.0f}", f"{r['top_rps']:,.0f}",
             f"{r['top_rps'] / r['hey_rps']:.3f}", f"{r['top_rps'] / r['hey_same_seconds_rps']:.3f}",
             f"{r['naive_rps'] / r['hey_rps']:.3f}"] for r in runs]
    text = "\n".join([
        "# `distillery top`'s requests/s against hey's, the student through HAProxy", machine_lines(info), "",
        table(["concurrency", "hey requests/s", "top requests/s", "top / hey", "top / hey, same seconds",
               "naive / hey"], rows), "",
        f"top / hey: {ratio[0]:.3f} [{ratio[1]:.3f}, {ratio[2]:.3f}] (mean, 95%), worst round {worst:.1%} "
        "off (target: within 10%); against hey's answers in the same seconds of the replica's clock: "
        f"{same[0]:.4f} [{same[1]:.4f}, {same[2]:.4f}]; the naive rate over the scrapes' own times: "
        f"{naive[0]:.3f} [{naive[1]:.3f}, {naive[2]:.3f}]; median hey rate "
        f"{median([r['hey_rps'] for r in runs]):,.0f}/s"])
    return text, {"top_to_hey": ratio, "top_to_hey_same_seconds": same, "naive_to_hey": naive,
                  "worst_abs_error": round(worst, 4), "rounds": runs}


def main() -> None:
    seconds, rounds, quick = hey_rounds(__doc__, "top_vs_hey.py", 45.0, 6, quick=(35.0, 2))
    info = machine("1 (a replica runs its model on one thread)")
    text, figures = report(measure(seconds, rounds), info)
    figures |= {"machine": info, "seconds": seconds}
    publish("top_vs_hey", text, figures, quick)


if __name__ == "__main__":
    main()
