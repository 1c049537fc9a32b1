"""Putting a run's models on Ray Serve and keeping them there: the serve stage of
`distillery run`, `distillery serve`, and the Serve config file for `serve run/deploy`."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import ray
import yaml
from ray import serve as ray_serve

from distillery.compat import ingress
from distillery.core import console
from distillery.core.files import atomic_write_bytes
from distillery.run.cluster import check_serve_host, cluster_address, ensure_ray, machines
from distillery.serving import auto_policy, prometheus, serve_apps
from distillery.serving.predictor import catalog


def serve_until_interrupted() -> None:
    """Serve until Ctrl-C or `kill` (SIGTERM), then take the deployments down."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    # Installed explicitly: a process started in the background by a non-interactive shell
    # (`nohup ... &`, CI) inherits SIGINT as ignored, and would otherwise never stop on it.
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        ray_serve.shutdown()


def write_serve_config(location: str, cfg, out: Path) -> Path:
    """The applications of the run at `location` (its folder or URI) as a Serve config file,
    for `serve run` / `serve deploy`."""
    doc = serve_apps.config_document(location, cfg.serve, serve_apps.read_api_key(cfg.serve.api_key_env))
    atomic_write_bytes(out, yaml.safe_dump(doc, sort_keys=False).encode())
    return out


def scrape_targets() -> tuple[list[str], list[str]]:
    """(every live node's Ray metrics agent, this node's HAProxy exporter) as host:port."""
    agents = [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray.nodes()
              if n.get("Alive") and n.get("MetricsExportPort")]
    haproxy = ingress.haproxy_metrics_target()
    return agents, [haproxy] if haproxy else []


def write_scrape_config(serve_dir: Path, log) -> Path:
    """`serve_dir/prometheus.yml`, naming what it scrapes."""
    agents, haproxy = scrape_targets()
    out = prometheus.write(serve_dir, agents, haproxy)
    log(f"[serve] metrics: Ray's agents {', '.join(agents)}" + (f"; HAProxy {haproxy[0]}" if haproxy else "")
        + f" -> prometheus --config.file={out}")
    return out


def deploy_run(location: str, cfg, log, serve_dir: Path | None = None) -> tuple[str, dict[str, str]]:
    """Deploy the models of the run at `location` (its folder or URI) on the Ray cluster (a
    local one if none); return (URL, the headers a client needs). With `serve_dir` and
    `serve.metrics` on, write a Prometheus config there that scrapes them."""
    key = serve_apps.read_api_key(cfg.serve.api_key_env)
    ensure_ray(cfg)
    console.quiet_library_loggers()  # importing ray.serve gave its logger a console handler
    check_serve_host(cfg.serve, machines())
    log(f"[serve] {ingress.current()}")
    start = time.perf_counter()
    url = serve_apps.deploy(location, cfg.serve, key)
    grpc = "; gRPC (inference.GRPCInferenceService) on " \
        f"{serve_apps.public_host(cfg.serve)}:{cfg.serve.grpc_port}" if cfg.serve.grpc_port else ""
    log(f"[serve] running in {time.perf_counter() - start:.0f} s: {url}{grpc}")
    if cfg.serve.proxy_location == "EveryNode":
        ports = " and ".join(str(p) for p in (cfg.serve.port, cfg.serve.grpc_port) if p)
        log(f"[serve] and an ingress on {ports} of every node that holds replicas "
            "(serve.proxy_location=EveryNode)")
    if serve_dir is not None and cfg.serve.metrics:
        write_scrape_config(serve_dir, log)
    if cfg.serve.auto:
        rungs = auto_policy.ladder(catalog(location, cfg.serve.models))
        log(f"[serve] auto: {' > '.join(m.name for m in rungs)} (most accurate first, each faster than those "
            "above; chosen on validation)")
    return url, {"content-type": "application/json", **({"x-api-key": key} if key else {})}


def after_run(run, cfg, keep: bool, log) -> None:
    """The end of `distillery run`: keep the run's models served, or take them down.
    Serve outlives this process on a cluster (the job may end); a local Ray instance dies
    with it, so locally this waits for Ctrl-C."""
    local = not cluster_address(cfg)  # a local instance ends with this process
    names = serve_apps.app_names(run.location, cfg.serve)
    if not keep:
        if local and ray.is_initialized():
            ray_serve.shutdown()
        elif not local:  # a shared cluster: take down this run's applications, and only those
            ensure_ray(cfg)
            running = ray_serve.status().applications
            for name in (n for n in names if n in running):
                ray_serve.delete(name)
        log("[serve] shut down (--no-keep-serving)")
        return
    ensure_ray(cfg)
    if serve_apps.running(names):
        url = serve_apps.public_url(cfg.serve)
    else:
        url, _ = deploy_run(run.location, cfg, log, run.root / "serve")
    log(f"serving {url} (models: {url}/models)\n  distillery query --run-dir {run.address} "
        "--model auto --sample 4")
    if local:
        log("Ctrl-C stops serving")
        serve_until_interrupted()
