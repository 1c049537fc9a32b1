"""The report of a load test: `loadtest.json` (no per-request rows), `loadtest.md` (the tables
and sentences below), `loadtest.png` and every request in `requests.csv`."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from distillery.core.files import atomic_write_bytes, atomic_write_json
from distillery.loadtest import auto_scenario, generator
from distillery.loadtest.plots import plot


def write_report(out_dir: Path, sweeps: list[dict], scaling: dict | None, machine: dict,
                 extra: dict[str, Any] | None = None) -> list[Path]:
    """loadtest.json (no per-request rows), loadtest.md, loadtest.png, requests.csv. `extra`
    may hold `frontier` (serving_frontier), `overhead` and `tuning` sections."""
    out_dir.mkdir(parents=True, exist_ok=True)
    strip = lambda row: {k: v for k, v in row.items() if k != "samples"}  # noqa: E731
    doc = {"machine": machine, "sweeps": [strip(r) for r in sweeps],
           "scaling": strip(scaling) if scaling else None, **(extra or {})}
    atomic_write_json(out_dir / "loadtest.json", doc)
    atomic_write_bytes(out_dir / "loadtest.md", markdown(doc).encode())
    atomic_write_bytes(out_dir / "loadtest.png", plot(doc))
    atomic_write_bytes(out_dir / "requests.csv", _requests_csv(sweeps, scaling))
    names = ["loadtest.json", "loadtest.md", "loadtest.png", "requests.csv"]
    if doc.get("adaptive"):
        atomic_write_bytes(out_dir / "adaptive.png", auto_scenario.plot(doc["adaptive"]))
        names.append("adaptive.png")
    return [out_dir / name for name in names]


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


_ms = auto_scenario.ms_text


def lost_text(kinds: dict[str, int] | None) -> str:
    """' (3 connection failed, 1 500 (server error))', or '' when nothing was lost."""
    return f" ({', '.join(f'{n} {kind}' for kind, n in kinds.items())})" if kinds else ""


def markdown(doc: dict) -> str:
    lines = ["# Load test", "", "| model | concurrency | requests/s | p50 ms | p95 ms | p99 ms | errors | "
             "replicas | generator CPU |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in doc["sweeps"]:
        counts = [n for _, n in r["replicas"] if n is not None]
        lines.append(f"| {r['model']} | {r['concurrency']} | {r['throughput']:.1f} | {_ms(r['p50_ms'])} | "
                     f"{_ms(r['p95_ms'])} | {_ms(r['p99_ms'])} | {r['errors'] or '-'} | "
                     f"{max(counts) if counts else '-'} | {r['generator_cpu']:.0%} |")
    lines.append("\nErrors by HTTP status: 503 is a request refused under overload (backpressure); every "
                 "other one is lost ("
                 + "; ".join(f"{code}: {kind}" for code, kind in generator.LOST_KINDS.items()) + ").")
    s = doc["scaling"]
    if s:
        scaled = "did not scale up" if s["scaled_up_at_s"] is None else (
            f"scaled up at {s['scaled_up_at_s']:g} s, "
            + ("did not scale back down" if s["scaled_down_at_s"] is None
               else f"back down at {s['scaled_down_at_s']:g} s"))
        measured = (f"one replica measured at {s['capacity_rps']:g} requests/s of {s['images']} image(s), so "
                    if "capacity_rps" in s else "")
        lines += ["", f"Autoscaling ramp on {s['model']} "
                  f"({measured}{', '.join(f'{d:g} s at {q:g}/s' for d, q in s['steps'])}): replicas "
                  f"{s['initial_replicas']} -> {s['peak_replicas']}, {scaled}; p99 {_ms(s['p99_before_ms'])} "
                  f"ms before, {_ms(s['p99_scaled_ms'])} ms scaled, {_ms(s['p99_after_ms'])} ms after; "
                  f"{s['ok']} of {s['requests']} answered 200, {s['rejected_503']} rejected with 503 "
                  f"({s.get('rejected_503_once_scaled', '-')} of them sent after the scale-up), {s['lost']} "
                  f"lost{lost_text(s.get('lost_by_kind'))}."]
    lines += _frontier_lines(doc.get("frontier"), doc.get("overhead"))
    lines += auto_scenario.markdown_lines(doc.get("adaptive"))
    lines += _tuning_lines(doc.get("tuning"))
    m = doc["machine"]
    lines += [""] + ([f"HTTP {doc['ingress']}."] if doc.get("ingress") else [])
    lines += [f"Machine: {m.get('cpu')}, {m.get('logical_cores')} logical cores; the load generator "
              "ran on the same machine (its CPU share is in the table). Latency counts from the "
              "scheduled send time."]
    return "\n".join(lines) + "\n"


def _frontier_lines(frontier: list[dict] | None, overhead: dict | None) -> list[str]:
    if not frontier:
        return []
    target = frontier[0]["p99_target_ms"]
    lines = ["", f"Serving-level frontier (highest closed-loop rate with p99 <= {target:g} ms and no "
             "errors):", "",
             "| model | test acc | served mode | model p50 ms (batch 1, that mode) | sustained requests/s | "
             "at concurrency | in process, calls/s |", "|---|---:|---|---:|---:|---:|---:|"]
    for f in frontier:
        here = (overhead or {}).get(f["model"])
        lines.append(f"| {f['model']} | {f['test_accuracy']:.2%} | {f.get('mode', '-')} | "
                     f"{f['model_p50_ms']:.3f} | {f['sustained_rps']:.1f} | {f['at_concurrency'] or '-'} | "
                     f"{f'{here:,.0f}' if here else '-'} |")
    return lines


def _tuning_lines(tuning: list[dict] | None) -> list[str]:
    if not tuning:
        return []
    lines = ["", "Serve tuning (one replica; written to serve/tuned.json and used by "
             "`distillery serve build`):", ""]
    for t in tuning:
        c = t["chosen"]
        tried = ", ".join(f"{x['max_batch_size']}/{x['batch_wait_timeout_s'] * 1e3:g} ms: "
                          f"{x['throughput']:.0f}/s p99 {_ms(x['p99_ms'])}" for x in t["trials"])
        lines.append(f"- {t['model']}: max_batch_size {c['max_batch_size']}, batch_wait_timeout_s "
                     f"{c['batch_wait_timeout_s']}, target_ongoing_requests {c['target_ongoing_requests']:g} "
                     f"(tried batch/wait: {tried})")
    return lines
