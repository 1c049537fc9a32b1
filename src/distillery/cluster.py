"""Joining Ray: the cluster a job was submitted to (or `ray.address`), else a local instance.

Every stage that uses Ray (training, the logits cache, serving) calls `ensure_ray` first, so
a local instance is started once, with Serve's ingress chosen before it starts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys

import ray
import ray.data

from distillery import console
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


def worker_setup() -> None:
    """Every worker process of a distillery job, before it runs anything."""
    quiet_ray_train_logs()
    pin_grpc_listeners(os.environ.get(ingress.HOST_VAR))
    route_stock_grpc_calls()


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


PROTOCOL_SERVICE = "/inference.GRPCInferenceService/"  # the Open Inference Protocol's gRPC methods


def route_stock_grpc_calls() -> None:
    """Ray's Python proxy routes a gRPC call by its `application` metadata and answers
    NOT_FOUND without it, and stock protocol clients (tritonclient, KServe's SDK) never send
    it. In this process (the proxy's, when it is one), a protocol call without it goes to the
    `grpc` application, as HAProxy's default backend sends it (`ingress.route_grpc_to`)."""
    from ray.serve._private.proxy_request_response import gRPCProxyRequest  # read in __init__ of each call

    setup = gRPCProxyRequest.setup_variables
    if getattr(setup, "routes_stock_calls", False):
        return

    def setup_variables(self) -> None:
        setup(self)
        if self.service_method.startswith(PROTOCOL_SERVICE):
            self.app_name = self.app_name or ingress.GRPC_APP
            alias_triton_messages()  # the proxy pickles the message to hand it to a replica

    setup_variables.routes_stock_calls = True
    gRPCProxyRequest.setup_variables = setup_variables


def alias_triton_messages() -> None:
    """tritonclient's generated messages name their module `grpc_service_pb2` (protoc's name
    before packaging), which does not import: Ray's proxy could not pickle a message to hand
    it to a replica, nor the replica unpickle it. Make that name import."""
    from tritonclient.grpc import service_pb2

    sys.modules.setdefault(service_pb2.ServerReadyRequest.__module__, service_pb2)


def quiet_ray_train_logs() -> None:
    """Every worker process's setup hook: drop Ray Train's per-report INFO line and, without
    the dashboard's state API, the placement-group cleaner's warning every few seconds;
    both would bury the epoch lines. Other Ray Train warnings still show."""
    from ray.train.v2._internal.execution import context  # its logger is named by file path, not module

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # "dataset execution finished" for every epoch
