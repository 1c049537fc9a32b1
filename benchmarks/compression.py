"""Compression targets, measured side by side in one process (1 torch thread, as a replica runs).

    python benchmarks/compression.py [--run-dir runs/digits] [--repeats 3]

1. digits: the recommended variant of a finished run (frontier.json; the run is made with the
   digits preset first if missing) against the teacher in fp32 eager mode: throughput at batch
   256 and p50 latency at batch 1. And channel pruning where it pays: the pruned teacher's
   speed-up at batch 256 against its MAC ratio.
2. CIFAR-shaped input (3x32x32), the brief's student at full width (random weights: speed
   only): fp32 eager, fp32 in its fastest mode, our int8 (PT2E static, compiled) and torchao's
   default int8 path (int8 dynamic activations and weights) in its fastest mode.
Each comparison alternates its models within a repeat; figures are medians over repeats.
Writes benchmarks/results/compression_<machine>_<date>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from common import PRESET, median, table, write_result  # noqa: E402

from distillery import artifacts  # noqa: E402
from distillery.config import CNNConfig, load_config  # noqa: E402
from distillery.config.compress import Int8Dynamic  # noqa: E402
from distillery.measure import timing  # noqa: E402
from distillery.models import quantized as quantize
from distillery.models.architectures import build_model, count_macs, make_spec  # noqa: E402
from distillery.pipeline.stages import run_stages  # noqa: E402

SETTINGS = timing.BenchSettings(threads=1)


def timed(model, in_shape, macs, mode: str, int8: bool = False) -> dict:
    m = timing.measure(model, in_shape, macs, SETTINGS, [mode], int8=int8)
    return {"throughput": m["throughput"], "p50_ms": m["p50_ms"], "p99_ms": m["p99_ms"], "mode": mode}


def repeat(models: dict[str, tuple], repeats: int) -> dict[str, dict]:
    """{name: (model, in_shape, macs, mode, int8)} measured `repeats` times, alternating;
    medians of throughput and p50 per name."""
    runs: dict[str, list[dict]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, args in models.items():
            runs[name].append(timed(*args))
    return {name: {"throughput": median([r["throughput"] for r in rs]),
                   "p50_ms": median([r["p50_ms"] for r in rs]),
                   "mode": rs[0]["mode"], "throughput_runs": [round(r["throughput"]) for r in rs]}
            for name, rs in runs.items()}


def digits(run_dir: Path, repeats: int) -> dict:
    if not (run_dir / "frontier.json").exists():
        run_stages(load_config(PRESET, [f"storage_path={run_dir.parent}", f"name={run_dir.name}"]))
    front = json.loads((run_dir / "frontier.json").read_text())
    records = {r["name"]: r for r in front["variants"]}
    best = records[front["recommended"]["name"]]
    teacher, arch = artifacts.load(run_dir / "teacher")
    shape, t_macs = arch["spec"]["in_shape"], records["teacher"]["macs"]
    chosen = _load(run_dir, best["name"])
    models = {"teacher fp32 eager": (teacher, shape, t_macs, "eager"),
              f"{best['name']} ({best['best_mode']})": (chosen, shape, best["macs"], best["best_mode"])}
    slim = records.get("teacher-slim")
    if slim:
        t_mode, s_mode = records["teacher"]["best_mode"], slim["best_mode"]
        t_key, s_key = f"teacher fp32 ({t_mode})", f"teacher-slim ({s_mode})"
        models[t_key] = (teacher, shape, t_macs, t_mode)
        models[s_key] = (_load(run_dir, "teacher-slim"), shape, slim["macs"], s_mode)
    speed = repeat(models, repeats)
    base, ours = speed["teacher fp32 eager"], speed[f"{best['name']} ({best['best_mode']})"]
    out = {"recommended": best["name"], "teacher_test_accuracy": records["teacher"]["test_accuracy"],
           "recommended_test_accuracy": best["test_accuracy"], "speed": speed,
           "throughput_ratio_vs_teacher_eager": ours["throughput"] / base["throughput"],
           "batch1_speedup_vs_teacher_eager": base["p50_ms"] / ours["p50_ms"]}
    if slim:
        t_best, s = speed[t_key], speed[s_key]
        out["teacher_slim"] = {"mac_ratio": t_macs / slim["macs"],
                               "speedup_b256": s["throughput"] / t_best["throughput"],
                               "test_accuracy_drop": records["teacher"]["test_accuracy"]
                               - slim["test_accuracy"]}
    return out


def _load(run_dir: Path, name: str):
    if name in ("teacher", "student", "student_scratch"):
        return artifacts.load(run_dir / name)[0]
    return artifacts.load(run_dir / "variants" / name)[0]


def cifar_shaped(repeats: int) -> dict:
    shape = [3, 32, 32]
    torch.manual_seed(0)
    fp32 = build_model(make_spec(CNNConfig(width_mult=1.0), shape, 10)).eval()
    macs = count_macs(fp32, shape)
    prepared = quantize.prepare(copy.deepcopy(fp32), shape)
    quantize.calibrate(prepared, torch.rand(512, *shape))
    ours = quantize.convert(prepared)
    torchao_default = quantize.apply_torchao(copy.deepcopy(fp32), Int8Dynamic())
    fp32_best = timing.measure(fp32, shape, macs, SETTINGS)["best_mode"]
    ao_best = timing.measure(torchao_default, shape, macs, SETTINGS, int8=True)["best_mode"]
    ao_key = f"torchao default int8 ({ao_best})"
    speed = repeat({"fp32 eager": (fp32, shape, macs, "eager"),
                    f"fp32 ({fp32_best})": (fp32, shape, macs, fp32_best),
                    "int8 static, ours (compile)": (ours, shape, macs, "compile", True),
                    ao_key: (torchao_default, shape, macs, ao_best, True)}, repeats)
    eager, mine, ao = (speed["fp32 eager"], speed["int8 static, ours (compile)"], speed[ao_key])
    return {"macs": macs, "speed": speed, "int8_vs_fp32_eager_b256": mine["throughput"] / eager["throughput"],
            "int8_vs_torchao_default_b256": mine["throughput"] / ao["throughput"],
            "int8_vs_torchao_default_b1": ao["p50_ms"] / mine["p50_ms"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, default=Path("runs/digits"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    result = {"machine": {**timing.machine_info(), "threads": SETTINGS.threads}, "repeats": args.repeats,
              "digits": digits(args.run_dir, args.repeats), "cifar_shaped": cifar_shaped(args.repeats)}
    for part in ("digits", "cifar_shaped"):
        rows = [[name, f"{s['throughput']:,.0f}", f"{s['p50_ms']:.3f}"]
                for name, s in result[part]["speed"].items()]
        print(f"\n{part}\n" + table(["model (mode)", "images/s at 256", "p50 ms at 1"], rows))
        print(json.dumps({k: v for k, v in result[part].items() if k != "speed"}, indent=1))
    print(f"figures: {write_result('compression', result, quick=False)}")


if __name__ == "__main__":
    main()
