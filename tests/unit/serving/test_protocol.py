"""Fast unit tests of the Open Inference Protocol codec (`distillery.serving.protocol`).
No Ray, no HTTP, no model weights.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from distillery.serving.protocol import (
    INPUT_NAME,
    InferRequest,
    Limits,
    ProtocolError,
    auto_targets,
    check_size,
    infer_response,
    json_body,
    parse_infer,
)

IN_SHAPE = [1, 8, 8]
LIMITS = Limits()


def _input(data, shape=None, name=INPUT_NAME, datatype="FP32", **extra):
    n = len(data) // 64 if shape is None and isinstance(data, list) else 1
    spec = {"name": name, "shape": [n, *IN_SHAPE] if shape is None else shape, "datatype": datatype,
            "data": data}
    spec.update(extra)
    return spec


def _body(inputs, **fields) -> bytes:
    doc = {"inputs": inputs if isinstance(inputs, list) else [inputs]}
    doc.update(fields)
    return json.dumps(doc, allow_nan=True).encode()


def _refused(body: bytes, limits: Limits = LIMITS) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_infer(body, IN_SHAPE, limits)
    return info.value


def _flat(n: int = 2) -> list[float]:
    return [i * 0.25 - 3.0 for i in range(n * 64)]


# --- parse_infer: valid requests ---------------------------------------------------------

def test_parse_flat_data_gives_float32_batch_equal_to_input():
    data = _flat(2)
    req = parse_infer(_body(_input(data), id="req-7", parameters={"min_accuracy": 0.9}), IN_SHAPE, LIMITS)
    assert isinstance(req, InferRequest)
    assert req.x.dtype == torch.float32
    assert list(req.x.shape) == [2, 1, 8, 8]
    assert torch.equal(req.x, torch.tensor(data, dtype=torch.float32).reshape(2, 1, 8, 8))
    assert req.id == "req-7"
    assert req.parameters == {"min_accuracy": 0.9}


def test_parse_nested_data_gives_same_tensor_as_flat():
    expected = torch.arange(3 * 64, dtype=torch.float32).reshape(3, 1, 8, 8) / 7
    nested = expected.tolist()  # [3][1][8][8] nested lists
    req = parse_infer(_body(_input(nested, shape=[3, 1, 8, 8])), IN_SHAPE, LIMITS)
    assert req.x.dtype == torch.float32 and list(req.x.shape) == [3, 1, 8, 8]
    assert torch.equal(req.x, expected)
    flat = parse_infer(_body(_input(expected.reshape(-1).tolist(), shape=[3, 1, 8, 8])), IN_SHAPE, LIMITS)
    assert torch.equal(flat.x, req.x)


def test_parse_without_id_or_parameters():
    req = parse_infer(_body(_input(_flat(1))), IN_SHAPE, LIMITS)
    assert req.id is None and req.parameters == {}
    assert list(req.x.shape) == [1, 1, 8, 8]


def test_parse_other_in_shape():
    data = list(range(2 * 3 * 4 * 5))
    req = parse_infer(_body(_input(data, shape=[2, 3, 4, 5])), [3, 4, 5], LIMITS)
    assert list(req.x.shape) == [2, 3, 4, 5]
    assert req.x.reshape(-1).tolist() == [float(v) for v in data]


def test_parsed_tensor_does_not_alias_between_requests():
    a = parse_infer(_body(_input(_flat(1))), IN_SHAPE, LIMITS)
    b = parse_infer(_body(_input(_flat(1))), IN_SHAPE, LIMITS)
    a.x.zero_()
    assert b.x.abs().sum() > 0


# --- parse_infer: refusals -----------------------------------------------------------------

def test_body_not_json():
    e = _refused(b"{not json")
    assert e.status == 400 and "not valid JSON" in e.message


def test_body_not_utf8():
    e = _refused(b"\xff\xfe\x00garbage")
    assert e.status == 400 and "not valid JSON" in e.message


@pytest.mark.parametrize("doc", [[1, 2], "inputs", 3, None])
def test_json_not_an_object(doc):
    e = _refused(json.dumps(doc).encode())
    assert e.status == 400 and "JSON object" in e.message


def test_unknown_top_level_field_named():
    e = _refused(_body(_input(_flat(1)), priority=1, zzz=2))
    assert e.status == 400 and "unknown request field" in e.message
    assert "priority" in e.message and "zzz" in e.message


def test_fields_official_clients_send_are_accepted():
    """KServe's SDK puts model_name, model_version and id in the body; tensor-level and
    request-level parameters come from tritonclient."""
    body = _body(_input(_flat(1), parameters={"some_tensor_flag": 1}), model_name="student",
                 model_version="1", id="42", parameters={"binary_data_output": False})
    req = parse_infer(body, IN_SHAPE, LIMITS, model="student")
    assert req.id == "42" and req.x.shape == (1, *IN_SHAPE) and req.outputs == ("logits", "label")
    blank = _body(_input(_flat(1)), model_name="", model_version="")  # an SDK leaving them unset
    assert parse_infer(blank, IN_SHAPE, LIMITS, model="student").x.shape[0] == 1


@pytest.mark.parametrize("field,value,named", [("model_name", "teacher", "'student'"),
                                               ("model_version", "2", "'1'")])
def test_a_model_name_or_version_that_contradicts_the_route_names_both(field, value, named):
    with pytest.raises(ProtocolError) as info:
        parse_infer(_body(_input(_flat(1)), **{field: value}), IN_SHAPE, LIMITS, model="student")
    assert info.value.status == 400 and field in info.value.message
    assert repr(value) in info.value.message and named in info.value.message


def test_requested_outputs_are_answered_in_the_order_asked():
    req = parse_infer(_body(_input(_flat(2)), outputs=[{"name": "label"}]), IN_SHAPE, LIMITS)
    assert req.outputs == ("label",)
    logits = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    out = json.loads(json_body(infer_response("m", None, logits, "m", req.outputs)))
    assert [o["name"] for o in out["outputs"]] == ["label"] and out["outputs"][0]["data"] == [1, 0]
    both = parse_infer(_body(_input(_flat(1)), outputs=[{"name": "label"}, {"name": "logits"}]),
                       IN_SHAPE, LIMITS)
    assert both.outputs == ("label", "logits")
    assert parse_infer(_body(_input(_flat(1)), outputs=[]), IN_SHAPE, LIMITS).outputs == ("logits", "label")


@pytest.mark.parametrize("outputs,says", [([{"name": "nope"}], "'nope'"),
                                          ([{"name": "label"}, {"name": "probs"}], "'probs'"),
                                          ({"name": "label"}, "list of objects"),
                                          ([{"nom": "label"}], "list of objects")])
def test_an_unknown_or_malformed_requested_output_is_refused_by_name(outputs, says):
    e = _refused(_body(_input(_flat(1)), outputs=outputs))
    assert e.status == 400 and says in e.message


@pytest.mark.parametrize("inputs,got", [(None, "none"), ("x", "none"), ([], "0")])
def test_no_inputs(inputs, got):
    doc = {} if inputs is None else {"inputs": inputs}
    e = _refused(json.dumps(doc).encode())
    assert e.status == 400 and "exactly one input" in e.message and f"got {got}" in e.message


def test_two_inputs():
    e = _refused(_body([_input(_flat(1)), _input(_flat(1))]))
    assert e.status == 400 and "exactly one input" in e.message and "got 2" in e.message


def test_input_not_an_object():
    e = _refused(_body([[1, 2, 3]]))
    assert e.status == 400 and "must be an object" in e.message


@pytest.mark.parametrize("key", ["name", "shape", "datatype", "data"])
def test_input_missing_a_key(key):
    spec = _input(_flat(1))
    del spec[key]
    e = _refused(_body(spec))
    assert e.status == 400 and "missing" in e.message and key in e.message


def test_wrong_input_name():
    e = _refused(_body(_input(_flat(1), name="pixels")))
    assert e.status == 400 and "'pixels'" in e.message and f"'{INPUT_NAME}'" in e.message


@pytest.mark.parametrize("datatype", ["INT64", "FP64", "fp32", None])
def test_wrong_datatype(datatype):
    e = _refused(_body(_input(_flat(1), datatype=datatype)))
    assert e.status == 400 and "FP32" in e.message and repr(datatype) in e.message


@pytest.mark.parametrize("shape", ["1,1,8,8", [1, 1, 8.0, 8], [1, "1", 8, 8], [True, 1, 8, 8],
                                   [1, 1, 8, None], 64])
def test_shape_not_a_list_of_ints(shape):
    e = _refused(_body(_input(_flat(1), shape=shape)))
    assert e.status == 400 and "shape must be a list of integers" in e.message


@pytest.mark.parametrize("shape", [[1, 8, 8], [1, 1, 1, 8, 8], [64], [], [1, 3, 8, 8], [1, 1, 8, 7],
                                   [1, 1, 7, 8], [0, 1, 8, 8], [-1, 1, 8, 8]])
def test_wrong_rank_or_dims_or_empty_batch(shape):
    e = _refused(_body(_input(_flat(1), shape=shape)))
    assert e.status == 400 and "shape must be [N, 1, 8, 8] with N >= 1" in e.message


def test_declared_shape_over_element_limit_is_413_without_reading_data():
    limits = Limits(max_elements=1000)
    e = _refused(_body(_input(_flat(1), shape=[16, 1, 8, 8])), limits)  # 1024 > 1000
    assert e.status == 413 and "1024 elements" in e.message and "1000" in e.message
    # exactly at the limit is fine
    parse_infer(_body(_input([0.0] * 1024, shape=[16, 1, 8, 8])), IN_SHAPE, Limits(max_elements=1024))


def test_huge_declared_shape_refused_before_converting_data():
    # 64e9 declared elements with 3 bogus values: a check after np.asarray would say 400
    # (count mismatch or non-numeric), and an allocation by shape would never return.
    body = _body(_input(["not", "a", "number"], shape=[10 ** 9, 1, 8, 8]))
    start = time.perf_counter()
    e = _refused(body)
    assert time.perf_counter() - start < 1.0
    assert e.status == 413 and "over the limit" in e.message


@pytest.mark.parametrize("n_values", [63, 65, 0])
def test_data_count_mismatch(n_values):
    e = _refused(_body(_input([0.5] * n_values, shape=[1, 1, 8, 8])))
    assert e.status == 400 and f"data has {n_values} elements" in e.message and "needs 64" in e.message


@pytest.mark.parametrize("data", [["a"] * 64, [{"v": 1}] * 64, {"v": 1}, [[1.0] * 32, [1.0] * 31 + [[1.0]]],
                                  [[1.0] * 32, [1.0] * 33]])
def test_non_numeric_or_ragged_data(data):
    e = _refused(_body(_input(data, shape=[1, 1, 8, 8])))
    assert e.status == 400 and "data must be numbers" in e.message


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_infinity_in_data(bad):
    data = [0.0] * 64
    data[17] = bad
    body = _body(_input(data, shape=[1, 1, 8, 8]))
    assert b"NaN" in body or b"Infinity" in body  # the tokens Python's json reads back
    e = _refused(body)
    assert e.status == 400 and "NaN or infinity" in e.message


def test_float32_overflow_is_refused_as_infinity():
    data = [0.0] * 64
    data[3] = 1e39  # finite in JSON, inf as float32
    e = _refused(_body(_input(data, shape=[1, 1, 8, 8])))
    assert e.status == 400 and "NaN or infinity" in e.message


def test_body_over_byte_limit():
    body = _body(_input(_flat(1)))
    e = _refused(body, Limits(max_body_bytes=len(body) - 1))
    assert e.status == 413 and f"{len(body)} bytes" in e.message
    assert parse_infer(body, IN_SHAPE, Limits(max_body_bytes=len(body))).x.shape[0] == 1


def test_oversized_body_refused_before_parsing():
    # not JSON at all: a 413 (not a 400) shows the size check runs first
    e = _refused(b"x" * 101, Limits(max_body_bytes=100))
    assert e.status == 413


@pytest.mark.parametrize("request_id", [7, ["a"], {"a": 1}, True])
def test_id_not_a_string(request_id):
    e = _refused(_body(_input(_flat(1)), id=request_id))
    assert e.status == 400 and "'id' must be a string" in e.message


@pytest.mark.parametrize("params", ["fast", [1], 3, True])
def test_parameters_not_an_object(params):
    e = _refused(_body(_input(_flat(1)), parameters=params))
    assert e.status == 400 and "'parameters' must be an object" in e.message


@pytest.mark.parametrize("params", [[], 0, False, ""])
def test_falsy_parameters_not_an_object(params):
    e = _refused(_body(_input(_flat(1)), parameters=params))
    assert e.status == 400 and "'parameters' must be an object" in e.message


def test_huge_integer_in_data_is_a_400():
    data = [0] * 64
    data[0] = 10 ** 400
    e = _refused(_body(_input(data, shape=[1, 1, 8, 8])))
    assert e.status == 400


@pytest.mark.parametrize("value", ["1.5", True])
def test_strings_and_bools_in_data_are_not_numbers(value):
    e = _refused(_body(_input([value] * 64, shape=[1, 1, 8, 8])))
    assert e.status == 400 and "data must be numbers" in e.message


def test_deeply_nested_json_is_a_400():
    e = _refused(b"[" * 100_000 + b"]" * 100_000)
    assert e.status == 400


# --- check_size ------------------------------------------------------------------------------

def test_check_size_over_limit():
    limits = Limits(max_body_bytes=1000)
    with pytest.raises(ProtocolError) as info:
        check_size("1001", limits)
    assert info.value.status == 413 and "1001 bytes" in info.value.message and "1000" in info.value.message


@pytest.mark.parametrize("value", [None, "1000", "0", "", "abc", "-5", "1e9", " 2000"])
def test_check_size_absent_non_digit_or_within_limit(value):
    assert check_size(value, Limits(max_body_bytes=1000)) is None


# --- auto_targets ----------------------------------------------------------------------------

def test_auto_targets_none():
    assert auto_targets({}) == (None, None)
    assert auto_targets({"min_accuracy": None, "max_latency_ms": None}) == (None, None)


def test_auto_targets_accuracy():
    assert auto_targets({"min_accuracy": 0.98}) == (0.98, None)
    assert auto_targets({"min_accuracy": 1}) == (1.0, None)


def test_auto_targets_latency():
    acc, lat = auto_targets({"max_latency_ms": 2})
    assert (acc, lat) == (None, 2.0) and isinstance(lat, float)


def test_auto_targets_floor_and_objective_together():
    assert auto_targets({"min_accuracy": 0.9, "max_latency_ms": 2}) == (0.9, 2.0)


@pytest.mark.parametrize("key,value", [("min_accuracy", 1.01), ("min_accuracy", -0.1), ("min_accuracy", True),
                                       ("min_accuracy", "0.9"), ("min_accuracy", float("nan")),
                                       ("max_latency_ms", -1), ("max_latency_ms", 1e7),
                                       ("max_latency_ms", False), ("max_latency_ms", "2"),
                                       ("max_latency_ms", float("inf")), ("max_latency_ms", [2])])
def test_auto_targets_bad_value_names_key(key, value):
    with pytest.raises(ProtocolError) as info:
        auto_targets({key: value})
    assert info.value.status == 400 and f"parameters.{key}" in info.value.message
