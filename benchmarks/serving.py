"""Serving figures, side by side in one run: Ray Serve on this machine, the load generator in
this process (asyncio, keep-alive; its CPU share is printed), closed loop, 1-image requests
unless stated; after a warm-up, two rounds in opposite orders, the mean reported.

    python benchmarks/serving.py [--run-dir runs/digits] [--seconds 5]

1. framework ceiling: a no-op deployment served the same way (one hop) against the digits
   student at concurrency 32;
2. student against teacher (digits; and CIFAR-shaped 3x32x32 models with random weights,
   speed only), one replica each with the same CPU budget, concurrency 32;
3. dynamic batching on and off for the teacher at concurrency 32;
4. 64-image requests (JSON and Triton binary tensors) against the same predictor in process
   at batch 64.
Writes benchmarks/results/serving.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from common import RESULTS, table  # noqa: E402

from distillery import bench, data, loadgen  # noqa: E402
from distillery.artifacts import atomic_write_json, save_model  # noqa: E402
from distillery.config import CNNConfig, ResNetConfig, ServeConfig  # noqa: E402
from distillery.models import build_model, make_spec  # noqa: E402
from distillery.predictor import Predictor, catalog  # noqa: E402

CONCURRENCY = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy(run_dir: Path, model: str, app: str, cfg: ServeConfig) -> None:
    from ray import serve

    from distillery.serving import AppArgs, build_application

    args = AppArgs(kind="model", run_dir=str(run_dir), models=[model], settings=cfg.model_dump())
    serve.run(build_application(args), name=app, route_prefix=f"/v2/models/{app}")


def deploy_noop() -> None:
    from ray import serve
    from starlette.responses import JSONResponse

    @serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.5})  # as the models below
    class NoOp:
        async def __call__(self, request):
            await request.body()
            return JSONResponse({"model_name": "noop", "outputs": [], "parameters": {"variant": "noop"}})

    serve.run(NoOp.bind(), name="noop", route_prefix="/v2/models/noop")


def load(base: str, app: str, body: bytes, seconds: float, concurrency: int = CONCURRENCY,
         headers: dict | None = None) -> dict:
    url = f"{base}/v2/models/{app}/infer"
    run = loadgen.closed_loop(url, body, concurrency, seconds, headers or {"content-type": "application/json"})
    samples, _, cpu = asyncio.run(loadgen.with_replicas(run, None))
    summary = loadgen.summarize(samples, seconds)
    return {k: summary[k] for k in ("requests", "ok", "errors", "throughput", "p50_ms", "p99_ms")} | {
        "generator_cpu": round(cpu, 3)}


def binary_body(x: torch.Tensor) -> tuple[bytes, dict]:
    header = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.numel() * 4}}]}).encode()
    return header + x.numpy().astype("<f4").tobytes(), {"content-type": "application/octet-stream",
                                                          "inference-header-content-length": str(len(header))}


def cifar_run(folder: Path) -> Path:
    """A run directory with CIFAR-shaped models of random weights and a measured frontier:
    speed only (their accuracy is chance and is not reported)."""
    shape, records = [3, 32, 32], []
    torch.manual_seed(0)
    for name, cfg in (("teacher", ResNetConfig()), ("student", CNNConfig(width_mult=1.0))):
        spec = make_spec(cfg, shape, 10)
        model = build_model(spec).eval()
        save_model(folder / name, model, spec)
        speed = bench.measure(model, shape, 1, bench.BenchSettings(latency_runs=50, throughput_runs=3),
                              ["eager", "channels_last"])
        records.append({"name": name, "test_accuracy": 0.0, "p50_ms": speed["p50_ms"], "modes": speed["modes"]})
    atomic_write_json(folder / "frontier.json", {"variants": records, "pareto": ["student", "teacher"],
                                                 "recommended": None})
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, default=Path("runs/digits"))
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    import ray
    from ray import serve

    run_dir, secs = args.run_dir.resolve(), args.seconds
    cifar = cifar_run(Path(tempfile.mkdtemp()) / "cifar")
    one = ServeConfig(min_replicas=1, max_replicas=1, num_cpus=0.5, max_ongoing_requests=64, max_queued_requests=1000)
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    base = f"http://127.0.0.1:{port}"
    deploy_noop()
    for name in ("student", "teacher"):
        deploy(run_dir, name, name, one)
        deploy(cifar, name, f"cifar-{name}", one)
    deploy(run_dir, "teacher", "teacher-nobatch", one.model_copy(update={"max_batch_size": 1}))
    deploy(cifar, "teacher", "cifar-teacher-nobatch", one.model_copy(update={"max_batch_size": 1}))

    x1 = data.load_split(run_dir / "data", "test")[0][:1]
    x64 = data.load_split(run_dir / "data", "test")[0][:64]
    body1 = loadgen.infer_body(x1.reshape(-1).tolist(), list(x1.shape))
    c1 = torch.rand(1, 3, 32, 32)
    cbody1 = loadgen.infer_body(c1.reshape(-1).tolist(), list(c1.shape))
    out: dict = {"machine": {**bench.machine_info(), "replica": "1 replica, 0.5 logical CPU, 1 torch thread"},
                 "seconds_per_load": secs, "concurrency": CONCURRENCY, "runs": {}}
    runs = out["runs"]
    loads = [("noop", body1), ("student", body1), ("teacher", body1), ("teacher-nobatch", body1),
             ("cifar-student", cbody1), ("cifar-teacher", cbody1), ("cifar-teacher-nobatch", cbody1)]
    time.sleep(10)  # let the replica processes finish starting: they compete for the same 2 cores
    for app, body in loads:
        load(base, app, body, 1.0)  # warm-up, not recorded
    rounds: dict[str, list[dict]] = {app: [] for app, _ in loads}
    for order in (loads, loads[::-1]):  # two rounds, opposite orders: drift hits every deployment alike
        for app, body in order:
            rounds[app].append(load(base, app, body, secs))
            print(app, rounds[app][-1], flush=True)
    for app, results in rounds.items():  # the mean of the two rounds
        runs[app] = {k: (sum(r[k] for r in results) / len(results) if isinstance(results[0][k], float) else
                         results[0][k]) for k in results[0]} | {"throughput_rounds": [r["throughput"] for r in results]}
    json64 = loadgen.infer_body(x64.reshape(-1).tolist(), list(x64.shape))
    bin64, headers = binary_body(x64)
    runs["student x64 json"] = load(base, "student", json64, secs, concurrency=4)
    runs["student x64 binary"] = load(base, "student", bin64, secs, concurrency=4, headers=headers)
    predictor = Predictor(catalog(run_dir, ["student"])[0])
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < secs:
        predictor(x64)
        n += 1
    in_process = 64 * n / (time.perf_counter() - start)
    serve.shutdown()
    ray.shutdown()

    r = runs
    out["ratios"] = {
        "student_vs_noop_c32": r["student"]["throughput"] / r["noop"]["throughput"],
        "digits_student_vs_teacher": r["student"]["throughput"] / r["teacher"]["throughput"],
        "cifar_student_vs_teacher": r["cifar-student"]["throughput"] / r["cifar-teacher"]["throughput"],
        "digits_teacher_batching_on_vs_off": r["teacher"]["throughput"] / r["teacher-nobatch"]["throughput"],
        "cifar_teacher_batching_on_vs_off": r["cifar-teacher"]["throughput"] / r["cifar-teacher-nobatch"]["throughput"],
        "x64_json_images_vs_in_process": 64 * r["student x64 json"]["throughput"] / in_process,
        "x64_binary_images_vs_in_process": 64 * r["student x64 binary"]["throughput"] / in_process,
    }
    out["in_process_student_b64_images_per_s"] = in_process
    rows = [[app, f"{v['throughput']:,.1f}", f"{v['p50_ms']:.1f}", f"{v['p99_ms']:.1f}", v["errors"] or "-",
             f"{v['generator_cpu']:.0%}"] for app, v in runs.items()]
    print(table(["deployment (load)", "requests/s", "p50 ms", "p99 ms", "errors", "generator CPU"], rows))
    print(json.dumps(out["ratios"], indent=1), f"\nin-process student, batch 64: {in_process:,.0f} images/s")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serving.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
