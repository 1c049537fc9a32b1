"""The Open Inference Protocol over HTTP as Starlette requests and responses, for the Serve
deployments (`serve_apps`): the API key, a model's sub-routes, reading an infer request
(JSON, or Triton's binary extension), the reply with the request's id."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from distillery.serving.protocol import (
    InferRequest,
    Limits,
    ProtocolError,
    binary_response,
    check_api_key,
    check_size,
    check_version,
    json_body,
    parse_infer,
)

API_KEY_HEADER = "x-api-key"


def error_response(e: ProtocolError) -> JSONResponse:
    return JSONResponse({"error": e.message}, status_code=e.status)


def check_key(request: Request, digest: str | None) -> None:
    check_api_key(request.headers.get(API_KEY_HEADER), digest, f"in the {API_KEY_HEADER} header")


def subpath(request: Request, model: str) -> str:
    """The path under this model's route prefix: "", "/ready" or "/infer", with or without
    `/versions/{version}` before it (404 for a version the model does not have)."""
    sub = request.scope["path"][len(request.scope.get("root_path", "")):].rstrip("/")
    if sub.startswith("/versions/"):
        version, _, rest = sub.removeprefix("/versions/").partition("/")
        check_version(model, version)
        sub = f"/{rest}" if rest else ""
    return sub


BINARY_HEADER = "inference-header-content-length"


async def read_infer(request: Request, model: str, in_shape: list[int], lim: Limits) -> InferRequest:
    if request.method != "POST":
        raise ProtocolError(405, "infer takes POST")
    header_length = request.headers.get(BINARY_HEADER)
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip()
    allowed = ("application/json", "") + (("application/octet-stream",) if header_length is not None else ())
    if kind not in allowed:
        raise ProtocolError(415, f"content type {kind!r} is not supported; send application/json "
                                 f"(or application/octet-stream with {BINARY_HEADER})")
    check_size(request.headers.get("content-length"), lim)
    return parse_infer(await request.body(), in_shape, lim, header_length, model)


# The request's id (its own, or one made here): a logged request is found by it.
REQUEST_ID_HEADER = "x-request-id"


def reply(doc: dict, binary: bool, rid: str) -> Response:
    if not binary:
        return Response(json_body(doc), media_type="application/json", headers={REQUEST_ID_HEADER: rid})
    body, header_length = binary_response(doc)
    return Response(body, media_type="application/octet-stream",
                    headers={BINARY_HEADER: str(header_length), REQUEST_ID_HEADER: rid})
