"""Joining Ray: the cluster a job was submitted to (or `ray.address`), else a local instance.

Every stage that uses Ray (training, the logits cache, serving) calls `ensure_ray` first, so
a local instance is started once, with Serve's ingress chosen before it starts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os

import ray
import ray.data

from distillery import console
from distillery.config import PipelineConfig
from distillery.process_setup import worker_setup
from distillery.serving import ingress


def cluster_address(cfg: PipelineConfig) -> str | None:
    """The cluster to join: `ray.address`, else the one a submitted job runs on; None: local."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS")


def ensure_ray(cfg: PipelineConfig) -> None:
    """Join the cluster this job runs on (or `ray.address`), else start a local instance."""
    if not ray.is_initialized():
        _init(cfg)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-dataset INFO lines, in this driver too
    context = ray.data.DataContext.get_current()  # this driver's; each Dataset carries a copy
    # Per-epoch progress bars would drown the epoch lines.
    context.enable_progress_bars = context.print_on_execution_start = context.enable_auto_log_stats = False


def _init(cfg: PipelineConfig) -> None:
    # The job's workers, and the Serve actors it starts (controller, proxies, replicas), run
    # `worker_setup` first.
    job_env = {"worker_process_setup_hook": worker_setup}
    # The output of Ray's processes (workers, replicas, the raylet) stays in Ray's log files
    # unless --verbose; epochs reach the console through `training.feed`, not worker prints.
    quiet = {"logging_level": logging.WARNING, "log_to_driver": not console.quiet(), "runtime_env": job_env,
             "configure_logging": not console.quiet()}
    console.quiet_library_loggers()  # importing ray gave its logger a console handler
    if console.quiet():
        _route_raylet_messages()
    if cluster_address(cfg):
        ray.init(address=cluster_address(cfg), **quiet)
    else:
        _init_local(cfg, quiet)
    console.quiet_library_loggers()  # ray.init set up its own handlers on the console
    _link_ray_logs()


def _route_raylet_messages() -> None:
    """What the raylet reports to a driver ("N worker processes have been started", a task
    retried at shutdown) Ray prints straight to stdout, past `log_to_driver`: to the run's log
    instead. Ray's listener thread looks the printer up at each call."""
    from ray._private import worker

    def to_log(data: dict, ignore_prefix: bool) -> None:
        for line in data.get("lines", []):
            console.detail(f"({data.get('pid', 'ray')}) {line}")

    worker.print_to_stdstream = to_log


def _link_ray_logs() -> None:
    """<run>/logs/ray -> this Ray session's log folder (workers, replicas, the raylet): a
    run's logs in one place. Ray keeps them in its session folder, on this node."""
    run_log, node = console.log_file(), getattr(ray._private.worker.global_worker, "node", None)
    if run_log is None or node is None:
        return
    link = run_log.parent / "ray"
    with contextlib.suppress(OSError):
        link.unlink(missing_ok=True)
        link.symlink_to(node.get_logs_dir_path(), target_is_directory=True)


def _init_local(cfg: PipelineConfig, quiet: dict) -> None:
    ingress.apply(cfg.serve.ingress, cfg.serve.host)  # Serve's ingress: chosen by Ray's environment
    # No node of a local instance is ever preempted: no watcher actor per training run (a
    # process, and an error line about its arguments from Ray 2.60's core worker).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

    # Logical CPUs beyond the workers' share, so Ray Data's read tasks are never starved
    # by the training workers holding every CPU (a deadlock on a 2-core machine).
    num_cpus = max(os.cpu_count() or 1, math.ceil(cfg.ray.workers * cfg.ray.cpus_per_worker)) + 2
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **quiet)


