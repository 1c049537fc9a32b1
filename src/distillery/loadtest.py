"""Load tests of a served run: a concurrency sweep per model, an autoscaling ramp, a report.

The generator is `loadgen`; this module chooses the loads, reads the replica counts from
Serve (when this process can reach the Ray cluster serving) and writes
`loadtest.{json,md,png}` plus every request in `requests.csv`.
"""

from __future__ import annotations

import asyncio
import csv
import io
from pathlib import Path
from typing import Any

from distillery import loadgen
from distillery.artifacts import atomic_write_bytes, atomic_write_json

Steps = list[tuple[float, float]]


def replica_counter(app: str, deployment: str) -> loadgen.ReplicaFn | None:
    """A coroutine giving the RUNNING replicas of `app`'s deployment, or None without Ray."""
    import ray

    if not ray.is_initialized():
        return None
    from ray import serve

    def count() -> int | None:
        status = serve.status().applications.get(app)
        if status is None or deployment not in status.deployments:
            return None
        return status.deployments[deployment].replica_states.get("RUNNING", 0)

    async def replicas() -> int | None:
        return await asyncio.to_thread(count)
    return replicas


def sweep(base_url: str, model: str, body: bytes, levels: list[int], duration_s: float,
          headers: dict | None = None) -> list[dict[str, Any]]:
    """Closed loop at each concurrency level; one summary per level (with per-second rows)."""
    url, rows = f"{base_url}/v2/models/{model}/infer", []
    for level in levels:
        run = loadgen.closed_loop(url, body, level, duration_s, headers or {})
        samples, replicas, cpu = asyncio.run(_with(run, model))
        rows.append({"model": model, "concurrency": level, "duration_s": duration_s,
                     **loadgen.summarize(samples, duration_s), "generator_cpu": round(cpu, 3),
                     "replicas": replicas, "per_second": loadgen.per_second(samples), "samples": samples})
    return rows


def ramp(base_url: str, model: str, body: bytes, steps: Steps, headers: dict | None = None) -> dict[str, Any]:
    """Open loop through `steps` (requests/s up, then down) while sampling replicas: when the
    deployment scaled up, p99 before/during/after, and what was lost."""
    url = f"{base_url}/v2/models/{model}/infer"
    samples, replicas, cpu = asyncio.run(_with(loadgen.open_loop(url, body, steps, headers or {}), model))
    return {"model": model, "steps": steps, **scaling_summary(samples, replicas), "generator_cpu": round(cpu, 3),
            "per_second": loadgen.per_second(samples), "replicas": replicas, "samples": samples}


async def _with(run, model: str):
    deployment = "Auto" if model == "auto" else "Model"
    return await loadgen.with_replicas(run, replica_counter(model, deployment), every_s=1.0)


def scaling_summary(samples: list[loadgen.Sample], replicas: list[tuple[float, int | None]]) -> dict[str, Any]:
    """First scale-up time, peak replicas, p99 before / while / after more than the initial
    replicas ran, and requests lost (anything but 200 and a counted 503)."""
    counts = [(t, n) for t, n in replicas if n is not None]
    start = counts[0][1] if counts else None
    up = next((t for t, n in counts if start is not None and n > start), None)
    down = next((t for t, n in counts if up is not None and t > up and n <= start), None)

    def p99(lo: float, hi: float) -> float | None:
        return loadgen.percentile([s.latency_ms for s in samples if s.status == 200 and lo <= s.scheduled < hi], 99)

    end = max((s.scheduled for s in samples), default=0.0) + 1
    return {"initial_replicas": start, "peak_replicas": max((n for _, n in counts), default=None),
            "scaled_up_at_s": up, "scaled_down_at_s": down,
            "p99_before_ms": p99(0, up if up is not None else end),
            "p99_scaled_ms": p99(up, down if down is not None else end) if up is not None else None,
            "p99_after_ms": p99(down, end) if down is not None else None,
            "requests": len(samples), "ok": sum(s.status == 200 for s in samples),
            "rejected_503": sum(s.status == 503 for s in samples),
            "lost": sum(s.status not in (200, 503) for s in samples)}


# ---------------------------------------------------------------- report


def write_report(out_dir: Path, sweeps: list[dict], scaling: dict | None, machine: dict) -> list[Path]:
    """loadtest.json (no per-request rows), loadtest.md, loadtest.png, requests.csv."""
    out_dir.mkdir(parents=True, exist_ok=True)
    strip = lambda row: {k: v for k, v in row.items() if k != "samples"}  # noqa: E731
    doc = {"machine": machine, "sweeps": [strip(r) for r in sweeps], "scaling": strip(scaling) if scaling else None}
    atomic_write_json(out_dir / "loadtest.json", doc)
    atomic_write_bytes(out_dir / "loadtest.md", markdown(doc).encode())
    atomic_write_bytes(out_dir / "loadtest.png", plot(doc))
    atomic_write_bytes(out_dir / "requests.csv", _requests_csv(sweeps, scaling))
    return [out_dir / name for name in ("loadtest.json", "loadtest.md", "loadtest.png", "requests.csv")]


def _requests_csv(sweeps: list[dict], scaling: dict | None) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["run", "model", "scheduled_s", "sent_s", "latency_ms", "status", "variant"])
    runs = [(f"c{r['concurrency']}", r) for r in sweeps] + ([("ramp", scaling)] if scaling else [])
    for name, r in runs:
        for s in r["samples"]:
            writer.writerow([name, r["model"], f"{s.scheduled:.4f}", f"{s.sent:.4f}", f"{s.latency_ms:.3f}",
                             s.status, s.variant or ""])
    return out.getvalue().encode()


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def markdown(doc: dict) -> str:
    lines = ["# Load test", "", "| model | concurrency | requests/s | p50 ms | p95 ms | p99 ms | errors | replicas | generator CPU |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in doc["sweeps"]:
        counts = [n for _, n in r["replicas"] if n is not None]
        lines.append(f"| {r['model']} | {r['concurrency']} | {r['throughput']:.1f} | {_ms(r['p50_ms'])} | "
                     f"{_ms(r['p95_ms'])} | {_ms(r['p99_ms'])} | {r['errors'] or '-'} | "
                     f"{max(counts) if counts else '-'} | {r['generator_cpu']:.0%} |")
    s = doc["scaling"]
    if s:
        lines += ["", f"Autoscaling ramp on {s['model']} ({', '.join(f'{d:g} s at {q:g}/s' for d, q in s['steps'])}): "
                  f"replicas {s['initial_replicas']} -> {s['peak_replicas']}, scaled up at {s['scaled_up_at_s']} s, "
                  f"down at {s['scaled_down_at_s']} s; p99 {_ms(s['p99_before_ms'])} ms before, "
                  f"{_ms(s['p99_scaled_ms'])} ms scaled, {_ms(s['p99_after_ms'])} ms after; "
                  f"{s['ok']} of {s['requests']} answered 200, {s['rejected_503']} rejected with 503, {s['lost']} lost."]
    m = doc["machine"]
    lines += ["", f"Machine: {m.get('cpu')}, {m.get('logical_cores')} logical cores; the load generator ran on the "
              "same machine (its CPU share is in the table). Latency counts from the scheduled send time."]
    return "\n".join(lines) + "\n"


def plot(doc: dict) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)
    ax_tp, ax_p99, ax_time = fig.subplots(1, 3)
    for model in dict.fromkeys(r["model"] for r in doc["sweeps"]):
        rows = [r for r in doc["sweeps"] if r["model"] == model]
        ax_tp.plot([r["concurrency"] for r in rows], [r["throughput"] for r in rows], marker="o", label=model)
        ax_p99.plot([r["concurrency"] for r in rows], [r["p99_ms"] or 0 for r in rows], marker="o", label=model)
    for ax, label in ((ax_tp, "requests/s"), (ax_p99, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (closed loop)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    s = doc["scaling"]
    if s:
        rows = s["per_second"]
        ax_time.plot([r["second"] for r in rows], [r["throughput"] for r in rows], label="answered/s")
        ax_time.plot([r["second"] for r in rows], [r["p99_ms"] or 0 for r in rows], label="p99 ms")
        twin = ax_time.twinx()
        twin.step([t for t, _ in s["replicas"]], [n or 0 for _, n in s["replicas"]], color="black", where="post",
                  label="replicas")
        twin.set_ylabel("replicas")
        ax_time.set_xlabel("time (s)")
        ax_time.set_title(f"autoscaling ramp: {s['model']}", fontsize=9)
        ax_time.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()
