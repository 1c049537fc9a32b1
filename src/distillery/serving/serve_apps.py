"""The Ray Serve layer: one application per served model, an `auto` router, a server app.

Each model is its own application with route prefix `/v2/models/<name>`, so the ingress
(HAProxy by default, see `ingress`; Ray's Python proxy as the fallback) hands a request
straight to that model's replicas, whose own HTTP servers answer it. `auto`'s replicas hold
every served model too (no hop to another actor) and pick one per request from the shared
decision of `auto_router.AutoState`. The `/v2` app answers health, server metadata, and any model
name that is not served (404).

    ingress -> /v2/models/<name>/...  -> Model replicas (dynamic batching, `batcher`)
            -> /v2/models/auto/...    -> Auto replicas (every model, `auto_router.Router`) <-> AutoState
            -> /v2/...                -> Server (health, metadata, unknown models)
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any, cast

import ray
import torch
from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from distillery.compat import ingress
from distillery.config import ServeConfig
from distillery.core.errors import UserError
from distillery.core.files import atomic_write_json, read_json
from distillery.run import storage
from distillery.serving import auto_policy, grpc_app, http
from distillery.serving.auto_router import AutoState, Router, batchers
from distillery.serving.batcher import Batcher
from distillery.serving.http import API_KEY_HEADER  # noqa: F401 (the header's name, for clients and tests)
from distillery.serving.metrics import replica_metrics, request_id
from distillery.serving.predictor import Predictor, ServedModel, catalog
from distillery.serving.protocol import Limits, ProtocolError, infer_response, model_metadata, server_metadata

INGRESS_START_S = 240.0  # after Ray's own 60 s (see `deploy`)


class AppArgs(BaseModel):
    """What one Serve application needs; `serve build` writes these into the config YAML."""

    model_config = ConfigDict(extra="forbid")
    kind: str                       # "model", "auto", "server" or "grpc"
    run_dir: str
    models: list[str]               # model: [its name]; auto and server: every served model
    settings: dict[str, Any] = {}   # ServeConfig fields
    api_key_sha256: str | None = None


def build_application(args: AppArgs) -> serve.Application:
    """The application for `args.kind`, with its autoscaling and limits applied."""
    cfg = ServeConfig.model_validate(args.settings)
    served = catalog(args.run_dir, args.models)
    common = {"api_key_sha256": args.api_key_sha256, "limits": asdict(limits(cfg)), "metrics": cfg.metrics,
              "request_log_sample": cfg.request_log_sample}
    if args.kind == "model":
        return _deployment(Model).options(**deployment_options(cfg)).bind(
            served[0], cfg.max_batch_size, cfg.batch_wait_timeout_s, **common)
    if args.kind == "auto":
        state = _deployment(AutoState).bind([m.name for m in auto_policy.ladder(served)], cfg.auto_slo_ms)
        return _deployment(Auto).options(**deployment_options(cfg)).bind(
            served, cfg.max_batch_size, cfg.batch_wait_timeout_s, state, **common)
    if args.kind == "grpc":
        # One replica answers every model, so the limits are per model: what an HTTP model
        # deployment lets run and wait, waiting in the model's batcher; a call beyond it is
        # refused with UNAVAILABLE (`Grpc._infer`). Ray admits one share more than all the
        # models' together and never refuses itself (its refusal would be RESOURCE_EXHAUSTED):
        # with that spare share, a call beyond Ray's limit waits only for refusals to finish.
        per_model = cfg.max_ongoing_requests + cfg.max_queued_requests
        options = deployment_options(cfg) | {"max_ongoing_requests": per_model * (len(served) + cfg.auto + 1),
                                             "max_queued_requests": -1}
        return _deployment(serve.deployment(grpc_app.Grpc)).options(**options).bind(
            served, cfg.max_batch_size, cfg.batch_wait_timeout_s, cfg.auto, per_model_limit=per_model,
            **common)
    return _deployment(Server).options(num_replicas=1, ray_actor_options={"num_cpus": 0}).bind(
        [m.name for m in served], bool(cfg.auto), args.api_key_sha256)


def _deployment(decorated: object) -> serve.Deployment:
    # What `@serve.deployment` made of a class: mypy types a decorated class as the class itself,
    # and Ray annotates `serve.deployment(cls)` as returning a decorator
    return cast(serve.Deployment, decorated)


def limits(cfg: ServeConfig) -> Limits:
    return Limits(max_body_bytes=cfg.max_body_bytes, max_elements=cfg.max_elements)


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """Replicas, autoscaling, queue and health settings of a model (or auto) deployment."""
    return {"autoscaling_config": {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                   "target_ongoing_requests": cfg.target_ongoing_requests,
                                   "upscale_delay_s": cfg.upscale_delay_s,
                                   "downscale_delay_s": cfg.downscale_delay_s,
                                   "metrics_interval_s": 1.0, "look_back_period_s": 5.0},
            "max_ongoing_requests": cfg.max_ongoing_requests, "max_queued_requests": cfg.max_queued_requests,
            "health_check_period_s": cfg.health_check_period_s,
            "health_check_timeout_s": cfg.health_check_timeout_s,
            # A replica whose constructor fails (a damaged artifact fails its sha256 check the
            # same way every time) is retried twice, not Serve's 3 per replica: a bad
            # deployment is reported in ~15 s instead of ~45 s here.
            "max_constructor_retry_count": 2, "ray_actor_options": {"num_cpus": cfg.num_cpus}}


def api_key_digest(key: str | None) -> str | None:
    """Replicas get the key's sha256, never the key: configs and Ray's dashboard show args."""
    return hashlib.sha256(key.encode()).hexdigest() if key else None


def read_api_key(env_name: str | None) -> str | None:
    if not env_name:
        return None
    key = os.environ.get(env_name)
    if not key:
        raise UserError(f"serve.api_key_env is {env_name!r} but that environment variable is empty or unset")
    return key


# ---------------------------------------------------------------- deployments


@serve.deployment
class Model:
    """One served model: verified on load, dynamic batching over concurrent requests."""

    def __init__(self, served: ServedModel, max_batch_size: int, batch_wait_s: float,
                 api_key_sha256: str | None, limits: dict, metrics: bool = True,
                 request_log_sample: float = 0.0):
        self.predictor = Predictor(served)  # verifies sha256; a bad artifact fails the replica here
        self.served, self.digest, self.limits = served, api_key_sha256, Limits(**limits)
        self.metrics = replica_metrics(metrics, request_log_sample)
        self.batcher = Batcher(self.predictor, max_batch_size, batch_wait_s, served.name,
                               self.metrics.on_pass(served.name, self.predictor.model))

    async def __call__(self, request: Request) -> Response:
        try:
            http.check_key(request, self.digest)
            sub = http.subpath(request, self.served.name)
            if sub == "":
                return JSONResponse(model_metadata(self.served.name, self.served.in_shape,
                                                   self.served.num_classes))
            if sub == "/ready":
                return JSONResponse({"name": self.served.name, "ready": True})
            if sub != "/infer":
                raise ProtocolError(404, f"no route {request.url.path}; see /v2/models/{self.served.name}")
            with self.metrics.counted(self.served.name, "http") as record:
                return await self._infer(request, record)
        except ProtocolError as e:
            return http.error_response(e)

    async def _infer(self, request: Request, record: dict) -> Response:
        with self.batcher.admitted():
            req = await http.read_infer(request, self.served.name, self.served.in_shape, self.limits)
        record["id"] = req.id or request_id()
        answer = await self.batcher(req.x)
        self.metrics.answered(self.served.name, len(req.x), answer, record)
        body = infer_response(self.served.name, req.id, answer.logits, self.served.name, req.outputs)
        body["parameters"]["batched_requests"] = answer.together
        return http.reply(body, req.binary_output, record["id"])

    def check_health(self) -> None:
        self.predictor(torch.zeros(1, *self.served.in_shape))


@serve.deployment
class Auto:
    """The virtual model `auto`: every served model behind its own `Batcher`, one picked per
    request by `auto_router.Router` (see `auto_policy`)."""

    def __init__(self, served: list[ServedModel], max_batch_size: int, batch_wait_s: float,
                 state: DeploymentHandle, api_key_sha256: str | None, limits: dict, metrics: bool = True,
                 request_log_sample: float = 0.0):
        shapes = {tuple(m.in_shape) for m in served}
        if len(shapes) != 1:
            raise ValueError(f"auto needs models of one input shape, got {sorted(shapes)}")
        self.in_shape, self.num_classes = list(shapes.pop()), served[0].num_classes
        self.metrics = replica_metrics(metrics, request_log_sample)
        self.batchers = batchers(served, max_batch_size, batch_wait_s, self.metrics)
        self.router = Router(served, state, self.batchers, self.metrics)
        self.digest, self.limits = api_key_sha256, Limits(**limits)

    async def __call__(self, request: Request) -> Response:
        arrived = time.perf_counter()
        try:
            http.check_key(request, self.digest)
            sub = http.subpath(request, "auto")
            if sub == "":
                return JSONResponse(model_metadata("auto", self.in_shape, self.num_classes,
                                                   platform="distillery-auto"))
            if sub == "/ready":
                return JSONResponse({"name": "auto", "ready": True})
            if sub != "/infer":
                raise ProtocolError(404, f"no route {request.url.path}; see /v2/models/auto")
            with self.metrics.counted("auto", "http") as record:
                req = await http.read_infer(request, "auto", self.in_shape, self.limits)
                record["id"] = req.id or request_id()
                pick, logits, extra = await self.router.answer(req.parameters, req.x, arrived, record)
            body = infer_response("auto", req.id, logits, pick.name, req.outputs)
            body["parameters"].update(extra)
            return http.reply(body, req.binary_output, record["id"])
        except ProtocolError as e:
            return http.error_response(e)

    def check_health(self) -> None:
        for batcher in self.batchers.values():
            batcher.forward(torch.zeros(1, *self.in_shape))


@serve.deployment
class Server:
    """`/v2`: liveness, readiness (every served application running), server metadata, and a
    404 naming the served models for any other model name."""

    def __init__(self, models: list[str], auto: bool, api_key_sha256: str | None):
        self.models, self.digest = models + (["auto"] if auto else []), api_key_sha256
        # The ingress as this replica's environment (its node's, or the local instance's) says.
        self.metadata = server_metadata(metadata.version("distillery"), ingress.current())

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/")
        if path == "/v2/health/live":
            return JSONResponse({"live": True})
        if path == "/v2/health/ready":
            ready = running(self.models)
            return JSONResponse({"ready": ready}, status_code=200 if ready else 503)
        try:
            http.check_key(request, self.digest)
            if path == "/v2":
                return JSONResponse(self.metadata)
            if path == "/v2/models":
                return JSONResponse({"models": self.models})
            if path.startswith("/v2/models/"):
                name = path.split("/")[3]
                raise ProtocolError(404, f"unknown model {name!r}; served: {', '.join(self.models)}")
            raise ProtocolError(404, f"no route {request.url.path}")
        except ProtocolError as e:
            return http.error_response(e)


def running(names: list[str]) -> bool:
    apps = serve.status().applications
    return all(name in apps and apps[name].status == "RUNNING" for name in names)


# ---------------------------------------------------------------- the set of applications


def applications(run_dir: str, cfg: ServeConfig, api_key: str | None) -> list[dict[str, Any]]:
    """[{name, route_prefix, args}] for every served model, `auto` and the `/v2` server app.
    Every artifact is verified here first: a tampered one stops the deployment before any
    replica starts (and each replica verifies again when it loads)."""
    served = catalog(run_dir, cfg.models)
    for m in served:
        Predictor(m)  # sha256 checked on load
    names, digest, tuned = [m.name for m in served], api_key_digest(api_key), read_tuned(run_dir)
    args = lambda kind, models, extra={}: AppArgs(  # noqa: E731
        kind=kind, run_dir=str(run_dir), models=models, settings=cfg.model_dump() | extra,
        api_key_sha256=digest)
    apps = [{"name": n, "route_prefix": f"/v2/models/{n}", "args": args("model", [n], tuned.get(n, {}))}
            for n in names]
    if cfg.auto:
        apps.append({"name": "auto", "route_prefix": "/v2/models/auto", "args": args("auto", names)})
    apps.append({"name": "server", "route_prefix": "/v2", "args": args("server", names)})
    if cfg.grpc_port:  # Serve exposes an application to gRPC only if it has a route prefix
        apps.append({"name": grpc_app.APP_NAME, "route_prefix": grpc_app.ROUTE, "args": args("grpc", names)})
    return apps


def app_names(run_dir: str, cfg: ServeConfig) -> list[str]:
    """The Serve applications `applications` deploys, without loading any model."""
    return [m.name for m in catalog(run_dir, cfg.models)] + (["auto"] if cfg.auto else []) + ["server"] + \
        ([grpc_app.APP_NAME] if cfg.grpc_port else [])


TUNED = "serve/tuned.json"  # written by `distillery loadtest --tune`, per model


def read_tuned(location: str) -> dict[str, dict[str, Any]]:
    """Per-model settings chosen by `distillery loadtest --tune`, if it ran on this run (its
    folder, or its URI: this node's fresh copy)."""
    path = Path(location) / TUNED
    if storage.is_uri(location):
        path = storage.cache_dir(location) / TUNED
        if not storage.download(location, TUNED, path):
            path.unlink(missing_ok=True)  # the URI is the truth: a copy of a deleted file is stale
    if not path.is_file():
        return {}
    tuned = read_json(path)
    if not isinstance(tuned, dict) or not all(isinstance(t, dict) and isinstance(t.get("chosen"), dict)
                                              for t in tuned.values()):
        raise UserError(f"{path}: not written by `distillery loadtest --tune` (expected {{model: {{chosen: "
                        "{...}}}); delete it or tune again")
    return {model: t["chosen"] for model, t in tuned.items()}


def save_tuned(location: str, tuned: dict[str, dict[str, Any]]) -> Path:
    """Write `distillery loadtest --tune`'s results where `read_tuned` finds them on any node:
    the run's folder, or this node's copy uploaded to the run's URI."""
    root = storage.cache_dir(location) if storage.is_uri(location) else Path(location)
    atomic_write_json(root / TUNED, tuned)
    if storage.is_uri(location):
        storage.upload(root, [TUNED], location)
    return root / TUNED


def http_options(cfg: ServeConfig) -> dict[str, Any]:
    return {"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s}


def grpc_options(cfg: ServeConfig) -> dict[str, Any] | None:
    if not cfg.grpc_port:
        return None
    return {"port": cfg.grpc_port, "grpc_servicer_functions": [grpc_app.SERVICER],
            "request_timeout_s": cfg.request_timeout_s}


def logging_config(cfg: ServeConfig) -> dict[str, Any]:
    return {"log_level": cfg.log_level, "enable_access_log": cfg.access_log}


def deploy(run_dir: str, cfg: ServeConfig, api_key: str | None) -> str:
    """Start Serve on the connected Ray instance and run every application; return the URL."""
    apps = applications(run_dir, cfg, api_key)
    # `serve.proxy_location`: one ingress on the head, or with EveryNode one more on every node
    # that holds replicas (with HAProxy, each node's own).
    try:
        serve.start(proxy_location=cfg.proxy_location, http_options=http_options(cfg),
                    grpc_options=grpc_options(cfg), logging_config=logging_config(cfg))
        started = True
    except TimeoutError:
        # Ray gives its ingress a fixed 60 s to start. Its actors run at nice 15, like every Ray
        # worker, so on a node whose cores are busy with other work they can take longer (a CI
        # run here lost a test module to it): deploy meanwhile and wait for the listener below.
        started = False
    targets = [serve.RunTarget(build_application(a["args"]), name=a["name"], route_prefix=a["route_prefix"],
                               logging_config=logging_config(cfg)) for a in apps]
    # Every application starts together (one at a time took ~4 s each); `auto`'s handles to
    # the models are resolved on its first request, not when it starts.
    serve.run_many(targets)
    if not started:
        ingress.wait_listening(cfg.host, cfg.port, INGRESS_START_S)
    return public_url(cfg)


def public_host(cfg: ServeConfig) -> str:
    """The ingress's address as a user elsewhere types it: on every interface (a cluster's
    0.0.0.0), this node's address; an ingress runs on the head node, where the job's driver runs."""
    return ray.util.get_node_ip_address() if cfg.host in ingress.ALL_INTERFACES else cfg.host


def public_url(cfg: ServeConfig) -> str:
    return f"http://{public_host(cfg)}:{cfg.port}/v2"


def config_document(run_dir: str, cfg: ServeConfig, api_key: str | None) -> dict[str, Any]:
    """A Serve config for `serve run` / `serve deploy`, with the same applications."""
    apps = [{"name": a["name"], "route_prefix": a["route_prefix"], "import_path": "serve.app:build_app",
             "args": a["args"].model_dump()} for a in applications(run_dir, cfg, api_key)]
    grpc = {"grpc_options": grpc_options(cfg)} if cfg.grpc_port else {}
    return {"proxy_location": cfg.proxy_location, "http_options": http_options(cfg), **grpc,
            "logging_config": logging_config(cfg), "applications": apps}
