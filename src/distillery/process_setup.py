"""What every process Ray starts for a distillery job runs first (Ray's
`worker_process_setup_hook`): quiet Ray Train's chatty loggers, and patch Ray Serve's gRPC
listeners and Python proxy in the processes that import Serve, when they import it.

Kept light on purpose: Ray starts a new process for every actor and task of a job (a Ray
Train fit about ten, one after another; each Serve replica one), and each runs this before
anything else. Importing what the patches need here (Ray Serve, Ray Train's context, which
pulls in Ray Data, this package's config) cost 1.4 s of CPU in every one of those processes
on a 2-core machine, Serve in the training actors and Ray Data in the replicas; a post-import
hook (`wrapt`) applies each patch only where its module is imported.
"""

from __future__ import annotations

import logging
import os
import re
import sys

import ray
import wrapt

from distillery.serving import ingress

# Ray Train's context logger is named by its file's path, not its module name. Importing the
# module to read that path costs a second (it imports Ray Data); the path is known.
TRAIN_CONTEXT_LOGGER = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")
PROTOCOL_SERVICE = "/inference.GRPCInferenceService/"  # the Open Inference Protocol's gRPC methods


def worker_setup() -> None:
    """Every worker process of a distillery job, before it runs anything."""
    quiet_ray_train_logs()
    name_gloo_interface()
    host = os.environ.get(ingress.SERVE_HOST_VAR)
    wrapt.register_post_import_hook(lambda _: pin_grpc_listeners(host), "ray.serve._private.default_impl")
    wrapt.register_post_import_hook(lambda _: route_stock_grpc_calls(), "ray.serve._private.proxy_request_response")


def quiet_ray_train_logs() -> None:
    """Drop Ray Train's per-report INFO line and, without the dashboard's state API, the
    placement-group cleaner's warning every few seconds; both would bury the epoch lines.
    Other Ray Train warnings still show."""
    logging.getLogger(TRAIN_CONTEXT_LOGGER).setLevel(logging.WARNING)
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # "dataset execution finished" for every epoch


def name_gloo_interface() -> None:
    """Gloo (torch.distributed on CPU) finds its own address from the hostname, which common
    Linux images map to a loopback address (Debian and Ubuntu: 127.0.1.1): across machines
    every peer then dials 127.0.0.1 and the process group fails (`Gloo connectFullMesh
    failed ... remote=[127.0.0.1]`). Name the interface that holds this node's Ray address,
    unless the operator named one."""
    if "GLOO_SOCKET_IFNAME" in os.environ:
        return
    try:
        node_ip = ray._private.worker.global_worker.node_ip_address
    except Exception:  # not a connected Ray worker: nothing to go by
        return
    interface = interface_of(node_ip)
    if interface:
        os.environ["GLOO_SOCKET_IFNAME"] = interface


def interface_of(address: str) -> str | None:
    """The network interface holding `address`; None for loopback (Gloo's default works
    there) or an address no interface holds."""
    import psutil  # a dependency of Ray's

    if address.startswith("127.") or address == "::1":
        return None
    return next((name for name, addrs in psutil.net_if_addrs().items() if any(a.address == address for a in addrs)),
                None)


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
