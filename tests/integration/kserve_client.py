"""KServe's Python SDK against a distillery server, as a user's client process would run it.

    python kserve_client.py BASE_URL GRPC_TARGET MODEL API_KEY IMAGES.npy

A process of its own: KServe's SDK and tritonclient (whose messages the server side uses)
both register `inference.*` in protobuf's default pool, so one process cannot import both.
Prints one JSON object: readiness, and the labels of each call (HTTP JSON, HTTP binary,
HTTP `auto`, gRPC), or the refusal a wrong key got.
"""

import asyncio
import json
import sys

import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig


def _request(model: str, x: np.ndarray, binary: bool = False) -> InferRequest:
    tensor = InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return InferRequest(model, [tensor], request_id="k-1")


def _labels(reply) -> list[int]:
    return next(o for o in reply.outputs if o.name == "label").as_numpy().tolist()


async def over_http(base: str, model: str, key: str, x: np.ndarray) -> dict:
    client, headers = InferenceRESTClient(RESTConfig(protocol="v2", retries=0)), {"x-api-key": key}
    try:
        out = {"ready": await client.is_model_ready(base, model, headers=headers),
               "ready_wrong_key": await client.is_model_ready(base, model,
                                                              headers={"x-api-key": "wrong"})}
        for name, target, binary in (("json", model, False), ("binary", model, True),
                                     ("auto", "auto", False)):
            reply = await client.infer(base, _request(target, x, binary), model_name=target,
                                       headers=dict(headers))
            out[name] = {"labels": _labels(reply), "id": reply.id}
        return out
    finally:
        await client.close()


async def over_grpc(target: str, model: str, key: str, x: np.ndarray) -> dict:
    client = InferenceGRPCClient(target)
    try:
        out = {"ready": await client.is_model_ready(model, headers=[("x-api-key", key)])}
        for name, which in (("grpc", model), ("grpc_auto", "auto")):
            reply = await client.infer(_request(which, x), headers=[("x-api-key", key)])
            out[name] = {"labels": _labels(reply)}
        try:
            await client.infer(_request(model, x), headers=[("x-api-key", "wrong")])
        except Exception as e:  # grpc.aio.AioRpcError: its code is the point
            out["grpc_wrong_key"] = str(e.code())
        return out
    finally:
        await client.close()


def main() -> None:
    base, target, model, key, images = sys.argv[1:6]
    x = np.load(images).astype(np.float32)
    result = asyncio.run(over_http(base, model, key, x)) | asyncio.run(over_grpc(target, model, key, x))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
