"""Load tests of a served run: a concurrency sweep per model, an autoscaling ramp, a report.

The generator is `generator`; this module chooses the loads, reads the replica counts from
Serve (when this process can reach the Ray cluster serving) and has `report` write
`loadtest.{json,md,png}` plus every request in `requests.csv`.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.schema import ReplicaState

from distillery import data
from distillery.config import LoadTestConfig
from distillery.core import console
from distillery.core.errors import UserError
from distillery.core.files import read_json
from distillery.loadtest import auto_scenario, generator
from distillery.loadtest.report import lost_text, write_report
from distillery.measure import timing
from distillery.run.rundir import local_view
from distillery.serving.predictor import Predictor, catalog
from distillery.serving.serve_apps import AppArgs, api_key_digest, build_application

Steps = list[tuple[float, float]]


def replica_counter(app: str, deployment: str) -> generator.ReplicaFn | None:
    """A coroutine giving the RUNNING replicas of `app`'s deployment, or None without Ray."""
    if not ray.is_initialized():
        return None

    def count() -> int | None:
        status = serve.status().applications.get(app)
        if status is None or deployment not in status.deployments:
            return None
        return status.deployments[deployment].replica_states.get(ReplicaState.RUNNING, 0)

    async def replicas() -> int | None:
        return await asyncio.to_thread(count)
    return replicas


def sweep(base_url: str, model: str, body: bytes, levels: list[int], duration_s: float,
          headers: dict | None = None) -> list[dict[str, Any]]:
    """Closed loop at each concurrency level; one summary per level (with per-second rows)."""
    url, rows = f"{base_url}/v2/models/{model}/infer", []
    for level in levels:
        run = generator.closed_loop(url, body, level, duration_s, headers or {})
        samples, replicas, cpu = generator.run_niced(_with(run, model))
        rows.append({"model": model, "concurrency": level, "duration_s": duration_s,
                     **generator.summarize(samples, duration_s), "generator_cpu": round(cpu, 3),
                     "replicas": replicas, "per_second": generator.per_second(samples), "samples": samples})
    return rows


def ramp(base_url: str, model: str, body: bytes, steps: Steps, headers: dict | None = None) -> dict[str, Any]:
    """Open loop through `steps` (requests/s up, then down) while sampling replicas: when the
    deployment scaled up, p99 before/during/after, and what was lost."""
    url = f"{base_url}/v2/models/{model}/infer"
    samples, replicas, cpu = generator.run_niced(_with(generator.open_loop(url, body, steps, headers or {}),
                                                       model))
    return {"model": model, "steps": steps, **scaling_summary(samples, replicas),
            "generator_cpu": round(cpu, 3), "per_second": generator.per_second(samples), "replicas": replicas,
            "samples": samples}


def calibrated_ramp(base_url: str, images: Any, model: str, lcfg: LoadTestConfig, headers: dict,
                    log: Callable[[str], None]) -> dict[str, Any]:
    """The autoscaling ramp at multiples of `model`'s one-replica capacity, measured first
    (closed loop at 2 requests in flight for 3 s, `lcfg.ramp_images` of `images` [N, C, H, W] a
    request)."""
    x = images[:lcfg.ramp_images]
    body = generator.infer_body(x.reshape(-1).tolist(), list(x.shape))
    url = f"{base_url}/v2/models/{model}/infer"
    # Two in flight: enough to keep one replica busy, not more than serve.target_ongoing_requests'
    # default, so the probe itself does not scale the deployment up before the ramp.
    probe = generator.summarize(generator.run_niced(generator.closed_loop(url, body, 2, 3.0, headers)), 3.0)
    capacity = max(probe["throughput"], 1.0)
    steps = [(d, round(f * capacity, 1)) for d, f in lcfg.ramp]
    log(f"[loadtest] {model}: one replica answers {capacity:.0f} requests/s of {lcfg.ramp_images} image(s); "
        "autoscaling ramp " + ", ".join(f"{d:g} s at {r:g}/s" for d, r in steps))
    return ramp(base_url, model, body, steps, headers) | {"capacity_rps": round(capacity, 1),
                                                          "images": lcfg.ramp_images,
                                                          "load_factors": [f for _, f in lcfg.ramp]}


async def _with(run, model: str):
    deployment = "Auto" if model == "auto" else "Model"
    return await generator.with_replicas(run, replica_counter(model, deployment), every_s=1.0)


def scaling_summary(samples: list[generator.Sample],
                    replicas: list[tuple[float, int | None]]) -> dict[str, Any]:
    """First scale-up time, peak replicas, p99 before / while / after more than the initial
    replicas ran, and requests lost (anything but 200 and a counted 503)."""
    counts = [(t, n) for t, n in replicas if n is not None]
    start = counts[0][1] if counts else None
    up = next((t for t, n in counts if start is not None and n > start), None)
    down = next((t for t, n in counts
                 if start is not None and up is not None and t > up and n <= start), None)

    def p99(lo: float, hi: float) -> float | None:
        return generator.percentile([s.latency_ms for s in samples
                                     if s.status == 200 and lo <= s.scheduled < hi], 99)

    end = max((s.scheduled for s in samples), default=0.0) + 1
    return {"initial_replicas": start, "peak_replicas": max((n for _, n in counts), default=None),
            "scaled_up_at_s": up, "scaled_down_at_s": down,
            "p99_before_ms": p99(0, up if up is not None else end),
            "p99_scaled_ms": p99(up, down if down is not None else end) if up is not None else None,
            "p99_after_ms": p99(down, end) if down is not None else None,
            "requests": len(samples), "ok": sum(s.status == 200 for s in samples),
            "rejected_503": sum(s.status == 503 for s in samples),
            "rejected_503_once_scaled": sum(s.status == 503 and up is not None and s.sent >= up
                                            for s in samples),
            "lost": sum(s.status not in (200, 503) for s in samples),
            "lost_by_kind": generator.lost_by_kind(dict(Counter(str(s.status) for s in samples
                                                                if s.status != 200)))}


def held_out_images(location: str | Path, split: str = "test") -> tuple[Any, Any]:
    """The run's `split` (x, y), read from its folder or, for a run at a URI, from this
    node's verified copy of the data files."""
    wanted = ("data/manifest.json", f"data/{split}-")
    root, _ = local_view(str(location), lambda rel: rel.startswith(wanted))
    return data.load_split(root / "data", split)


def images_to_send(location: str | Path, count: int) -> Any:
    """`count` validation images for the load, repeated when the split has fewer: the load
    test tunes settings (a choice), so it never sends the test split, labels or not."""
    x, _ = held_out_images(location, "val")
    if not len(x):  # a run the data stage refuses today; one made before may have none
        raise UserError(f"{location}: its validation split is empty, and the load test sends "
                        "validation images")
    return x.repeat(-(-count // len(x)), 1, 1, 1)[:count]


def run_loadtest(base_url: str, run_dir: str | Path, lcfg: LoadTestConfig, headers: dict, out: Path,
                 log: Callable[[str], None] = print, tuning: Callable[[bytes, int], list[dict]] | None = None,
                 slo_ms: float | None = None) -> list[Path]:
    """The load test of a served run: the autoscaling ramp first (while the deployment still
    runs its minimum of replicas), then a closed-loop sweep per model, the serving-level
    frontier and each model's in-process rate, then the adaptive scenario (objective `slo_ms`,
    default the p99 target); `tuning(body, concurrency)` adds its section. Writes the report
    into `out`; returns its files."""
    served = catalog(run_dir)
    models = lcfg.models or served_names(base_url, headers)
    images = images_to_send(run_dir, max(lcfg.images, lcfg.ramp_images))
    x = images[:lcfg.images]
    body = generator.infer_body(x.reshape(-1).tolist(), list(x.shape))
    scaling, sweeps = None, []
    phases = planned_seconds(lcfg, models)
    with console.progress("[loadtest]", sum(phases.values()), "s of load") as advance:
        if lcfg.ramp:
            model = lcfg.ramp_model or max(served, key=lambda m: m.p50_ms).name
            scaling = calibrated_ramp(base_url, images, model, lcfg, headers, log)
            advance(phases["ramp"], note="autoscaling ramp")
        for model in models if lcfg.concurrency else []:
            log(f"[loadtest] {model}: closed loop at concurrency {lcfg.concurrency}, "
                f"{lcfg.duration_s:g} s each")
            sweeps += sweep(base_url, model, body, lcfg.concurrency, lcfg.duration_s, headers)
            advance(phases["sweeps"] / len(models), note=f"{model} swept")
        extra: dict[str, Any] = {"frontier": serving_frontier(sweeps, served, lcfg.p99_target_ms),
                                 "overhead": in_process_rates(served, x, lcfg.duration_s)} if sweeps else {}
        if lcfg.adaptive and "auto" in models:
            extra["adaptive"] = auto_scenario.scenario(base_url, served, images[:lcfg.ramp_images],
                                                       lcfg.adaptive, slo_ms or lcfg.p99_target_ms, headers,
                                                       log)
    if tuning is not None:
        extra["tuning"] = tuning(body, max(lcfg.concurrency or [32]))
    extra["ingress"] = served_ingress(base_url, headers)
    return write_report(out, sweeps, scaling, timing.machine_info(), extra)


def _server_json(base_url: str, route: str, headers: dict) -> dict:
    request = urllib.request.Request(f"{base_url}{route}", headers=headers)
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())


def served_ingress(base_url: str, headers: dict) -> str | None:
    """The ingress in front of the server, as the server tells it (`GET /v2`): this process's
    environment says nothing about a server started elsewhere. None if it does not say."""
    return _server_json(base_url, "/v2", headers).get("ingress")


def served_names(base_url: str, headers: dict) -> list[str]:
    """What the server says it serves (`GET /v2/models`): `auto` only where it runs."""
    return _server_json(base_url, "/v2/models", headers)["models"]


def planned_seconds(lcfg: LoadTestConfig, models: list[str]) -> dict[str, float]:
    """Seconds of load each phase sends (probes and warm-ups included), for the progress shown."""
    adaptive_s = (2 * 3.0 + 3 * (1.0 + sum(d for d, _ in lcfg.adaptive))
                  if lcfg.adaptive and "auto" in models else 0.0)
    return {"ramp": 3.0 + sum(d for d, _ in lcfg.ramp) if lcfg.ramp else 0.0,
            "sweeps": len(models) * len(lcfg.concurrency) * lcfg.duration_s, "adaptive": adaptive_s}


def summary(report_json: Path) -> dict[str, Any]:
    """The headline figures of a written load test, for the run manifest."""
    doc = read_json(report_json)
    best: dict[str, float] = {}
    for r in doc["sweeps"]:
        best[r["model"]] = max(best.get(r["model"], 0.0), r["throughput"])
    s = doc["scaling"] or {}
    errors: Counter[str] = Counter()  # sweeps: by status; the ramp counts its own
    for r in doc["sweeps"]:
        errors.update(r["errors"])
    lost = Counter(generator.lost_by_kind(dict(errors))) + Counter(s.get("lost_by_kind") or {})
    return {"peak_requests_per_s": best,
            "requests": sum(r["requests"] for r in doc["sweeps"]) + s.get("requests", 0),
            "rejected_503": errors["503"] + s.get("rejected_503", 0),
            "lost": sum(n for code, n in errors.items() if code != "503") + s.get("lost", 0),
            "lost_by_kind": dict(lost),
            **{k: s.get(k) for k in ("initial_replicas", "peak_replicas", "scaled_up_at_s",
                                     "scaled_down_at_s")}}


def summary_line(report_json: Path) -> str:
    """The load test in one console line: requests, refused, lost, replicas, the report."""
    s = summary(report_json)
    ramp = (f"; replicas {s['initial_replicas']} -> {s['peak_replicas']} in the ramp"
            if s["peak_replicas"] else "")
    return (f"[loadtest] {s['requests']:,} requests: {s['rejected_503']:,} refused under overload (503), "
            f"{s['lost']:,} lost{lost_text(s['lost_by_kind'])}{ramp} -> {report_json.parent / 'loadtest.md'}")


def in_process_rates(served: list, x, seconds: float) -> dict[str, float]:
    """Calls/s of each model's own predictor in this process at the load's batch size: the
    ceiling the HTTP figures are compared with."""
    rates = {}
    for m in served:
        predictor, n, start = Predictor(m), 0, time.perf_counter()
        while time.perf_counter() - start < min(seconds, 2.0):
            predictor(x)
            n += 1
        rates[m.name] = n / (time.perf_counter() - start)
    return rates


# ---------------------------------------------------------------- serving frontier and tuning


def sustained(rows: list[dict], p99_target_ms: float) -> dict[str, Any] | None:
    """The sweep row with the most requests/s whose p99 is within the target (None: none is)."""
    ok = [r for r in rows if r["p99_ms"] is not None and r["p99_ms"] <= p99_target_ms and not r["errors"]]
    return max(ok, key=lambda r: r["throughput"]) if ok else None


def serving_frontier(sweeps: list[dict], served: list, p99_target_ms: float) -> list[dict[str, Any]]:
    """Per served model: test accuracy, the model-level p50 (compression stage) and the highest
    request rate it sustained with p99 within the target (this load test)."""
    out = []
    for m in served:
        best = sustained([r for r in sweeps if r["model"] == m.name], p99_target_ms)
        out.append({"model": m.name, "test_accuracy": m.test_accuracy, "mode": m.mode,
                    "model_p50_ms": m.p50_ms, "sustained_rps": best["throughput"] if best else 0.0,
                    "at_concurrency": best["concurrency"] if best else None, "p99_target_ms": p99_target_ms})
    return out


def tune(base_url: str, run_dir: str, model: str, body: bytes, cfg, api_key: str | None,
         grid: list[tuple[int, float]], concurrency: int, seconds: float, p99_target_ms: float, headers: dict,
         settle_s: float = 5.0) -> dict[str, Any]:
    """Redeploy `model` on one replica with each (max_batch_size, batch_wait_timeout_s) of
    `grid`, load it at `concurrency`, keep the setting with the most requests/s within the
    p99 target; `target_ongoing_requests` becomes the highest concurrency whose p99 stayed within
    the target in a sweep at those settings (so autoscaling adds replicas before p99 leaves it).
    The model is left deployed as tuned."""
    def deploy(**update) -> None:
        settings = cfg.model_copy(update=update).model_dump()
        args = AppArgs(kind="model", run_dir=run_dir, models=[model], settings=settings,
                       api_key_sha256=api_key_digest(api_key))
        serve.run(build_application(args), name=model, route_prefix=f"/v2/models/{model}")
        # A new replica imports torch and loads the model while the old one drains: on 2 cores
        # that takes the CPU for seconds. Measured before it settles, every setting looks bad.
        time.sleep(settle_s)
        sweep(base_url, model, body, [concurrency], 2.0, headers)  # warm-up, not recorded

    trials = []
    for batch, wait in grid:
        deploy(max_batch_size=batch, batch_wait_timeout_s=wait, min_replicas=1, max_replicas=1)
        row = sweep(base_url, model, body, [concurrency], seconds, headers)[0]
        trials.append({"max_batch_size": batch, "batch_wait_timeout_s": wait, "throughput": row["throughput"],
                       "p99_ms": row["p99_ms"], "errors": row["errors"]})
    within = [t for t in trials
              if t["p99_ms"] is not None and t["p99_ms"] <= p99_target_ms and not t["errors"]]
    best = (max(within, key=lambda t: t["throughput"]) if within
            else min(trials, key=lambda t: t["p99_ms"] or 1e9))
    deploy(max_batch_size=best["max_batch_size"], batch_wait_timeout_s=best["batch_wait_timeout_s"],
           min_replicas=1, max_replicas=1)
    levels = sorted({1, 2, 4, 8, 16, concurrency})
    curve = sweep(base_url, model, body, levels, seconds, headers)
    within_curve = [r["concurrency"] for r in curve
                    if r["p99_ms"] is not None and r["p99_ms"] <= p99_target_ms]
    target = max(within_curve, default=1)  # scale out before a replica's p99 leaves the target
    chosen = {"max_batch_size": best["max_batch_size"], "batch_wait_timeout_s": best["batch_wait_timeout_s"],
              "target_ongoing_requests": float(target)}
    deploy(**chosen)  # back to its autoscaling bounds, tuned
    return {"model": model, "chosen": chosen, "within_p99_target": bool(within), "trials": trials,
            "curve": [{k: r[k] for k in ("concurrency", "throughput", "p99_ms")} for r in curve]}
