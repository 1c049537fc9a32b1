"""Joining Ray: the cluster a job was submitted to (or `ray.address`), else a local instance.

Every stage that uses Ray (training, the logits cache, serving) calls `ensure_ray` first, so
a local instance is started once, with Serve's ingress chosen before it starts.
"""

from __future__ import annotations

import logging
import math
import os
import re

import ray
import ray.data

from distillery.config import PipelineConfig
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
    # Ray 2.60's default Parquet reader (DataSourceV2) lists files in a task that idles 3.5-5 s
    # per dataset (measured here on a one-shard split: 92 ms of CPU in 3.6 s); the V1 reader
    # reads the same shards in 0.15-0.2 s. We always pass the exact shard files, so listing
    # buys nothing.
    context.use_datasource_v2 = False


def _init(cfg: PipelineConfig) -> None:
    # The job's workers, and the Serve actors it starts (controller, proxies, replicas), run
    # `worker_setup` first.
    job_env = {"worker_process_setup_hook": worker_setup}
    if cluster_address(cfg):
        ray.init(address=cluster_address(cfg), logging_level=logging.WARNING, runtime_env=job_env)
        return
    ingress.apply(cfg.serve.ingress, cfg.serve.host)  # Serve's ingress: chosen by Ray's environment
    # Logical CPUs beyond the workers' share, so Ray Data's read tasks are never starved
    # by the training workers holding every CPU (a deadlock on a 2-core machine).
    num_cpus = max(os.cpu_count() or 1, math.ceil(cfg.ray.workers * cfg.ray.cpus_per_worker)) + 2
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
             runtime_env=job_env)


def worker_setup() -> None:
    """Every worker process of a distillery job, before it runs anything."""
    quiet_ray_train_logs()
    pin_grpc_listeners(os.environ.get(ingress.HOST_VAR))


def pin_grpc_listeners(host: str | None) -> None:
    """Ray 2.60 binds every gRPC server it starts for Serve (the fallback proxy's, each
    ingress replica's) to `[::]`, all interfaces, whatever `http_options.host` says; nothing
    in its config changes that. In this process, bind them to `host` instead."""
    if not host or host in ingress.ALL_INTERFACES:
        return
    from ray.serve._private import default_impl  # Serve's helper; `grpc_util` looks it up on every call

    add = default_impl.add_grpc_address
    if getattr(add, "pinned_to", None) != host:
        def pinned(server, address: str):
            return add(server, re.sub(r"^\[::\]:", f"{host}:", address))

        pinned.pinned_to = host
        default_impl.add_grpc_address = pinned


def quiet_ray_train_logs() -> None:
    """Every worker process's setup hook: drop Ray Train's per-report INFO line and, without
    the dashboard's state API, the placement-group cleaner's warning every few seconds;
    both would bury the epoch lines. Other Ray Train warnings still show."""
    from ray.train.v2._internal.execution import context  # its logger is named by file path, not module

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # "dataset execution finished" for every epoch
