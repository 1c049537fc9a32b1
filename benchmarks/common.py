"""What the benchmark scripts share: run the library's stages, describe the machine, write results.

The scripts only choose configs and read back what the pipeline wrote (metrics.json,
manifest.json, results.json); training is always `distillery.pipeline.stages.run_stages`.

Every result is written as benchmarks/results/<script>_<machine>_<date>.json with a `meta`
object (script, arguments, machine, date, commit, versions) that benchmarks/figures.py reads;
a newer result of the same script on the same machine moves the older one to results/archive/.
distillery is imported where a function needs it, so that figures.py and the tests can read
results without loading torch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distillery.config import PipelineConfig

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "digits.yaml"
RESULTS = Path(__file__).resolve().parent / "results"
ARCHIVE = RESULTS / "archive"  # superseded results, kept for history
QUICK = RESULTS / "quick"  # --quick runs: smoke tests, not results (gitignored)


def make_config(storage: Path, name: str, overrides: list[str]) -> PipelineConfig:
    """The digits preset, stored under `storage/name`, with `overrides` (KEY=VALUE) applied."""
    from distillery.config import load_config

    return load_config(PRESET, [f"storage_path={storage}", f"name={name}", *overrides])


def run(cfg: PipelineConfig, stages: list[str] | None = None) -> tuple[Path, float]:
    """Run `stages` of `cfg`; return (run directory, wall seconds)."""
    from distillery.pipeline.stages import run_stages

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
    parser.add_argument("--quick", action="store_true",
                        help="3 epochs per model (a smoke test, not a result)")
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
    note = " + uncommitted changes in src/ or configs/" if dirty else ""
    return git("rev-parse", "--short", "HEAD") + note


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table; right-aligned after the first column."""
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_lines(info: dict[str, Any]) -> str:
    return (f"Machine: {info['cpu']}, {info['cores']} cores; torch threads per worker: "
            f"{info['torch_threads_per_worker']}; torch {info['torch']}, ray {info['ray']}, "
            f"Python {info['python']}; code at {info['git']}.")


def publish(name: str, report: str, figures: dict[str, Any], quick: bool, variant: str | None = None) -> Path:
    """Print `report` and write `figures` as the result of script `name` (see write_result)."""
    print("\n" + report)
    path = write_result(name, figures, quick, variant)
    print(f"\nfigures: {path}")
    return path


def write_result(script: str, figures: dict[str, Any], quick: bool, variant: str | None = None,
                 directory: Path | None = None, root: Path = ROOT) -> Path:
    """Write `figures` with a `meta` object to `directory` (default: results/, or results/quick/ for
    a --quick run, which is not a result); return the path. `variant` names a setting that
    measures something else than the script's default (distill_seeds --ray); `root` is the
    checkout whose code was measured."""
    info = meta(script, variant, root=root)
    directory = directory or (QUICK if quick else RESULTS)
    path = directory / result_name(info)
    directory.mkdir(parents=True, exist_ok=True)
    if directory == RESULTS:
        retire_older(path)
    path.write_text(json.dumps({"meta": info, **figures}, indent=2) + "\n")
    return path


def meta(script: str, variant: str | None = None, args: list[str] | None = None,
         root: Path = ROOT) -> dict[str, Any]:
    """What a reader needs to weigh a result and a program to find it: which script with which
    arguments, on what machine, when, on which code, with which libraries."""
    cpu, cores, gpu = _cpu_model(), os.cpu_count(), _gpu_name()
    return {"script": script, "variant": variant, "args": sys.argv[1:] if args is None else args,
            "machine": {"cpu": cpu, "cores": cores, "gpu": gpu, "slug": machine_slug(cpu, cores, gpu)},
            "date": datetime.now(timezone.utc).date().isoformat(), "commit": commit(root),
            "versions": {"python": platform.python_version(),
                         **{lib: _version(lib) for lib in ("torch", "ray", "torchao")}}}


def result_name(info: dict[str, Any]) -> str:
    """<script>[-<variant>]_<machine slug>_<date>.json"""
    name = info["script"] + (f"-{info['variant']}" if info.get("variant") else "")
    return f"{name}_{info['machine']['slug']}_{info['date']}.json"


def retire_older(path: Path) -> None:
    """Move the earlier results of the same script (and variant) on the same machine to archive/:
    results/ holds one current result per script and machine."""
    name, slug, _ = path.stem.rsplit("_", 2)
    for old in RESULTS.glob(f"{name}_{slug}_*.json"):
        if old.name != path.name:
            ARCHIVE.mkdir(exist_ok=True)
            old.rename(ARCHIVE / old.name)
            print(f"superseded: {old.name} -> {ARCHIVE.relative_to(ROOT)}/")


def machine_slug(cpu: str | None, cores: int | None, gpu: str | None) -> str:
    """A short, stable name for a machine: 'h100' (the GPU is what a GPU result is about; 'h100x8'
    for eight), else the CPU model's first words and the logical cores ('amd-epyc-2c')."""
    if gpu:
        name, _, count = gpu.partition(" x")
        words = re.split(r"[\s-]+", re.sub(r"(?i)nvidia|geforce|tesla", " ", name).strip().lower())
        # Up to the first word with a digit: 'h100' of 'H100 80GB HBM3', 'rtx-4090' of 'RTX 4090'.
        digit = next((i for i, w in enumerate(words) if re.search(r"\d", w)), len(words) - 1)
        return "-".join(words[:digit + 1]) + (f"x{count}" if count else "")
    words = re.sub(r"\(r\)|\(tm\)|processor|cpu|@.*", " ", (cpu or "unknown").lower()).split()
    return "-".join([*words[:4], f"{cores}c"])


def commit(root: Path = ROOT) -> dict[str, Any]:
    """HEAD's short hash, and whether the measured code (src/, configs/, the benchmark scripts)
    had uncommitted changes: a figure from a dirty tree cannot be reproduced from the hash."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout.strip()
    dirty = git("status", "--porcelain", "--", "src", "configs", "benchmarks/*.py")
    return {"hash": git("rev-parse", "--short", "HEAD") or None, "dirty": bool(dirty)}


def _gpu_name() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    count = torch.cuda.device_count()
    return torch.cuda.get_device_name(0) + (f" x{count}" if count > 1 else "")


def _version(lib: str) -> str | None:
    try:
        return metadata.version(lib)
    except metadata.PackageNotFoundError:
        return None
