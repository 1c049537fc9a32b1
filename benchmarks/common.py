"""What the benchmark scripts share: run the library's stages, describe the machine, write results.

The scripts only choose configs and read back what the pipeline wrote (metrics.json,
manifest.json, results.json); training is always `distillery.pipeline.stages.run_stages`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from distillery.config import PipelineConfig, load_config
from distillery.pipeline.stages import run_stages

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "digits.yaml"
RESULTS = Path(__file__).resolve().parent / "results"


def make_config(storage: Path, name: str, overrides: list[str]) -> PipelineConfig:
    """The digits preset, stored under `storage/name`, with `overrides` (KEY=VALUE) applied."""
    return load_config(PRESET, [f"storage_path={storage}", f"name={name}", *overrides])


def run(cfg: PipelineConfig, stages: list[str] | None = None) -> tuple[Path, float]:
    """Run `stages` of `cfg`; return (run directory, wall seconds)."""
    start = time.perf_counter()
    run_dir = run_stages(cfg, stages, log=_quiet)
    return run_dir.root, time.perf_counter() - start


def _quiet(msg: str) -> None:
    # Stage lines only: per-epoch lines and the results table would bury the benchmark's own table.
    if msg.startswith("[") and " epoch " not in msg:
        print(msg, flush=True)


def seeds_parser(doc: str) -> argparse.ArgumentParser:
    """The command line every seeds benchmark shares: --quick and --seeds (0-4 by default)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 epochs per model (a smoke test, not a result)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    return parser


def quick_overrides(args: argparse.Namespace) -> list[str]:
    return ["teacher.train.epochs=3", "student.train.epochs=3"] if args.quick else []


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def median(values: list[float]) -> float:
    return statistics.median(values)


def mean(values: list[float]) -> float:
    return statistics.fmean(values)


def mean_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean over runs (seeds) and its `level` Student-t interval; with
    one value the interval is unknown (nan)."""
    from scipy import stats

    m = statistics.fmean(values)
    if len(values) < 2:
        return m, float("nan"), float("nan")
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return m, m - half, m + half


def machine(threads_per_worker: str) -> dict[str, Any]:
    """The facts a reader needs to weigh the numbers: CPU, cores, threads, versions, code."""
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads_per_worker": threads_per_worker,
            "python": platform.python_version(), "torch": metadata.version("torch"),
            "ray": metadata.version("ray"), "git": _git_state()}


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _git_state() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = git("status", "--porcelain", "--", "src", "configs")
    return git("rev-parse", "--short", "HEAD") + (" + uncommitted changes in src/ or configs/" if dirty else "")


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table; right-aligned after the first column."""
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_lines(info: dict[str, Any]) -> str:
    return (f"Machine: {info['cpu']}, {info['cores']} cores; torch threads per worker: "
            f"{info['torch_threads_per_worker']}; torch {info['torch']}, ray {info['ray']}, "
            f"Python {info['python']}; code at {info['git']}.")


def publish(name: str, report: str, figures: dict[str, Any], quick: bool) -> Path:
    """Print `report` and write `figures` as JSON to benchmarks/results/ (a --quick run apart)."""
    print("\n" + report)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}{'-quick' if quick else ''}.json"
    path.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\nfigures: {path}")
    return path
