"""gRPC against HTTP on the same served models, side by side in one run.

    python benchmarks/grpc_http.py [--run-dir runs/digits] [--model student] [--seconds 5]

One local Ray with HAProxy ingress serves the run's models as `distillery serve` does (one
replica per application, 0.5 logical CPU, 1 torch thread). HTTP goes to the model's own
application, gRPC to the `grpc` application (every model in one replica); each gets the
same images. 1-image and 64-image requests at concurrency 1 and 32, HTTP with JSON and with
binary tensors, gRPC with raw contents.

The load comes from a client process of its own at Ray's worker priority (nice 15), the
same kind for both protocols (Python asyncio: aiohttp, grpc.aio), so neither protocol gets
a faster generator; its CPU share of the machine is printed, since it competes with the
server for the same cores. Closed loop, after a warm-up; every figure is the mean of two
rounds in opposite orders. Writes benchmarks/results/grpc_http_<machine>_<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from common import table, write_result  # noqa: E402

from distillery import data  # noqa: E402
from distillery.config import ServeConfig  # noqa: E402
from distillery.loadtest import generator  # noqa: E402
from distillery.measure import timing  # noqa: E402

LOADS = [(protocol, images, c) for images in (1, 64) for c in (1, 32)
         for protocol in ("http-json", "http-binary", "grpc")]


# ---------------------------------------------------------------- the client process

def http_request(x, binary: bool) -> tuple[bytes, dict]:
    if not binary:
        body = generator.infer_body(x.reshape(-1).tolist(), list(x.shape))
        return body, {"content-type": "application/json"}
    header = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.numel() * 4}}]}).encode()
    return header + x.numpy().astype("<f4").tobytes(), {"content-type": "application/octet-stream",
                                                          "inference-header-content-length": str(len(header))}


async def grpc_closed_loop(target: str, model: str, x, concurrency: int, seconds: float) -> list[float]:
    """Latencies (ms) of ModelInfer calls that answered OK, `concurrency` callers, `seconds`."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc

    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.numpy().astype("<f4").tobytes())
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        deadline = time.perf_counter() + seconds

        async def caller() -> None:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                try:
                    await stub.ModelInfer(request, timeout=60)
                except grpc.aio.AioRpcError:
                    continue
                latencies.append(1e3 * (time.perf_counter() - start))

        await asyncio.gather(*(caller() for _ in range(concurrency)))
    return latencies


def client(args: argparse.Namespace) -> None:
    """One load, in this process; prints its figures as JSON."""
    os.nice(15)  # Ray's worker priority: the generator must not starve the replicas
    x = data.load_split(args.run_dir / "data", "test")[0][:args.images]
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    if args.protocol == "grpc":
        ok = asyncio.run(grpc_closed_loop(args.target, args.model, x, args.concurrency, args.seconds))
        sent = len(ok)
    else:
        body, headers = http_request(x, args.protocol == "http-binary")
        url = f"{args.target}/v2/models/{args.model}/infer"
        samples = asyncio.run(generator.closed_loop(url, body, args.concurrency, args.seconds, headers))
        ok, sent = [s.latency_ms for s in samples if s.status == 200], len(samples)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / wall / (os.cpu_count() or 1)
    print(json.dumps({"throughput": len(ok) / args.seconds, "p50_ms": generator.percentile(sorted(ok), 50),
                      "p99_ms": generator.percentile(sorted(ok), 99), "errors": sent - len(ok),
                      "generator_cpu": round(cpu, 3)}))


# ---------------------------------------------------------------- the benchmark

def load(args: argparse.Namespace, urls: dict, protocol: str, images: int, c: int, seconds: float) -> dict:
    target = urls["grpc" if protocol == "grpc" else "http"]
    cmd = [sys.executable, __file__, "--client", protocol, "--target", target, "--run-dir", str(args.run_dir),
           "--model", args.model, "--images", str(images), "--concurrency", str(c), "--seconds", str(seconds)]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])


def serve(run_dir: Path, model: str) -> dict[str, str]:
    import ray

    from distillery.compat import ingress
    from distillery.serving import serve_apps

    cfg = ServeConfig(port=free_port(), grpc_port=free_port(), models=[model], auto=False,
                      min_replicas=1, max_replicas=1, max_ongoing_requests=128, max_queued_requests=1000,
                      request_timeout_s=60)
    ingress.apply("haproxy", cfg.host)
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
    serve_apps.deploy(str(run_dir), cfg, None)
    time.sleep(5)  # replica processes finish starting: they share the 2 cores
    return {"http": f"http://{cfg.host}:{cfg.port}", "grpc": f"{cfg.host}:{cfg.grpc_port}"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rounds(args: argparse.Namespace, urls: dict) -> dict[str, dict]:
    for protocol, images, c in LOADS:  # warm-up, not recorded
        load(args, urls, protocol, images, c, 1.0)
    seen: dict[str, list[dict]] = {f"{p} x{i} c{c}": [] for p, i, c in LOADS}
    for order in (LOADS, LOADS[::-1]):
        for protocol, images, c in order:
            key = f"{protocol} x{images} c{c}"
            seen[key].append(load(args, urls, protocol, images, c, args.seconds))
            print(f"  {key}: {seen[key][-1]}", flush=True)
    return {key: {k: sum(r[k] or 0 for r in rs) / len(rs) for k in rs[0]} |
            {"throughput_rounds": [round(r["throughput"], 1) for r in rs]} for key, rs in seen.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, default=Path("runs/digits"))
    ap.add_argument("--model", default="student")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--client", choices=["http-json", "http-binary", "grpc"], help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--images", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.run_dir = args.run_dir.resolve()
    if args.client:
        args.protocol = args.client
        return client(args)
    runs = rounds(args, serve(args.run_dir, args.model))
    t = {k: v["throughput"] for k, v in runs.items()}
    ratios = {f"grpc_vs_http_{kind}_x{i}_c{c}": t[f"grpc x{i} c{c}"] / t[f"http-{kind} x{i} c{c}"]
              for kind in ("json", "binary") for i in (1, 64) for c in (1, 32)}
    out = {"machine": {**timing.machine_info(),
                       "replica": "1 replica per application, 0.5 logical CPU, 1 torch thread"},
           "load_tool": "a client process at nice 15: aiohttp (HTTP) and grpc.aio (gRPC)",
           "model": args.model,
           "seconds_per_load": args.seconds, "runs": runs, "ratios": ratios}
    rows = [[k, f"{v['throughput']:,.1f}", f"{v['p50_ms']:.2f}", f"{v['p99_ms']:.1f}",
             int(v["errors"]) or "-", f"{v['generator_cpu']:.0%}"] for k, v in runs.items()]
    print(table(["protocol, images, concurrency", "requests/s", "p50 ms", "p99 ms", "errors",
                 "generator CPU"], rows))
    print(json.dumps(ratios, indent=1))
    print(f"figures: {write_result('grpc_http', out, quick=False)}")


if __name__ == "__main__":
    main()
