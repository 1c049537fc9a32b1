"""The protocol's gRPC service on Ray Serve's gRPC ingress: one application, `grpc`.

Ray routes a gRPC call to an application by its `application` metadata, which stock clients
(tritonclient, KServe's SDK) never send: they name the model inside the message. So one
application answers every gRPC call, and its replicas hold every served model, each behind
its own `Batcher` (the HTTP path's batching), plus `auto`'s choice among them, with no hop to
another actor. HAProxy sends calls without `application` metadata here (`ingress` rewrites
its gRPC default backend), and so does Ray's Python proxy in a distillery job
(`compat.serve_grpc.route_stock_grpc_calls`).

Overload is UNAVAILABLE, as HTTP's 503 maps to it and as Triton answers a full queue: each
model may have `serve.max_ongoing_requests + serve.max_queued_requests` calls running or
waiting in a replica; a call beyond that is refused at once, naming the model.

The messages come from tritonclient (see `grpc_codec`); `SERVICER` is what Serve's
`grpc_servicer_functions` registers.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from importlib import metadata
from typing import Any

from ray import serve
from starlette.responses import JSONResponse
from tritonclient.grpc import service_pb2 as pb

from distillery.compat import ingress
from distillery.compat.serve_grpc import alias_triton_messages, pin_grpc_listeners
from distillery.serving import grpc_codec
from distillery.serving.auto_router import STATE, Router, batchers
from distillery.serving.metrics import UNKNOWN, replica_metrics, request_id
from distillery.serving.predictor import ServedModel
from distillery.serving.protocol import Limits, ProtocolError, check_api_key, model_metadata, server_metadata

APP_NAME = ingress.GRPC_APP
SERVICER = "tritonclient.grpc.service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server"
# Serve routes gRPC only to applications with an HTTP route; over HTTP it says where gRPC is
ROUTE = "/v2/grpc"


# Our replicas pin their gRPC listeners to serve.host whatever started them (a `serve run`
# of the config file has no job setup hook); see `compat.serve_grpc.pin_grpc_listeners`.
pin_grpc_listeners(os.environ.get(ingress.SERVE_HOST_VAR))
alias_triton_messages()  # a message from Ray's Python proxy arrives pickled


class Grpc:
    """`inference.GRPCInferenceService` for every served model and `auto`. Left undecorated
    (`serve_apps` wraps it in `serve.deployment`): a decorated class is not found under its
    own name, so Ray would pickle it by value and a replica would never import this module,
    nor run the two lines above."""

    def __init__(self, served: list[ServedModel], max_batch_size: int, batch_wait_s: float, auto: bool,
                 api_key_sha256: str | None, limits: dict, per_model_limit: int, metrics: bool = True,
                 request_log_sample: float = 0.0):
        self.served, self.digest, self.limits = served, api_key_sha256, Limits(**limits)
        self.per_model_limit = per_model_limit
        self.ongoing: Counter[str] = Counter()
        self.metrics = replica_metrics(metrics, request_log_sample)
        self.batchers = batchers(served, max_batch_size, batch_wait_s, self.metrics)
        self.models: dict[str, ServedModel | None] = ({m.name: m for m in served}
                                                      | ({"auto": None} if auto else {}))
        # `auto` over gRPC follows (and feeds) the HTTP `auto` application's shared decision.
        self.router = Router(served, serve.get_deployment_handle(STATE, app_name="auto") if auto else None,
                             self.batchers, self.metrics)

    def check_key(self, grpc_context: Any) -> None:
        given = dict(grpc_context.invocation_metadata()).get(grpc_codec.API_KEY_METADATA)
        check_api_key(given, self.digest, f"as {grpc_codec.API_KEY_METADATA} metadata")

    async def answer(
        self,
        reply: str,
        work: Callable[[], Awaitable[Any]],
        grpc_context: Any,
        needs_key: bool = True,
        counted: AbstractContextManager = contextlib.nullcontext(),
    ) -> Any:
        """Run `work`, checking the API key first (both inside `counted`: the metrics' outcome);
        a ProtocolError becomes its gRPC status and an empty `pb.<reply>`, never a crashed call.
        (Names, not classes: Serve pickles this class, and the message classes do not pickle.)"""
        try:
            with counted:
                if needs_key:
                    self.check_key(grpc_context)
                return await work()
        except ProtocolError as e:
            grpc_context.set_code(grpc_codec.status_code(e))
            grpc_context.set_details(e.message)
            return getattr(pb, reply)()

    # HTTP on ROUTE: the route exists only for Serve's gRPC routing
    async def __call__(self, request: Any) -> Any:
        return JSONResponse({"error": "this is the gRPC service (inference.GRPCInferenceService) on "
                                      "serve.grpc_port; over HTTP use /v2/models/{name}"}, status_code=404)

    # One method per RPC, named as the RPC: Serve's gRPC ingress calls it with the message.
    async def ServerLive(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return await self.answer("ServerLiveResponse", self._live, grpc_context, needs_key=False)

    async def ServerReady(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return await self.answer("ServerReadyResponse", self._ready, grpc_context, needs_key=False)

    async def ModelReady(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return await self.answer("ModelReadyResponse", lambda: self._model_ready(request), grpc_context)

    async def ServerMetadata(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return await self.answer("ServerMetadataResponse", self._server_metadata, grpc_context)

    async def ModelMetadata(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return await self.answer("ModelMetadataResponse", lambda: self._model_metadata(request), grpc_context)

    async def ModelInfer(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        name, record = (
            request.model_name if request.model_name in self.models else UNKNOWN,
            {"id": request.id or request_id()},
        )
        return await self.answer("ModelInferResponse", lambda: self._infer(request, record), grpc_context,
                                 counted=self.metrics.counted(name, "grpc", record))

    async def _live(self) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def _ready(self) -> Any:
        return pb.ServerReadyResponse(ready=True)  # this replica holds every model: it answers once it runs

    async def _model_ready(self, request: Any) -> Any:
        grpc_codec.find_model(self.models, request.name, request.version)
        return pb.ModelReadyResponse(ready=True)

    async def _server_metadata(self) -> Any:
        return grpc_codec.server_metadata(server_metadata(metadata.version("distillery")))

    async def _model_metadata(self, request: Any) -> Any:
        model = grpc_codec.find_model(self.models, request.name, request.version) or self.served[0]
        platform = "pytorch" if request.name != "auto" else "distillery-auto"
        return grpc_codec.model_metadata(model_metadata(request.name, model.in_shape, model.num_classes,
                                                        platform))

    async def _infer(self, request: Any, record: dict) -> Any:
        arrived = time.perf_counter()
        model = grpc_codec.find_model(self.models, request.model_name, request.model_version)
        name = request.model_name
        if self.ongoing[name] >= self.per_model_limit:
            raise ProtocolError(503, f"{name!r} is at capacity: {self.ongoing[name]} requests in flight "
                                     "in this replica (serve.max_ongoing_requests + "
                                     "max_queued_requests); retry shortly")
        self.ongoing[name] += 1
        try:
            return await self._answer(request, model, arrived, record)
        finally:
            self.ongoing[name] -= 1

    async def _answer(self, request: Any, model: ServedModel | None, arrived: float, record: dict) -> Any:
        req = grpc_codec.parse_infer(request, (model or self.served[0]).in_shape, self.limits)
        if model is not None:
            answer = await self.batchers[model.name](req.x)
            self.metrics.answered(model.name, len(req.x), answer, record)
            pick, logits, extra = model, answer.logits, {"batched_requests": answer.together}
        else:
            pick, logits, extra = await self.router.answer(req.parameters, req.x, arrived, record)
        # The client's id, else the one made for it: the protocol's `id` is gRPC's only place for it.
        return grpc_codec.infer_response(request.model_name, record["id"], logits, pick.name, req.outputs,
                                         **extra)
