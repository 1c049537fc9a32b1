"""The Open Inference Protocol's gRPC form (`inference.GRPCInferenceService`) as pure functions
over its protobuf messages.

A `ModelInferRequest` becomes the same `InferRequest` the HTTP path builds, through the same
checks and limits (`protocol.check_input`, `protocol.requested_outputs`); its tensor comes as
`raw_input_contents` (what tritonclient sends) or as typed `contents` (KServe's SDK). Answers
carry raw little-endian contents, which both SDKs read. A refusal is the HTTP path's
`ProtocolError`; `status_code` maps its status to the gRPC code a client expects.

The messages are the ones tritonclient ships, generated from Triton's `service.proto`, the
origin of the protocol's gRPC form: KServe's `grpc_predict_v2.proto` is the same service with
the same field numbers, so both SDKs' requests parse. Nothing here imports Ray.
"""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import torch
from tritonclient.grpc import service_pb2 as pb

from distillery.serving.protocol import (
    MODEL_VERSION,
    InferRequest,
    Limits,
    ProtocolError,
    check_input,
    check_version,
    decode_numbers,
    decode_raw,
    requested_outputs,
)

API_KEY_METADATA = "x-api-key"  # the HTTP header's name, as gRPC metadata
# 422 is `auto` asked for a target no model meets.
STATUS_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
                404: grpc.StatusCode.NOT_FOUND, 408: grpc.StatusCode.DEADLINE_EXCEEDED,
                413: grpc.StatusCode.RESOURCE_EXHAUSTED, 422: grpc.StatusCode.INVALID_ARGUMENT,
                503: grpc.StatusCode.UNAVAILABLE}


def status_code(e: ProtocolError) -> grpc.StatusCode:
    return STATUS_CODES.get(e.status, grpc.StatusCode.INTERNAL)


def find_model(models: dict[str, Any], name: str, version: str) -> Any:
    """The model a message names (its version empty or the model's), else NOT_FOUND."""
    if name not in models:
        raise ProtocolError(404, f"unknown model {name!r}; served: {', '.join(models)}")
    if version:
        check_version(name, version)
    return models[name]


def parse_infer(request: pb.ModelInferRequest, in_shape: list[int], limits: Limits) -> InferRequest:
    """Validate a ModelInferRequest for a model taking [N, *in_shape] FP32 images (the model
    itself was found by `find_model`)."""
    if len(request.inputs) != 1:
        raise ProtocolError(400, f"expected exactly one input named 'input', got {len(request.inputs)}")
    tensor = request.inputs[0]
    shape = check_input(tensor.name, tensor.datatype, list(tensor.shape), in_shape, limits)
    if len(request.raw_input_contents) > 1:
        raise ProtocolError(400, f"raw_input_contents has {len(request.raw_input_contents)} entries "
                            "for 1 input")
    if request.raw_input_contents:
        x = decode_raw(request.raw_input_contents[0], shape)
    else:
        x = decode_numbers(np.asarray(tensor.contents.fp32_contents, dtype=np.float32), shape)
    outputs = requested_outputs([{"name": o.name} for o in request.outputs] or None)
    params = {key: _value(p) for key, p in request.parameters.items()}
    return InferRequest(x, request.id or None, params, False, outputs)


def _value(p: pb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def infer_response(model: str, request_id: str | None, logits: torch.Tensor, variant: str,
                   outputs: tuple[str, ...], **parameters: Any) -> pb.ModelInferResponse:
    """logits [N, K] -> a ModelInferResponse with `outputs` as raw contents, in that order."""
    tensors = {"logits": ("FP32", lambda: logits.numpy().astype("<f4")),
               "label": ("INT64", lambda: logits.argmax(1).numpy().astype("<i8"))}
    reply = pb.ModelInferResponse(model_name=model, model_version=MODEL_VERSION, id=request_id or "")
    for name in outputs:
        datatype, make = tensors[name]
        array = make()
        reply.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        reply.raw_output_contents.append(array.tobytes())
    for key, value in {"variant": variant, **parameters}.items():
        _set(reply.parameters[key], value)
    return reply


def _set(p: pb.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = str(value)


def model_metadata(meta: dict[str, Any]) -> pb.ModelMetadataResponse:
    """`protocol.model_metadata`'s document as its gRPC message."""
    tensor = lambda t: pb.ModelMetadataResponse.TensorMetadata(**t)  # noqa: E731
    return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                    inputs=[tensor(t) for t in meta["inputs"]],
                                    outputs=[tensor(t) for t in meta["outputs"]])


def server_metadata(meta: dict[str, Any]) -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(name=meta["name"], version=meta["version"],
                                     extensions=meta["extensions"])
