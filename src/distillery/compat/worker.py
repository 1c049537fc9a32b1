"""What every process Ray starts for a distillery job runs first (Ray's
`worker_process_setup_hook`): quiet Ray Train's chatty loggers, and patch Ray Serve's gRPC
listeners and Python proxy in the processes that import Serve, when they import it.

Kept light on purpose: Ray starts a new process for every actor and task of a job (a Ray
Train fit about ten, one after another; each Serve replica one), and each runs this before
anything else. Importing what the patches need here (Ray Serve, Ray Train's context, which
pulls in Ray Data, this package's config) cost 1.4 s of CPU in every one of those processes
on a 2-core machine, Serve in the training actors and Ray Data in the replicas; a post-import
hook (`wrapt`) applies each patch only where its module is imported.

Written against Ray 2.60. Private parts: the worker's node address (Ray's public
`get_runtime_context()` has no node IP before the worker is fully connected) and the
module paths the post-import hooks wait for (`serve_grpc`).
"""

from __future__ import annotations

import os

import ray
import wrapt

from distillery.compat import ingress
from distillery.compat.logs import quiet_ray_train_logs
from distillery.compat.serve_grpc import pin_grpc_listeners, route_stock_grpc_calls


def worker_setup() -> None:
    """Every worker process of a distillery job, before it runs anything."""
    quiet_ray_train_logs()
    name_gloo_interface()
    host = os.environ.get(ingress.SERVE_HOST_VAR)
    wrapt.register_post_import_hook(lambda _: pin_grpc_listeners(host), "ray.serve._private.default_impl")
    wrapt.register_post_import_hook(lambda _: route_stock_grpc_calls(),
                                    "ray.serve._private.proxy_request_response")


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
    return next((name for name, addrs in psutil.net_if_addrs().items()
                 if any(a.address == address for a in addrs)), None)
