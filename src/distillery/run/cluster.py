"""Joining Ray: the cluster a job was submitted to (or `ray.address`), else a local instance.

Every stage that uses Ray (training, the logits cache, the search, serving) calls `ensure_ray`
first, so a local instance is started once, with Serve's ingress chosen before it starts.
"""

from __future__ import annotations

import logging
import math
import os

import ray
import ray.data

from distillery.compat import environment, ingress, logs
from distillery.compat.worker import worker_setup
from distillery.config import PipelineConfig, ServeConfig
from distillery.core import console
from distillery.core.errors import UserError
from distillery.run import storage


def cluster_address(cfg: PipelineConfig) -> str | None:
    """The cluster to join: `ray.address`, else the one a submitted job runs on; None: local."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS")


def ensure_ray(cfg: PipelineConfig) -> None:
    """Join the cluster this job runs on (or `ray.address`), else start a local instance.
    First set the switches Ray Train and Tune read from this driver's environment when a
    training run or a search starts (`compat.environment`), so no stage sets one of them."""
    environment.fast_train_reports()
    environment.legacy_tune_output()
    if not ray.is_initialized():
        _init(cfg)
        check_machines(cfg)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-dataset INFO lines, in this driver too
    context = ray.data.DataContext.get_current()  # this driver's; each Dataset carries a copy
    # Per-epoch progress bars would drown the epoch lines.
    context.enable_progress_bars = context.print_on_execution_start = context.enable_auto_log_stats = False


def _init(cfg: PipelineConfig) -> None:
    # The job's workers, and the Serve actors it starts (controller, proxies, replicas), run
    # `worker_setup` first.
    job_env = {"worker_process_setup_hook": worker_setup}
    # The output of Ray's processes (workers, replicas, the raylet) stays in Ray's log files
    # unless --verbose; epochs reach the console through `training.epoch_feed`, not worker prints.
    quiet = {**_quiet_init(), "runtime_env": job_env}
    if cluster_address(cfg):
        ray.init(address=cluster_address(cfg), **quiet)
    else:
        _init_local(cfg, quiet)
    console.quiet_library_loggers()  # ray.init set up its own handlers on the console
    if log := console.log_file():
        logs.link_session_logs(log.parent / "ray")  # <run>/logs/ray: a run's logs in one place


def join_running(address: str = "auto") -> None:
    """Join the Ray instance already running at `address` (a client's command: the one that
    serves), its output sent where the console says, as a run's is."""
    ray.init(address=address, **_quiet_init())
    console.quiet_library_loggers()


def _quiet_init() -> dict:
    """ray.init's arguments that keep Ray's own output (workers, replicas, the raylet) in Ray's
    log files and the command's log, unless --verbose."""
    console.quiet_library_loggers()  # importing ray gave its logger a console handler
    if console.quiet():
        logs.route_raylet_messages(console.detail)  # to the command's log
    return {"logging_level": logging.WARNING, "log_to_driver": not console.quiet(),
            "configure_logging": not console.quiet()}


def machines() -> list[str]:
    """The addresses of the cluster's live nodes, one per machine (nodes of a one-machine test
    cluster share 127.0.0.1)."""
    return sorted({n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]})


def check_machines(cfg: PipelineConfig) -> None:
    """Refuse, before any stage spends time, what cannot work on nodes that are separate
    machines: Ray Train would retry a worker that cannot read the run three times, and a
    serving listener on loopback is out of every other machine's reach."""
    addresses = machines()
    if len(addresses) < 2:
        return
    if not storage.is_uri(cfg.storage_path) and not cfg.ray.shared_filesystem:
        raise UserError(f"storage_path={cfg.storage_path!r} is a folder on this machine, but the cluster's "
                        f"nodes are {len(addresses)} machines ({', '.join(addresses)}): workers elsewhere "
                        "cannot read it. Use a bucket every node reaches (--set "
                        "storage_path=s3://BUCKET/runs or gs://...), or, if the folder is a shared "
                        "filesystem mounted at the same path on every node, --set "
                        "ray.shared_filesystem=true")
    if cfg.serve.enabled:
        check_serve_host(cfg.serve, addresses)


def check_serve_host(serve: ServeConfig, addresses: list[str]) -> None:
    """serve.host on a cluster of several machines: not loopback (HAProxy on the head reaches
    replicas on other machines at their node's address, and users reach the ingress from
    elsewhere); and the host this node's Ray was started with, or its gRPC listeners differ."""
    if len(addresses) > 1 and ingress.is_loopback(serve.host):
        raise UserError(f"serve.host={serve.host} on a cluster of {len(addresses)} machines "
                        f"({', '.join(addresses)}): HAProxy could not reach the replicas on other machines "
                        "(every request would take Ray's slow fallback proxy) and no one off this machine "
                        "could reach the ingress. Set serve.host=0.0.0.0 and start the nodes as "
                        "cluster.yaml does (its firewall leaves only the ingress open to users)")
    node = os.environ.get(ingress.SERVE_HOST_VAR)
    if node and node != serve.host:
        console.say(f"[serve] warning: serve.host={serve.host} but this node's Ray was started with "
                    f"{ingress.SERVE_HOST_VAR}={node}: Serve's gRPC listeners bind {node}; start the nodes "
                    f"with {ingress.SERVE_HOST_VAR}={serve.host} (cluster.yaml)")


def _init_local(cfg: PipelineConfig, quiet: dict) -> None:
    ingress.apply(cfg.serve.ingress, cfg.serve.host)  # Serve's ingress: chosen by Ray's environment
    environment.no_preemption_watcher()

    # Logical CPUs beyond the workers' share, so Ray Data's read tasks are never starved
    # by the training workers holding every CPU (a deadlock on a 2-core machine).
    num_cpus = max(os.cpu_count() or 1, math.ceil(cfg.ray.workers * cfg.ray.cpus_per_worker)) + 2
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **quiet)


