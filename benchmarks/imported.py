"""A teacher exported from a run and imported again, on digits: does the student distilled
from it reach the accuracy of the student distilled in the run that trained it?

    .venv/bin/python benchmarks/imported.py [--quick] [--workers 2] [--seeds 0]

Per seed: the digits preset on Ray Train (`ray.workers`, default 2 DDP workers) trains the
teacher and distils the student (the in-run distillation). Its teacher is then exported three
ways (the run's directory, a `torch.export` program, a safetensors state dict) and imported by
three new runs of the same config, which distil the student again. Differences against the
in-run student are paired on the same 360 test images (1 image = 0.28 points), with the 95%
interval from the images only one of the two got right. Figures go to
benchmarks/results/imported_<machine>_<date>.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from common import machine, machine_lines, make_config, publish, run, table
from safetensors.torch import save_file
from torch.export import Dim

from distillery import artifacts, data
from distillery.measure.accuracy import paired_interval


def correct(root: Path) -> torch.Tensor:
    x, y = data.load_split(root / "data", "test")
    model, _ = artifacts.load(root / "student")
    with torch.inference_mode():
        return model(x).argmax(1) == y


def exports(run_dir: Path, out: Path) -> dict[str, str]:
    """The run's teacher as each import form: {form: teacher.import_from}."""
    teacher, arch = artifacts.load(run_dir / "teacher")
    shape = arch["spec"]["in_shape"]
    program = torch.export.export(teacher, (torch.zeros(2, *shape),), dynamic_shapes=({0: Dim("batch")},))
    torch.export.save(program, str(out / "teacher.pt2"))
    save_file(teacher.state_dict(), str(out / "teacher.safetensors"))
    return {"run directory": str(run_dir), "torch.export program": str(out / "teacher.pt2"),
            "safetensors state dict": str(out / "teacher.safetensors")}


def run_seed(storage: Path, seed: int, overrides: list[str]) -> dict:
    stages = ["data", "teacher", "student"]
    base = [f"seed={seed}", "compress.variants=[]", "serve.enabled=false", *overrides]
    in_run, _ = run(make_config(storage, f"in-run-{seed}", base), stages)
    reference = correct(in_run)
    out = {"in-run": {"student": reference.float().mean().item()}}
    for form, location in exports(in_run, storage).items():
        print(f"\n== seed {seed}: teacher imported from its {form}", flush=True)
        root, _ = run(make_config(storage, f"{form.split()[0]}-{seed}",
                                  [*base, f"teacher.import_from={location}"]), stages)
        got = correct(root)
        better, worse = int((got & ~reference).sum()), int((reference & ~got).sum())
        out[form] = {"student": got.float().mean().item(), "vs_in_run": (better - worse) / len(got),
                     "vs_in_run_interval": paired_interval(better, worse, len(got)),
                     "identical_predictions": bool(torch.equal(got, reference))}
    return out


def report(per_seed: list[dict], seeds: list[int], info: dict, workers: int) -> str:
    forms = [f for f in per_seed[0] if f != "in-run"]
    rows = []
    for seed, r in zip(seeds, per_seed):
        cells = [f"{r[f]['student']:.2%}, {r[f]['vs_in_run'] * 100:+.2f} "
                 f"({r[f]['vs_in_run_interval'][0] * 100:+.2f} to "
                 f"{r[f]['vs_in_run_interval'][1] * 100:+.2f})" for f in forms]
        rows.append([str(seed), f"{r['in-run']['student']:.2%}", *cells])
    header = ["seed", "in-run student", *(f"imported from its {f} (pts vs in-run, 95% CI)" for f in forms)]
    return "\n".join([table(header, rows), "",
                      f"Test accuracy of the distilled student on the digits test split (360 images), "
                      f"Ray Train with {workers} DDP workers (0: in this process), one run each.",
                      machine_lines(info)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="3 epochs per model (a smoke test, not a result)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    quick = ["teacher.train.epochs=3", "student.train.epochs=3"] if args.quick else []
    with tempfile.TemporaryDirectory(prefix="imported-") as storage:
        per_seed = [run_seed(Path(storage), seed, [f"ray.workers={args.workers}", *quick])
                    for seed in args.seeds]
    info = machine(f"{1 if args.workers else torch.get_num_threads()} per worker")
    figures = {"machine": info, "seeds": args.seeds, "workers": args.workers, "per_seed": per_seed}
    publish("imported", report(per_seed, args.seeds, info, args.workers), figures, args.quick)


if __name__ == "__main__":
    sys.exit(main())
