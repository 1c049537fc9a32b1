"""`distillery serve` and `distillery query`: the command-line ends of the serving layer."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from distillery.compat import environment, ingress
from distillery.config import LoadTestConfig, load_config
from distillery.core import console
from distillery.core.errors import UserError
from distillery.run import storage
from distillery.run.rundir import local_view


def serve(args: argparse.Namespace) -> None:
    verb = args.words[0] if args.words[0] in ("build", "env") else None
    words = args.words[1:] if verb else args.words
    if len(words) != 1:
        raise UserError("usage: distillery serve [build|env] RUN_DIR (a folder or an s3:// / gs:// URI)")
    location = _location(words[0])
    root, cfg = _run_config(location, args.overrides)
    if verb == "env":  # for `eval "$(distillery serve env runs/digits)" && serve run serve/config.yaml`
        env = ingress.ingress_env(ingress.resolve(cfg.serve.ingress), cfg.serve.host, local=False)
        print("\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items()))
        return
    if verb == "build":
        from distillery.serving.launch import write_serve_config  # Ray Serve loads only when needed

        out = write_serve_config(location, cfg, Path(args.output or root / "serve" / "config.yaml"))
        print(f"Serve config: {out}\n  serve run {out}")
        return

    environment.ask_for_token_auth(cfg.ray.address)  # before Ray is imported
    from distillery.serving import launch  # Ray Serve loads only for the commands that deploy

    # Like `run`: distillery's own few lines here, Ray's and Serve's in the log (and here with --verbose).
    logs = console.log_to(root / "logs" / "serve.log")
    console.say(f"logs: {logs} (Ray's and Serve's own lines; --verbose prints them here too)")
    url, _ = launch.deploy_run(location, cfg, console.say, root / "serve")
    console.say(f"serving {url} (models: {url}/models); Ctrl-C stops")
    launch.serve_until_interrupted()


def _run_config(location: str, overrides: list[str]):
    """(a local folder with the run's config and frontier, the run's config with `overrides`)."""
    # The cluster may have changed since the run (it was a local instance, or another
    # cluster): the run's recorded `ray.address` would otherwise pin serving to it.
    bad = [o for o in overrides if not o.startswith(("serve.", "ray.address=", "ray.shared_filesystem="))]
    if bad:
        raise UserError(f"--set {bad[0]!r}: only serve.* settings, ray.address and ray.shared_filesystem can "
                        "change when serving a finished run")
    root, _ = local_view(location, lambda rel: rel == "frontier.json")
    if storage.is_uri(location):
        storage.download(location, "config.yaml", root / "config.yaml")
    if not (root / "frontier.json").is_file():
        raise UserError(f"{location}: no frontier.json; run `distillery compress` (or "
                        "`distillery run`) first")
    return root, load_config(root / "config.yaml", overrides)


def query(args: argparse.Namespace) -> None:
    x, truth = _images(args)
    params = {k: v for k, v in (("min_accuracy", args.min_accuracy), ("max_latency_ms", args.max_latency_ms))
              if v is not None}
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.reshape(-1).tolist()}],
            **({"parameters": params} if params else {})}
    headers = {"content-type": "application/json"}
    if args.api_key_env:
        headers["x-api-key"] = os.environ.get(args.api_key_env, "")
    url = f"{args.url.rstrip('/')}/v2/models/{args.model}/infer"
    start = time.perf_counter()
    reply = _post(url, json.dumps(body).encode(), headers)
    ms = 1e3 * (time.perf_counter() - start)
    labels = next(o["data"] for o in reply["outputs"] if o["name"] == "label")
    shown = [f"{p}" + (f" (true {t})" if t is not None else "") for p, t in zip(labels, truth)]
    print(f"model {args.model} answered by {reply['parameters']['variant']} in {ms:.1f} ms for "
          f"{len(labels)} image(s)")
    print("predicted: " + ", ".join(shown))
    if truth[0] is not None:
        print(f"correct: {sum(p == t for p, t in zip(labels, truth))}/{len(labels)}")


def _images(args: argparse.Namespace) -> tuple[np.ndarray, list]:
    if args.input:
        try:
            x = np.load(args.input, allow_pickle=False).astype(np.float32)
        except (OSError, ValueError) as e:
            raise UserError(f"{args.input}: not a readable .npy array ({e})") from None
        return x, [None] * len(x)
    from distillery.loadtest.run import held_out_images

    if args.sample < 1:
        raise UserError("--sample needs N >= 1")
    x, y = held_out_images(_location(args.run_dir))
    return x[:args.sample].numpy(), y[:args.sample].tolist()


def _location(run_dir: str) -> str:
    """A run's folder (resolved) or its URI, as every serving function takes it."""
    return run_dir if storage.is_uri(run_dir) else str(Path(run_dir).resolve())


def _post(url: str, body: bytes, headers: dict) -> dict:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")
        raise UserError(f"{url}: HTTP {e.code}: {detail}") from None
    except urllib.error.URLError as e:
        raise UserError(f"{url}: cannot connect ({e.reason}); is `distillery serve` running?") from None


def loadtest(args: argparse.Namespace) -> None:
    from distillery.loadtest import run as lt  # Ray Serve and matplotlib: only for a load test

    location = _location(args.run_dir)
    try:
        lcfg = LoadTestConfig(models=args.models.split(",") if args.models else None,
                              concurrency=(_ints(args.concurrency, "--concurrency") if args.concurrency
                                           else []),
                              duration_s=args.duration, ramp=_steps(args.ramp, "--ramp"),
                              adaptive=_steps(args.adaptive, "--adaptive"),
                              ramp_model=args.ramp_model, ramp_images=args.ramp_images, images=args.images,
                              p99_target_ms=args.p99_target_ms)
    except ValidationError as e:
        raise UserError(f"loadtest: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}") from None
    headers = {"content-type": "application/json"}
    if args.api_key_env:
        headers["x-api-key"] = os.environ.get(args.api_key_env, "")
    out = Path(args.out or _loadtest_folder(location))
    # Like `run`: distillery's own lines here; Ray's, and the report's tables, in the log.
    console.say(f"logs: {console.log_to(out / 'loadtest.log')} (--verbose prints them here too)")
    _connect_ray()
    url = args.url.rstrip("/")
    tuning = ((lambda body, concurrency: _tune(args, location, body, headers, concurrency)) if args.tune
              else None)
    files = lt.run_loadtest(url, location, lcfg, headers, out, console.say, tuning=tuning,
                            slo_ms=args.slo_ms)
    console.detail((out / "loadtest.md").read_text())
    console.say(lt.summary_line(files[0]))


def _loadtest_folder(location: str) -> Path:
    """Where the report goes by default: into the run's folder; for a run at a URI, into a
    local folder, since the bucket's copy of serve/loadtest is the run's recorded one."""
    if not storage.is_uri(location):
        return Path(location) / "serve" / "loadtest"
    return Path("loadtest", Path(location.partition("?")[0]).name)


def _connect_ray() -> None:
    """Join the Ray instance that serves (for replica counts); go on without it if none."""
    import ray

    from distillery.run import cluster

    if not ray.is_initialized():
        try:
            cluster.join_running("auto")
        except (ConnectionError, RuntimeError, ValueError):
            console.say("[loadtest] no Ray cluster reachable: replica counts will be missing")


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"{flag}: expected integers >= 1, got {text!r}")
    return values


def _steps(text: str, flag: str) -> list[list[float]]:
    """[[seconds, load], ...] of "S:LOAD,..."; [] for "" (the phase skipped)."""
    if not text:
        return []
    try:
        steps = [[float(d), float(r)] for d, r in (part.split(":") for part in text.split(","))]
    except ValueError:
        raise UserError(f"{flag}: expected SECONDS:LOAD,... e.g. "
                        f"5:0.25,25:1.4,40:0.05, got {text!r}") from None
    if any(d <= 0 or r <= 0 for d, r in steps):
        raise UserError(f"{flag}: seconds and rates must be positive, got {text!r}")
    return steps


def _tune(args, location: str, body: bytes, headers: dict, concurrency: int) -> list[dict]:
    import ray

    from distillery.loadtest import run as lt
    from distillery.serving.predictor import catalog
    from distillery.serving.serve_apps import read_api_key, save_tuned

    if not ray.is_initialized():
        raise UserError("--tune redeploys models: it needs the Ray cluster that serves them (none reachable)")
    cfg = _run_config(location, [])[1].serve
    key = read_api_key(cfg.api_key_env)
    grid = [(1, 0.0), (16, 0.002), (64, 0.005), (64, 0.02)]
    results = []
    for m in catalog(location):
        console.say(f"[loadtest] tuning {m.name}: batch/wait {grid} at concurrency {concurrency}")
        results.append(lt.tune(args.url.rstrip("/"), location, m.name, body, cfg, key, grid,
                               concurrency, args.duration, args.p99_target_ms, headers))
    save_tuned(location, {r["model"]: r for r in results})
    return results


def top(args: argparse.Namespace) -> None:
    """`distillery top`: refresh a table of the served models every --interval seconds."""
    from rich.console import Console
    from rich.live import Live

    from distillery.serving import top as watch

    if args.interval <= 0 or args.window <= 0:
        raise UserError("--interval and --window must be above 0 seconds")
    if args.targets:
        targets = args.targets.split(",")
    elif storage.is_uri(args.run_dir):
        raise UserError(
            f"{args.run_dir}: give --targets (the node that served it printed them, and wrote them to "
            "its local serve/prometheus.yml)"
        )
    else:
        targets = watch.targets_of(str(Path(args.run_dir) / "serve" / "prometheus.yml"))
    view = watch.Watch(targets, args.window)
    if args.samples:
        for i in range(args.samples):
            table = _top_table(*view.tick(), targets)
            if i + 1 < args.samples:
                time.sleep(args.interval)
        Console(width=120).print(table)
        return
    with Live(_top_table(*view.tick(), targets), refresh_per_second=4) as live:
        while True:
            time.sleep(args.interval)
            live.update(_top_table(*view.tick(), targets))


def _top_table(rows: list, rung: float | None, seconds: float, targets: list[str]):
    from rich.table import Table

    title = f"distillery top: {len(targets)} node(s), over the last {seconds:.0f} s" + \
        (f"; auto on rung {rung:.0f} (0: most accurate)" if rung is not None else "")
    table = Table(title=title)
    for column in ("model", "requests/s", "p50 ms", "p99 ms", "batch", "replicas"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in rows:
        table.add_row(
            r.model,
            f"{r.rps:,.1f}",
            *(f"{v:.2f}" if v is not None else "-" for v in (r.p50_ms, r.p99_ms)),
            f"{r.batch:.1f}" if r.batch is not None else "-",
            str(r.replicas),
        )
    return table
