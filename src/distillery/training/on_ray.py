"""Training on Ray Train: a TorchTrainer around the loop of `training.loop`.

Driver side, `fit_on_ray` hands the training shards to Ray Data (`read_shards`), starts one
worker per `ray.workers`, and returns the trained model's full state dict read from the last
registered checkpoint. Worker side, `train_worker` validates its `TrainJob` and runs
`run_epochs` with what Ray adds: its dataset shard, a parallelism strategy (`parallel`),
and a checkpoint per epoch (`checkpoint`) through which a restarted worker group resumes.
"""

from __future__ import annotations

import math
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data
import ray.train
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from distillery import artifacts, data
from distillery.compat.logs import quiet_ray_train_logs
from distillery.config import PipelineConfig, from_dict
from distillery.core import console
from distillery.core.errors import TrainingFailed
from distillery.models.architectures import build_model
from distillery.models.sparsity import GradualSparsity
from distillery.run import storage
from distillery.run.cluster import ensure_ray
from distillery.run.rundir import RunDir
from distillery.training import checkpoint
from distillery.training.epoch_feed import EpochFeed, epochs_and_failures, following, one_line
from distillery.training.job import TrainJob
from distillery.training.loop import (
    batches,
    make_optimizer,
    make_scheduler,
    random_shift,
    run_epochs,
    seed_everything,
    with_autocast,
)
from distillery.training.losses import pack_target
from distillery.training.objective import TargetFn, frozen_teacher, objective
from distillery.training.parallel import Strategy, make_strategy

# ---------------------------------------------------------------- driver


def fit_on_ray(job: TrainJob, cfg: PipelineConfig, run: RunDir, *, name: str,
               on_epoch: Callable[[dict], None] = lambda m: None
               ) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Train `job` with Ray Train on the data of `run`; return (full model state_dict,
    per-epoch history); `on_epoch` gets each epoch's metrics in this process as the workers
    report them. `job` names the folders its workers read relative to the run.

    Re-running with the same `run`/`name` resumes from the last registered checkpoint.
    """
    ensure_ray(cfg)  # with Ray Train's fast reports switched on
    # Only the training split streams through Ray Data (`read_shards`); the small val split is
    # read once per worker from the same verified shards (re-executing a dataset each epoch
    # cost seconds). At a URI the read tasks check each shard: none is read here.
    train_files = job.train_files or run_rels(run, data.shard_paths(run.root / job.train_split_dir, "train",
                                                                    verify=not run.remote))
    train = read_shards(run, train_files)
    folders = [f for f in (job.teacher_dir, job.init_dir) if f]
    feed = Path(tempfile.mkdtemp(prefix="distillery-epochs-")) / "epochs.jsonl"
    job = job.model_copy(update={"run": run.location, "run_files": worker_files(run, folders)})
    make_trainer = lambda: TorchTrainer(  # noqa: E731 - a fresh one for each start
        train_worker,
        train_loop_config={"job": job.to_worker(), "pipeline": cfg.to_dict()},
        scaling_config=ScalingConfig(num_workers=cfg.ray.workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker={"CPU": cfg.ray.cpus_per_worker},
                                     placement_strategy=cfg.ray.placement_strategy),
        run_config=_run_config(cfg, run, name, feed),
        datasets={"train": train},
        # Pipeline stages must all see the same batches, so they read the whole split in a
        # fixed order; data-parallel workers each read their own shard.
        dataset_config=DataConfig(datasets_to_split=["train"] if job.train.parallelism != "pipeline" else [],
                                  execution_options=ray.data.ExecutionOptions(preserve_order=True)),
    )
    restarts: dict[int, dict] = {}  # epoch -> the worker failures the run resumed after
    try:
        with following(feed, epochs_and_failures(job.which, cfg.ray.max_failures, on_epoch, restarts)):
            result = fit_again_after_controller_errors(make_trainer, cfg.ray.max_failures, job.which)
    except ray.train.WorkerGroupError as e:
        raise TrainingFailed(f"{name}: {_first_failure(e)} (the worker group was restarted "
                             f"{cfg.ray.max_failures} time(s), `ray.max_failures`, and failed every time); "
                             f"re-run the same command to resume from the last checkpoint") from e
    assert result.checkpoint is not None and result.best_checkpoints is not None  # one every epoch
    with result.checkpoint.as_directory() as folder:
        checkpoint.verify(Path(folder), cfg.ray.workers)
        state = checkpoint.merged_model_state(Path(folder))
        history = [h | restarts.get(h["epoch"], {}) for h in checkpoint.read_history(Path(folder))]
    _drop_unregistered(run.location_of(f"ray/{name}"),
                       {Path(c.path).name for c, _ in result.best_checkpoints})
    return state, history


def fit_again_after_controller_errors(make_trainer: Callable[[], TorchTrainer], limit: int,
                                      label: str) -> ray.train.Result:
    """`make_trainer().fit()`, started again (the same run name: from the last checkpoint) when
    Ray Train gives up on an error of its own controller, up to `limit` times. Ray 2.60 retries
    only a worker group's start: on a rig whose replacement for a lost machine took 114 s to join,
    removing the lost workers' placement group timed out ("There was timeout in removing the
    placement group ... high load") and ended a run that could go on from its checkpoint."""
    failures = 0
    while True:
        try:
            return make_trainer().fit()
        except ray.train.ControllerError as e:
            failures += 1
            if failures > limit:
                raise
            console.say(f"[{label}] Ray Train's controller failed ({one_line(e)}): training starts again "
                        f"from the last checkpoint ({failures} of ray.max_failures={limit})")


def _run_config(cfg: PipelineConfig, run: RunDir, name: str, feed: Path) -> RunConfig:
    # Ray picks Train V2's RunConfig at import time, mypy sees V1's: no logging_config, V1 callbacks
    return RunConfig(name=name, **checkpoint_storage(run),  # type: ignore[call-arg]
                     callbacks=[EpochFeed(feed)],  # type: ignore[list-item]
                     failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
                     checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.checkpoints_to_keep),
                     logging_config=ray.train.LoggingConfig(log_level="WARNING"))


def read_shards(run: RunDir, rels: list[str]) -> ray.data.Dataset:
    """The run's Parquet files `rels` as a dataset, one block per file, in order: workers see
    the same rows in the same order every run.

    A run in a folder (one machine, or a filesystem every node mounts): read here and put in
    the object store as they are (`from_blocks`: no task at all); they live on this node and
    survive the loss of any worker node. A run at a URI (a cluster): streamed, each file read
    from the bucket by a task and checked against the sha256 the manifest recorded, so the
    split need not fit this node's memory or object store, nor cross its network link; Ray
    Data keeps only a window of blocks in flight and reads them again each epoch. The read
    tasks reserve no CPU: Ray Data's own readers (`read_parquet`, `from_arrow`) each need a
    whole free CPU, which a cluster whose CPUs training workers and Serve replicas hold may
    not have (the stage waited forever on a three-node test cluster), and a read is I/O. They
    run on the other machines where there are any (`_away_from_the_driver`)."""
    if not run.remote:
        return ray.data.from_blocks([pq.read_table(run.root / rel) for rel in rels])
    recorded = run.manifest()["files"]
    files = [{"rel": rel, "sha256": recorded[rel]} for rel in rels]
    return ray.data.from_items(files, override_num_blocks=len(files)).map_batches(
        storage.read_verified_tables,  # type: ignore[arg-type]  # fn_kwargs gives it `location`
        fn_kwargs={"location": run.location}, batch_size=1, batch_format="pyarrow", num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=STREAMING_READS), **_away_from_the_driver())


def _away_from_the_driver() -> dict[str, Any]:
    """Task options that keep a task off the driver's machine (a CPU-less head, on a cluster),
    falling back to it where no other machine is up. A task that reserves no CPU may otherwise
    run there: on the rig a third of the read tasks did, and their blocks then crossed the
    head's link to the workers, through its object store."""
    here = ray.get_runtime_context().get_node_id()
    return {"label_selector": {NODE_ID_LABEL: f"!{here}"},
            "fallback_strategy": [{"label_selector": {NODE_ID_LABEL: here}}]}


NODE_ID_LABEL = "ray.io/node-id"  # a label Ray gives every node (its documented default labels)
STREAMING_READS = 4  # files read at once, across the cluster: each task holds one in memory


def run_rels(run: RunDir, paths: list[Path]) -> list[str]:
    return [str(p.relative_to(run.root)) for p in paths]


def worker_files(run: RunDir, folders: list[str]) -> dict[str, str]:
    """{path: sha256} of what every worker reads itself: the val split, and the run-relative
    `folders` (the teacher, the weights to start from). A run at a URI gets them uploaded
    first, for workers on any node."""
    val = data.shard_paths(run.root / "data", "val", verify=False)
    files = [f for folder in folders for f in sorted((run.root / folder).iterdir()) if f.is_file()]
    return run.share(["data/manifest.json", *run_rels(run, val), *run_rels(run, files)])


def checkpoint_storage(run: RunDir, rel: str = "ray") -> dict[str, Any]:
    """Ray Train's (or Tune's) storage_path, and filesystem for a URI: the run's `rel` folder."""
    if not run.remote:
        return {"storage_path": str(run.root.resolve() / rel)}
    fs, path = storage.filesystem(run.location_of(rel))
    return {"storage_path": path, "storage_filesystem": fs}


def _first_failure(e: ray.train.WorkerGroupError) -> str:
    """The first worker's error as one line: its exception type and message, not the traceback."""
    return one_line(next(iter(e.worker_failures.values()), e))


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
    """One Ray Train worker: `run_epochs` over this worker's shard, checkpointed every epoch."""
    quiet_ray_train_logs()  # again: Ray Train configures its loggers after the process setup hook ran
    job = TrainJob.model_validate(config["job"])  # typed at the boundary: a bad job fails here
    cfg = from_dict(config["pipeline"], source="train_loop_config")
    root = storage.fetch(job.run, job.run_files)  # a run at a URI: this node's copy
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))  # 1 thread per core: no oversubscription
    device = ray.train.torch.get_device()
    strategy = make_strategy(job.train.parallelism, rank=rank, world_size=world,
                             microbatches=job.train.microbatches)
    seed_everything(cfg.seed)  # identical initial weights on every rank
    plain = _initial_model(root, job)
    sparsity = GradualSparsity(plain, job.prune, job.train.epochs) if job.prune else None
    teacher = (frozen_teacher(root / job.teacher_dir, device) if job.teacher_dir and not job.train_files
               else None)
    goal = objective(plain, job.train, cfg.distill, teacher=teacher, cached_logits=bool(job.train_files),
                     hints=job.hints, image_shape=job.image_shape, num_classes=job.spec["num_classes"])
    model = strategy.wrap(goal.model.to(device), job.spec)

    split = job.train.parallelism != "pipeline"
    # same global batch as 1 worker
    batch = math.ceil(job.train.batch_size / world) if split else job.train.batch_size
    rows = math.ceil(job.train_rows / world) if split else job.train_rows
    opt = make_optimizer(model, job.train)
    sched = make_scheduler(opt, job.train, math.ceil(rows / batch))
    first, history = _resume(strategy, model, opt, sched, rank, world)
    if sparsity is not None:  # DDP shares `plain`'s parameters: masking them masks the replica
        opt.register_step_post_hook(sparsity.after_step)
    val = data.load_split(root / "data", "val")
    step = with_autocast(lambda x, target: strategy.train_step(model, x, target, goal.loss_fn, opt), device,
                         job.train.bf16)

    def epoch_batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        seed = zlib.crc32(f"{cfg.seed}/{epoch}/{rank if split else 0}".encode())
        return _train_batches(job, batch, seed, goal.make_target, device, check_same=not split)

    def score(epoch: int, stats: dict[str, float]) -> dict[str, Any]:
        start = time.perf_counter()
        scores = _validate(strategy, model, val, device)
        metrics = _epoch_metrics(epoch, stats, scores, stats["seconds"] + time.perf_counter() - start, world,
                                 split)
        if epoch == first and history:
            metrics["resumed_from"] = first - 1  # evidence of a restart, kept in the history
        return metrics

    def finish(metrics: dict[str, Any]) -> None:
        _report(metrics, strategy, model, opt, sched, rank, world, history)

    run_epochs(model, step, sched, range(first, job.train.epochs + 1), epoch_batches, score, history=history,
               on_epoch_start=sparsity.start_epoch if sparsity else lambda epoch: None, on_epoch=finish)


def _initial_model(root: Path, job: TrainJob) -> torch.nn.Module:
    """A fresh model from the spec, or a saved (pruned) model to fine-tune."""
    if not job.init_dir:
        return build_model(job.spec)

    return artifacts.load(root / job.init_dir)[0].train()


def _resume(strategy: Strategy, model, opt, sched, rank: int, world: int) -> tuple[int, list[dict]]:
    """(first epoch to run, history so far), from Ray's latest registered checkpoint if any."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 1, []
    with ckpt.as_directory() as folder:
        state, history = checkpoint.restore(Path(folder), rank=rank, world_size=world, strategy=strategy,
                                            model=model, opt=opt)
    sched.load_state_dict(state["scheduler"])
    return state["epoch"] + 1, history


def _train_batches(job: TrainJob, batch_size: int, seed: int, make_target: TargetFn,
                   device: torch.device, check_same: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This worker's shard as (x [B, C, H, W], target) batches, shuffled and augmented per epoch."""
    gen = torch.Generator().manual_seed(seed)
    shard = ray.train.get_dataset_shard("train")
    for table in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow",
                                    local_shuffle_buffer_size=4 * batch_size, local_shuffle_seed=seed):
        x, y = data.decode_batch(table, job.image_shape)
        if check_same:
            _check_same_batch(y)
        if "teacher_logits" in table.column_names:  # cached: the logits of these exact images
            yield x.to(device), pack_target(y, _logits(table)).to(device)
            continue
        if job.train.augment:
            x = random_shift(x, gen, flip=job.flip)
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


def _epoch_metrics(epoch: int, stats: dict, val: dict, wall: float, world: int,
                   split: bool) -> dict[str, Any]:
    """Gather per-worker throughput and the mean training loss to every rank."""
    has_loss = not math.isnan(stats["loss"])
    mine = torch.tensor([stats["samples_per_s"], stats["samples"], stats["loss"] if has_loss else 0.0,
                         float(has_loss)], dtype=torch.float64)
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    per_worker = [round(t[0].item(), 1) for t in every]
    samples = sum(t[1].item() for t in every) if split else every[0][1].item()
    losses = [t[2].item() for t in every if t[3] > 0]
    return {"epoch": epoch, "loss": sum(losses) / max(len(losses), 1), **val, "samples": int(samples),
            "samples_per_s": round(samples / max(wall, 1e-9), 1), "samples_per_s_per_worker": per_worker,
            "epoch_seconds": round(wall, 3)}


def _report(metrics: dict, strategy: Strategy, model, opt, sched, rank: int, world: int,
            history: list[dict]) -> None:
    """Every rank writes its share of the checkpoint; Ray merges and registers it."""
    with tempfile.TemporaryDirectory() as folder:
        checkpoint.write(Path(folder), rank=rank, world_size=world, epoch=metrics["epoch"],
                         strategy=strategy, model=model, opt=opt,
                         trainer_state={"scheduler": sched.state_dict()}, history=history)
        scalar = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        ray.train.report(scalar, checkpoint=Checkpoint.from_directory(folder))
