"""The Ray layer of training: a TorchTrainer around the plain loop of `training`.

Driver side, `fit_on_ray` reads the Parquet shards with Ray Data, starts one worker per
`ray.workers`, and returns the trained model's full state dict read from the last
registered checkpoint. Worker side, `train_worker` is the plain loop plus what Ray adds:
its dataset shard, a parallelism strategy (`parallel`), and a checkpoint per epoch
(`checkpoint`) through which a restarted worker group resumes.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import ray
import ray.data
import ray.train
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from distillery.training import checkpoint
from distillery import data
from distillery.serving import ingress
from distillery.run import storage
from distillery.files import load_model
from distillery.compression.prune import GradualSparsity
from distillery.compression.recipe import PruneUnstructured
from distillery.config import PipelineConfig, TrainConfig, from_dict
from distillery.errors import TrainingFailed
from distillery.training.hints import wrap_for_hints
from distillery.training.losses import LossFn, cross_entropy, distillation, pack_target
from distillery.models.architectures import build_model
from distillery.training.parallel import Strategy, make_strategy
from distillery.run.rundir import RunDir
from distillery.training.loop import (TargetFn, batches, make_optimizer, make_scheduler, progress_line, random_shift,
                                 seed_everything, train_epoch, with_autocast)

Log = Callable[[str], None]


# ---------------------------------------------------------------- driver


def cluster_address(cfg: PipelineConfig) -> str | None:
    """The cluster to join: `ray.address`, else the one a submitted job runs on; None: local."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS")


def ensure_ray(cfg: PipelineConfig) -> None:
    """Join the cluster this job runs on (or `ray.address`), else start a local instance."""
    if ray.is_initialized():
        return
    if cluster_address(cfg):
        ray.init(address=cluster_address(cfg), logging_level=logging.WARNING)
        return
    ingress.apply(cfg.serve.ingress, cfg.serve.host)  # Serve's ingress: chosen by Ray's environment
    # Logical CPUs beyond the workers' share, so Ray Data's read tasks are never starved
    # by the training workers holding every CPU (a deadlock on a 2-core machine).
    num_cpus = max(os.cpu_count() or 1, math.ceil(cfg.ray.workers * cfg.ray.cpus_per_worker)) + 2
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"worker_process_setup_hook": quiet_ray_train_logs})
    quiet = ray.data.DataContext.get_current()  # per-epoch progress bars would drown the epoch lines
    quiet.enable_progress_bars = quiet.print_on_execution_start = quiet.enable_auto_log_stats = False


def fit_on_ray(job: dict[str, Any], cfg: PipelineConfig, run: RunDir, *,
               name: str) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Train `job` with Ray Train on the data of `run`; return (full model state_dict,
    per-epoch history). `job` names the folders its workers read relative to the run.

    Re-running with the same `run`/`name` resumes from the last registered checkpoint.
    """
    # Ray Train's controller takes one report per poll of its workers (every 2 s by default)
    # and a worker's next report waits for that: on small data that wait, not training, set
    # the epoch time (2.0 s per epoch against 0.2 s of work on digits). Read by the controller
    # and its workers from this process's environment; an explicit setting wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    ensure_ray(cfg)
    tcfg = train_config(cfg, job)
    # Only the training split streams through Ray Data, read where the run lives (a folder
    # or a URI); the small val split is read once per worker from the same verified shards
    # (re-executing a dataset each epoch cost seconds).
    fs, base = storage.filesystem(run.location)
    train_files = job.get("train_files") or _rels(run, data.shard_paths(run.root / "data", "train"))
    datasets = {"train": ray.data.read_parquet([f"{base}/{rel}" for rel in train_files], filesystem=fs).materialize()}
    job = {**job, "run": run.location, "run_files": _worker_files(run, job), "data_dir": "data"}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={**job, "pipeline": cfg.to_dict()},
        scaling_config=ScalingConfig(num_workers=cfg.ray.workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
        run_config=RunConfig(name=name, **_checkpoint_storage(run),
                             failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.checkpoints_to_keep),
                             logging_config=ray.train.LoggingConfig(log_level="WARNING")),
        datasets=datasets,
        # Pipeline stages must all see the same batches, so they read the whole split in a
        # fixed order; data-parallel workers each read their own shard.
        dataset_config=DataConfig(datasets_to_split=["train"] if tcfg.parallelism != "pipeline" else [],
                                  execution_options=ray.data.ExecutionOptions(preserve_order=True)),
    )
    try:
        result = trainer.fit()
    except ray.train.WorkerGroupError as e:
        raise TrainingFailed(f"{name}: {_first_failure(e)} (the worker group was restarted "
                             f"{cfg.ray.max_failures} time(s), `ray.max_failures`, and failed every time); "
                             f"re-run the same command to resume from the last checkpoint") from e
    with result.checkpoint.as_directory() as folder:
        checkpoint.verify(Path(folder), cfg.ray.workers)
        state = checkpoint.merged_model_state(Path(folder))
        history = checkpoint.read_history(Path(folder))
    _drop_unregistered(run.location_of(f"ray/{name}"), {Path(c.path).name for c, _ in result.best_checkpoints})
    return state, history


def _rels(run: RunDir, paths: list[Path]) -> list[str]:
    return [str(p.relative_to(run.root)) for p in paths]


def _worker_files(run: RunDir, job: dict[str, Any]) -> dict[str, str]:
    """{path: sha256} of what every worker reads itself: the val split, and the teacher or the
    weights to start from. A run at a URI gets them uploaded first, for workers on any node."""
    val = data.shard_paths(run.root / "data", "val", verify=False)
    folders = [run.root / job[key] for key in ("teacher_dir", "init_dir") if job.get(key)]
    return run.share(["data/manifest.json", *_rels(run, val),
                      *_rels(run, [f for folder in folders for f in sorted(folder.iterdir()) if f.is_file()])])


def _checkpoint_storage(run: RunDir) -> dict[str, Any]:
    """Ray Train's storage_path (and filesystem, for a URI): the run's `ray/` folder."""
    if not run.remote:
        return {"storage_path": str(run.root.resolve() / "ray")}
    fs, path = storage.filesystem(run.location_of("ray"))
    return {"storage_path": path, "storage_filesystem": fs}


def _first_failure(e: "ray.train.WorkerGroupError") -> str:
    """The first worker's error as one line: its exception type and message, not the traceback."""
    failure = next(iter(e.worker_failures.values()), e)
    cause = getattr(failure, "cause", None) or failure  # a RayTaskError wraps the worker's exception
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"


class TeacherLogits:
    """Ray Data UDF: append the frozen teacher's logits to a batch of shard rows."""

    def __init__(self, run: str, files: dict[str, str], image_shape: list[int]):
        folder = storage.fetch(run, files) / "teacher"
        self.teacher, self.image_shape = _no_grad(_frozen_teacher(folder, torch.device("cpu"))), image_shape

    def __call__(self, table: pa.Table) -> pa.Table:
        x, _ = data.decode_batch(table, self.image_shape)
        logits = self.teacher(x).float().numpy()  # [N, K]
        column = pa.FixedSizeListArray.from_arrays(pa.array(logits.reshape(-1)), logits.shape[1])
        return table.append_column("teacher_logits", column)


def cache_teacher_logits(cfg: PipelineConfig, run: RunDir, image_shape: list[int]) -> list[Path]:
    """Compute the teacher's logits for the train split once, with Ray Data, into Parquet
    beside the images (`teacher_logits/`), so every student distilled from this teacher
    reuses them."""
    ensure_ray(cfg)
    fs, base = storage.filesystem(run.location)
    files = _rels(run, data.shard_paths(run.root / "data", "train"))
    reader = {"run": run.location, "files": _worker_files(run, {"teacher_dir": "teacher"}), "image_shape": image_shape}
    ds = ray.data.read_parquet([f"{base}/{rel}" for rel in files], filesystem=fs).map_batches(
        TeacherLogits, fn_constructor_kwargs=reader, batch_format="pyarrow", batch_size=1024, concurrency=1)
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


def _drop_unregistered(trial: str, registered: set[str]) -> None:
    """Delete checkpoint folders Ray left without registering them (a worker that died
    right after reporting), so they neither pile up nor get mistaken for complete."""
    fs, base = storage.filesystem(trial)
    for info in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)):
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_") \
                and info.base_name not in registered:
            fs.delete_dir(info.path)


# ---------------------------------------------------------------- worker


def train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: the plain loop of `training`, checkpointed every epoch."""
    quiet_ray_train_logs()  # again: Ray Train configures its loggers after the process setup hook ran
    root = storage.fetch(config["run"], config["run_files"])  # a run at a URI: this node's copy
    config = {**config, **{key: str(root / config[key]) for key in ("data_dir", "teacher_dir", "init_dir")
                           if config.get(key)}}
    cfg = from_dict(config["pipeline"], source="train_loop_config")  # typed at the boundary
    tcfg = train_config(cfg, config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))  # 1 thread per core: no oversubscription
    device = ray.train.torch.get_device()
    strategy = make_strategy(tcfg.parallelism, rank=rank, world_size=world, microbatches=tcfg.microbatches)
    seed_everything(cfg.seed)  # identical initial weights on every rank
    plain = _initial_model(config)
    sparsity = GradualSparsity(plain, PruneUnstructured(**config["prune"]), tcfg.epochs) if config.get("prune") else None
    model, loss_fn, make_target = _objective(cfg, config, plain, device)
    model = strategy.wrap(model.to(device), config["spec"])

    split = tcfg.parallelism != "pipeline"
    batch = math.ceil(tcfg.batch_size / world) if split else tcfg.batch_size  # same global batch as 1 worker
    rows = math.ceil(config["train_rows"] / world) if split else config["train_rows"]
    opt = make_optimizer(model, tcfg)
    sched = make_scheduler(opt, tcfg, math.ceil(rows / batch))
    first, history = _resume(strategy, model, opt, sched, rank, world)
    if sparsity is not None:  # DDP shares `plain`'s parameters: masking them masks the replica
        opt.register_step_post_hook(sparsity.after_step)
    val = data.load_split(config["data_dir"], "val")
    step = with_autocast(lambda x, target: strategy.train_step(model, x, target, loss_fn, opt), device, tcfg.bf16)

    for epoch in range(first, tcfg.epochs + 1):
        seed = zlib.crc32(f"{cfg.seed}/{epoch}/{rank if split else 0}".encode())
        batches = _train_batches(config, batch, seed, tcfg.augment, make_target, device, check_same=not split)
        start = time.perf_counter()
        if sparsity is not None:
            sparsity.start_epoch(epoch)
        stats = train_epoch(model, batches, step, sched)
        scores = _validate(strategy, model, val, device)
        metrics = _epoch_metrics(epoch, stats, scores, time.perf_counter() - start, world, split)
        if epoch == first and history:
            metrics["resumed_from"] = first - 1  # evidence of a restart, kept in the history
        history.append(metrics)
        if rank == 0:
            _say(progress_line(config["which"], tcfg.epochs, metrics))
        _report(metrics, strategy, model, opt, sched, rank, world, history)


def train_config(cfg: PipelineConfig, job: dict[str, Any]) -> TrainConfig:
    """The job's own training config (fine-tuning a variant), else its stage's."""
    return TrainConfig.model_validate(job["train"]) if job.get("train") else cfg.stage_for(job["which"]).train


def _initial_model(config: dict[str, Any]) -> torch.nn.Module:
    """A fresh model from the spec, or a saved (pruned) model to fine-tune."""
    if config.get("init_dir"):
        from distillery.compression.store import load_variant

        return load_variant(config["init_dir"])[0].train()
    return build_model(config["spec"])


def _say(line: str) -> None:
    """One line to the driver's console. Not print(): Ray Train patches print in its workers
    to log each line and also echo it, so every line would show twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def quiet_ray_train_logs() -> None:
    """Every worker process's setup hook: drop Ray Train's per-report INFO line and, without
    the dashboard's state API, the placement-group cleaner's warning every few seconds;
    both would bury the epoch lines. Other Ray Train warnings still show."""
    from ray.train.v2._internal.execution import context  # its logger is named by file path, not module

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # "dataset execution finished" for every epoch


def _objective(cfg: PipelineConfig, config: dict, model: torch.nn.Module,
               device: torch.device) -> tuple[torch.nn.Module, LossFn, TargetFn]:
    """(model to train, loss, target builder): plain, distilled from the live teacher (with
    hints, the student wrapped with its adapters), or distilled from cached logits."""
    tcfg, d = cfg.stage_for(config["which"]).train, cfg.distill
    if config.get("train_files"):  # cached logits arrive in the batches
        return model, distillation(d.temperature, d.alpha), lambda x, y: y
    if not config.get("teacher_dir"):
        return model, cross_entropy(tcfg.label_smoothing), lambda x, y: y
    teacher = _frozen_teacher(config["teacher_dir"], device)
    if d.hints and config.get("hints", True):  # fine-tuning a pruned variant: logits only
        wrapped, make_target, loss_fn = wrap_for_hints(model, teacher, d.hints, config["image_shape"],
                                                       config["spec"]["num_classes"], d.temperature, d.alpha)
        return wrapped, loss_fn, make_target
    return model, distillation(d.temperature, d.alpha), lambda x, y: pack_target(y, _no_grad(teacher)(x))


def _frozen_teacher(folder: str, device: torch.device) -> torch.nn.Module:
    """The teacher, frozen: eval mode, no gradients, never trained."""
    teacher, _ = load_model(folder)
    return teacher.to(device).eval().requires_grad_(False)


def _no_grad(fn: Callable) -> Callable:
    def call(*args):
        with torch.no_grad():
            return fn(*args)
    return call


def _resume(strategy: Strategy, model, opt, sched, rank: int, world: int) -> tuple[int, list[dict]]:
    """(first epoch to run, history so far), from Ray's latest registered checkpoint if any."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 1, []
    with ckpt.as_directory() as folder:
        state, history = checkpoint.restore(Path(folder), rank=rank, world_size=world, strategy=strategy,
                                            model=model, opt=opt)
    sched.load_state_dict(state["scheduler"])
    if rank == 0:
        _say(f"resumed from the checkpoint of epoch {state['epoch']}")
    return state["epoch"] + 1, history


def _train_batches(config: dict, batch_size: int, seed: int, augment: bool, make_target: TargetFn,
                   device: torch.device, check_same: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This worker's shard as (x [B, C, H, W], target) batches, shuffled and augmented per epoch."""
    gen = torch.Generator().manual_seed(seed)
    shard = ray.train.get_dataset_shard("train")
    for table in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow",
                                    local_shuffle_buffer_size=4 * batch_size, local_shuffle_seed=seed):
        x, y = data.decode_batch(table, config["image_shape"])
        if check_same:
            _check_same_batch(y)
        if "teacher_logits" in table.column_names:  # cached: the logits of these exact images
            yield x.to(device), pack_target(y, _logits(table)).to(device)
            continue
        if augment:
            x = random_shift(x, gen, flip=config["flip"])
        x, y = x.to(device), y.to(device)
        yield x, make_target(x, y)


def _logits(table: pa.Table) -> torch.Tensor:
    """The cached `teacher_logits` column -> float32 [N, K]."""
    column = table.column("teacher_logits").combine_chunks()
    return torch.from_numpy(column.flatten().to_numpy(zero_copy_only=False).reshape(len(table), -1).copy())


def _check_same_batch(y: torch.Tensor) -> None:
    """Pipeline stages must see identical batches: compare a checksum of the labels."""
    digest = torch.tensor([float((y * torch.arange(1, len(y) + 1)).sum()), float(len(y))])
    high, low = digest.clone(), digest.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    if not torch.equal(high, low):
        raise RuntimeError("pipeline ranks received different batches; the data order is not deterministic")


def _validate(strategy: Strategy, model, val: tuple[torch.Tensor, torch.Tensor],
              device: torch.device) -> dict[str, float]:
    """Accuracy and loss over the whole val split. Every rank runs it (FSDP's and the
    pipeline's forward are collectives); the pipeline's last stage alone has logits. Summing
    over ranks scales the counts and the samples alike, so the ratios stay exact."""
    totals = torch.zeros(3, dtype=torch.float64)  # correct, loss sum, samples
    for x, y in batches(*val, 1024):
        logits = strategy.predict(model, x.to(device))
        if logits is not None:
            logits = logits.float().cpu()
            totals += torch.tensor([(logits.argmax(1) == y).sum().item(),
                                    F.cross_entropy(logits, y, reduction="sum").item(), len(y)],
                                   dtype=torch.float64)
    dist.all_reduce(totals)
    if totals[2] == 0:
        return {}
    return {"val_accuracy": (totals[0] / totals[2]).item(), "val_loss": (totals[1] / totals[2]).item()}


def _epoch_metrics(epoch: int, stats: dict, val: dict, wall: float, world: int, split: bool) -> dict[str, Any]:
    """Gather per-worker throughput and the mean training loss to every rank."""
    has_loss = not math.isnan(stats["loss"])
    mine = torch.tensor([stats["samples_per_s"], stats["samples"], stats["loss"] if has_loss else 0.0, float(has_loss)],
                        dtype=torch.float64)
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    per_worker = [round(t[0].item(), 1) for t in every]
    samples = sum(t[1].item() for t in every) if split else every[0][1].item()
    losses = [t[2].item() for t in every if t[3] > 0]
    return {"epoch": epoch, "loss": sum(losses) / max(len(losses), 1), **val,
            "samples_per_s": round(samples / max(wall, 1e-9), 1), "samples_per_s_per_worker": per_worker,
            "epoch_seconds": round(wall, 3)}


def _report(metrics: dict, strategy: Strategy, model, opt, sched, rank: int, world: int, history: list[dict]) -> None:
    """Every rank writes its share of the checkpoint; Ray merges and registers it."""
    with tempfile.TemporaryDirectory() as folder:
        checkpoint.write(Path(folder), rank=rank, world_size=world, epoch=metrics["epoch"], strategy=strategy,
                         model=model, opt=opt, trainer_state={"scheduler": sched.state_dict()}, history=history)
        scalar = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        ray.train.report(scalar, checkpoint=Checkpoint.from_directory(folder))
