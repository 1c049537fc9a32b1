"""What a user's machine does in test_cluster_rig.py, run there (`ip netns exec` of the client
namespace): `infer URL GRPC_ADDRESS MODEL BODY.json` asks the ingress over HTTP (JSON) and
gRPC (tritonclient, unchanged) and prints both answers as JSON; `probe HOST:PORT ...` prints
which of those addresses accept a TCP connection."""

import json
import socket
import sys
import urllib.request

import numpy as np


def infer(url: str, grpc_address: str, model: str, body_path: str) -> dict:
    body = open(body_path, "rb").read()
    request = urllib.request.Request(f"{url}/v2/models/{model}/infer", data=body,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        http = {o["name"]: o["data"] for o in json.loads(r.read())["outputs"]}
    import tritonclient.grpc as triton

    spec = json.loads(body)["inputs"][0]
    x = np.asarray(spec["data"], dtype=np.float32).reshape(spec["shape"])
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = triton.InferenceServerClient(grpc_address).infer(model, [inp])
    return {"http_label": http["label"], "http_logits": http["logits"],
            "grpc_label": result.as_numpy("label").tolist(),
            "grpc_logits": result.as_numpy("logits").ravel().tolist()}


def probe(addresses: list[str]) -> list[str]:
    answered = []
    for address in addresses:
        host, port = address.rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                answered.append(address)
        except OSError:  # refused (a reset from the firewall, or nothing there) or no answer
            pass
    return answered


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    print(json.dumps(infer(*args) if command == "infer" else probe(args)))
