"""Ray Serve's gRPC listeners and Python proxy, patched for the Open Inference Protocol
(written against Ray 2.60 and tritonclient 2.x).

No public API serves: Ray binds every gRPC server it starts for Serve to all interfaces
whatever `http_options.host` says, its proxy routes a gRPC call only by an `application`
metadata that stock protocol clients never send, and tritonclient's generated messages name a
module that does not import (so Ray cannot pickle them). `tests/unit/compat` checks each
patched attribute still exists with the shape these functions expect.
"""

from __future__ import annotations

import re
import sys

from distillery.compat import ingress

PROTOCOL_SERVICE = "/inference.GRPCInferenceService/"  # the Open Inference Protocol's gRPC methods


def pin_grpc_listeners(host: str | None) -> None:
    """Ray 2.60 binds every gRPC server it starts for Serve (the fallback proxy's, each
    ingress replica's) to `[::]`, all interfaces, whatever `http_options.host` says; nothing
    in its config changes that. In this process, bind them to `host` instead."""
    if not host or host in ingress.ALL_INTERFACES:
        return
    from ray.serve._private import default_impl  # Serve's helper; `grpc_util` looks it up on every call

    add = default_impl.add_grpc_address
    if getattr(add, "pinned_to", None) != host:
        def pinned(grpc_server, server_address: str):  # the names of the function it replaces
            return add(grpc_server, re.sub(r"^\[::\]:", f"{host}:", server_address))

        pinned.pinned_to = host  # type: ignore[attr-defined]  # a mark on the function: patched once
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

    setup_variables.routes_stock_calls = True  # type: ignore[attr-defined]  # a mark: patched once
    gRPCProxyRequest.setup_variables = setup_variables  # type: ignore[method-assign]  # the patch itself


def alias_triton_messages() -> None:
    """tritonclient's generated messages name their module `grpc_service_pb2` (protoc's name
    before packaging), which does not import: Ray's proxy could not pickle a message to hand
    it to a replica, nor the replica unpickle it. Make that name import."""
    from tritonclient.grpc import service_pb2

    sys.modules.setdefault(service_pb2.ServerReadyRequest.__module__, service_pb2)
