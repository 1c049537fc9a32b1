"""The teacher's logits for every training image, computed once with Ray Data into Parquet
beside the images (`teacher_logits/`), so every student distilled from that teacher reuses
them instead of running the teacher each epoch."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import ray.data
import torch

from distillery import data
from distillery.config import PipelineConfig
from distillery.run import storage
from distillery.run.cluster import ensure_ray
from distillery.run.rundir import RunDir
from distillery.training.objective import frozen_teacher, no_grad
from distillery.training.on_ray import read_shards, run_rels, worker_files


class TeacherLogits:
    """Ray Data UDF: append the frozen teacher's logits to a batch of shard rows."""

    def __init__(self, run: str, files: dict[str, str], image_shape: list[int]):
        folder = storage.fetch(run, files) / "teacher"
        self.teacher, self.image_shape = no_grad(frozen_teacher(folder, torch.device("cpu"))), image_shape

    def __call__(self, table: pa.Table) -> pa.Table:
        x, _ = data.decode_batch(table, self.image_shape)
        logits = self.teacher(x).float().numpy()  # [N, K]
        column = pa.FixedSizeListArray.from_arrays(pa.array(logits.reshape(-1)), logits.shape[1])
        return table.append_column("teacher_logits", column)


def cache_teacher_logits(cfg: PipelineConfig, run: RunDir, image_shape: list[int]) -> list[Path]:
    """Write `teacher_logits/*.parquet` (the train shards' rows plus the teacher's logits)."""
    ensure_ray(cfg)
    fs = storage.filesystem(run.location)[0]
    files = run_rels(run, data.shard_paths(run.root / "data", "train"))
    reader = {"run": run.location, "files": worker_files(run, ["teacher"]), "image_shape": image_shape}
    # max_restarts=0: with Ray Data's default (restart the actor forever) Ray 2.60 logs an
    # error line on the driver's console, as the actor's constructor arguments live in the
    # object store and may be gone by a restart. A lost actor fails the stage instead; running
    # again resumes the run at this stage (seconds of work).
    ds = read_shards(run, files).map_batches(
        TeacherLogits, fn_constructor_kwargs=reader, batch_format="pyarrow", batch_size=1024,
        compute=ray.data.ActorPoolStrategy(size=1), max_restarts=0)
    # Written beside the final folder, then renamed: a crash leaves no half-written cache.
    out, tmp = run.root / "teacher_logits", run.root / "teacher_logits.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    if not run.remote:
        ds.write_parquet(str(tmp.resolve()))
    else:  # written where the tasks run can reach, then copied into this node's copy
        scratch = run.location_of("teacher_logits.partial")
        storage.delete(scratch)
        ds.write_parquet(storage.filesystem(scratch)[1], filesystem=fs)
        for rel in storage.list_files(scratch):
            storage.download(scratch, rel, tmp / rel)
        storage.delete(scratch)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return sorted(out.glob("*.parquet"))
