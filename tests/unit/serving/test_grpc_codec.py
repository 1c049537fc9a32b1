"""The protocol's gRPC messages (`distillery.serving.grpc_codec`): the same checks as HTTP,
raw and typed tensor contents, raw answers, and the status codes refusals map to. No Ray."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from tritonclient.grpc import service_pb2 as pb

from distillery.serving import grpc_codec
from distillery.serving.protocol import Limits, ProtocolError, model_metadata

IN_SHAPE = [1, 8, 8]


def _request(x: np.ndarray | None = None, raw: bool = True, **fields) -> pb.ModelInferRequest:
    x = np.arange(2 * 64, dtype=np.float32).reshape(2, *IN_SHAPE) / 7 if x is None else x
    request = pb.ModelInferRequest(model_name="student", **fields)
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    if raw:
        request.raw_input_contents.append(x.astype("<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    return request


def _refused(request: pb.ModelInferRequest, limits: Limits = Limits()) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        grpc_codec.parse_infer(request, IN_SHAPE, limits)
    return info.value


@pytest.mark.parametrize("raw", [True, False])
def test_raw_and_typed_contents_give_the_same_tensor(raw):
    x = np.random.default_rng(0).random((3, *IN_SHAPE), dtype=np.float32)
    req = grpc_codec.parse_infer(_request(x, raw=raw, id="r-1"), IN_SHAPE, Limits())
    assert torch.equal(req.x, torch.from_numpy(x)) and req.id == "r-1" and req.outputs == ("logits", "label")


def test_parameters_and_requested_outputs_carry_over():
    request = _request()
    request.parameters["min_accuracy"].double_param = 0.9
    request.parameters["binary_data_output"].bool_param = True
    request.outputs.add(name="label")
    req = grpc_codec.parse_infer(request, IN_SHAPE, Limits())
    assert req.parameters == {"min_accuracy": 0.9, "binary_data_output": True} and req.outputs == ("label",)


def test_the_http_checks_apply():
    wrong_shape = _request(np.zeros((1, 1, 4, 4), np.float32))
    assert _refused(wrong_shape).status == 400 and \
        "shape must be [N, 1, 8, 8]" in _refused(wrong_shape).message
    short = _request()
    short.raw_input_contents[0] = short.raw_input_contents[0][:-4]
    assert "needs 512 bytes" in _refused(short).message
    nan = _request(np.full((1, *IN_SHAPE), np.nan, np.float32))
    assert "NaN" in _refused(nan).message
    assert _refused(_request(), Limits(max_elements=64)).status == 413
    unknown = _request()
    unknown.outputs.add(name="probs")
    assert "'probs'" in _refused(unknown).message
    none = pb.ModelInferRequest(model_name="student")
    assert "exactly one input" in _refused(none).message


def test_find_model_names_the_model_and_the_version():
    models = {"student": "s", "auto": None}
    assert grpc_codec.find_model(models, "student", "") == "s" and \
        grpc_codec.find_model(models, "student", "1") == "s"
    with pytest.raises(ProtocolError) as e:
        grpc_codec.find_model(models, "nope", "")
    assert e.value.status == 404 and "'nope'" in e.value.message and "student, auto" in e.value.message
    with pytest.raises(ProtocolError) as e:
        grpc_codec.find_model(models, "student", "2")
    assert e.value.status == 404 and "no version '2'" in e.value.message


def test_the_answer_has_raw_outputs_in_the_order_asked_and_its_parameters():
    logits = torch.tensor([[0.5, 2.0], [3.0, -1.0]])
    reply = grpc_codec.infer_response("auto", "r-2", logits, "student", ("label", "logits"),
                                      batched_requests=2, model_ms=0.5, test_accuracy=0.98)
    assert [o.name for o in reply.outputs] == ["label", "logits"] and reply.id == "r-2"
    assert [list(o.shape) for o in reply.outputs] == [[2], [2, 2]] and reply.model_version == "1"
    assert np.frombuffer(reply.raw_output_contents[0], "<i8").tolist() == [1, 0]
    assert np.array_equal(np.frombuffer(reply.raw_output_contents[1], "<f4").reshape(2, 2), logits.numpy())
    params = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in reply.parameters.items()}
    assert params == {"variant": "student", "batched_requests": 2, "model_ms": 0.5, "test_accuracy": 0.98}


def test_metadata_messages_carry_the_http_documents():
    meta = grpc_codec.model_metadata(model_metadata("student", IN_SHAPE, 10))
    assert meta.name == "student" and list(meta.versions) == ["1"] and meta.platform == "pytorch"
    tensor = meta.inputs[0]
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("input", "FP32", [-1, 1, 8, 8])
    assert [(o.name, list(o.shape)) for o in meta.outputs] == [("logits", [-1, 10]), ("label", [-1])]
    server = grpc_codec.server_metadata({"name": "distillery", "version": "0.1.0", "extensions": ["x"]})
    assert (server.name, server.version, list(server.extensions)) == ("distillery", "0.1.0", ["x"])


@pytest.mark.parametrize("status,code", [(400, grpc.StatusCode.INVALID_ARGUMENT),
                                         (401, grpc.StatusCode.UNAUTHENTICATED),
                                         (404, grpc.StatusCode.NOT_FOUND),
                                         (413, grpc.StatusCode.RESOURCE_EXHAUSTED),
                                         (422, grpc.StatusCode.INVALID_ARGUMENT),
                                         (503, grpc.StatusCode.UNAVAILABLE),
                                         (500, grpc.StatusCode.INTERNAL)])
def test_refusals_map_to_grpc_codes(status, code):
    assert grpc_codec.status_code(ProtocolError(status, "x")) == code
