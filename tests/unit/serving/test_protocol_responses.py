"""Fast unit tests of the Open Inference Protocol codec's answers (`distillery.serving.protocol`):
infer responses, as JSON and binary, and metadata. No Ray, no HTTP, no model weights.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distillery.serving.protocol import (
    INPUT_NAME,
    binary_response,
    infer_response,
    json_body,
    model_metadata,
    server_metadata,
)

IN_SHAPE = [1, 8, 8]


def test_infer_response_logits_labels_variant_id():
    logits = torch.tensor([[0.1, 2.5, -1.0], [3.0, 0.0, 1.0], [-2.0, -1.0, -0.5], [0.0, 0.0, 9.0]])
    out = json.loads(json_body(infer_response("auto", "abc", logits, "student_q8")))  # as a client reads it
    assert out["model_name"] == "auto" and out["id"] == "abc"
    assert out["parameters"] == {"variant": "student_q8"}
    by_name = {o["name"]: o for o in out["outputs"]}
    assert [o["name"] for o in out["outputs"]] == ["logits", "label"]
    lo, la = by_name["logits"], by_name["label"]
    assert lo["datatype"] == "FP32" and lo["shape"] == [4, 3]
    assert torch.equal(torch.tensor(lo["data"]).reshape(lo["shape"]), logits)  # row-major
    assert lo["data"][:3] == pytest.approx([0.1, 2.5, -1.0])
    assert la["datatype"] == "INT64" and la["shape"] == [4] and la["data"] == [1, 0, 2, 2]
    assert all(type(v) is int for v in la["data"])


def test_the_binary_response_holds_the_same_numbers_as_the_json_one_even_for_a_slice_of_a_batch():
    batch = torch.randn(6, 10)
    doc = infer_response("m", None, batch[2:5], "m")  # a request's rows of a batched forward pass
    as_json = json.loads(json_body(doc))
    body, header_length = binary_response(doc)
    header = json.loads(body[:header_length])
    blob, at = body[header_length:], 0
    for out, seen in zip(header["outputs"], as_json["outputs"], strict=True):
        size = out["parameters"]["binary_data_size"]
        dtype = "<f4" if out["datatype"] == "FP32" else "<i8"
        assert "data" not in out
        assert np.frombuffer(blob[at:at + size], dtype=dtype).tolist() == pytest.approx(seen["data"])
        at += size
    assert at == len(blob) and as_json["outputs"][1]["data"] == batch[2:5].argmax(1).tolist()


def test_infer_response_without_id_has_no_id_key():
    out = infer_response("teacher", None, torch.zeros(1, 10), "teacher")
    assert "id" not in out
    assert out["outputs"][1]["shape"] == [1]


def test_model_metadata():
    meta = model_metadata("student", [3, 32, 32], 10)
    assert meta["name"] == "student" and meta["platform"] == "pytorch"
    assert meta["inputs"] == [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert meta["inputs"][0]["name"] == "input"
    outs = {o["name"]: o for o in meta["outputs"]}
    assert outs["logits"] == {"name": "logits", "datatype": "FP32", "shape": [-1, 10]}
    assert outs["label"] == {"name": "label", "datatype": "INT64", "shape": [-1]}
    assert model_metadata("x", IN_SHAPE, 4, platform="onnx")["platform"] == "onnx"


def test_server_metadata():
    meta = server_metadata("1.2.3")
    assert meta["name"] == "distillery" and meta["version"] == "1.2.3"
    assert isinstance(meta["extensions"], list) and "ingress" not in meta
    assert server_metadata("1.2.3", "ingress: HAProxy (/bin/haproxy)")["ingress"] == \
        "ingress: HAProxy (/bin/haproxy)"
