"""Ray Train stages on a real local Ray instance (integration tier, ~3 minutes on 2 cores)."""

import json
import os
import subprocess
import threading
import time

import pytest

ray = pytest.importorskip("ray")

from conftest import ROOT, copy_run  # noqa: E402
from test_ray_resume import registered_epoch  # noqa: E402

from distillery import artifacts  # noqa: E402
from distillery.config import load_config  # noqa: E402
from distillery.pipeline.stages import run_stages  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def _cfg(tmp_path, *overrides):
    """The tiny preset with a teacher of 5 epochs: enough to learn (chance is 25%), and the
    same in every test, so a copy of `trained_teacher` is a finished run for each of them."""
    return load_config(ROOT / "configs" / "tiny.yaml",
                       [f"storage_path={tmp_path}", "teacher.train.epochs=5", *overrides])


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory):
    """The tiny preset's data and teacher, trained on Ray once (DDP on 2 workers, the default)
    for the tests that check it or distill from it; each test copies the run folder (a copy is
    a finished run: nothing is redone)."""
    storage = tmp_path_factory.mktemp("teacher")
    run_stages(_cfg(storage), ["data", "teacher"], log=lambda m: None)
    return storage / "tiny"


def _metrics(tmp_path, which):
    return json.loads((tmp_path / "tiny" / which / "metrics.json").read_text())


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp", "pipeline"])
def test_teacher_trains_on_two_workers(trained_teacher, tmp_path, parallelism):
    cfg = _cfg(tmp_path, f"teacher.train.parallelism={parallelism}")
    if parallelism == "ddp":  # the module's shared teacher is that run
        copy_run(trained_teacher, tmp_path)
    else:
        run_stages(cfg, ["data", "teacher"], log=lambda m: None)
    metrics = _metrics(tmp_path, "teacher")
    history = metrics["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    # Every epoch reached the driver as it ended (Ray Train's controller -> training.feed).
    log = (tmp_path / "tiny" / "logs" / "run.log").read_text()
    assert all(f"[teacher] epoch {e}/5" in log for e in range(1, 6))
    assert history[-1]["loss"] < history[0]["loss"]
    assert all(len(h["samples_per_s_per_worker"]) == 2 for h in history)
    assert metrics["parallelism"] == parallelism and metrics["workers"] == 2
    assert metrics["test_accuracy"] > 0.4  # 4 classes: chance is 0.25
    model, _ = artifacts.load(tmp_path / "tiny" / "teacher")  # the gathered full model loads
    assert sum(p.numel() for p in model.parameters()) == metrics["params"]
    trials = list((tmp_path / "tiny" / "ray").glob("teacher-*"))
    assert len(trials) == 1
    kept = [p for p in trials[0].glob("checkpoint_*") if p.is_dir()]
    assert 1 <= len(kept) <= cfg.ray.checkpoints_to_keep


@pytest.mark.parametrize("hints", [[], ["distill.hints=[{teacher_layer: stages.1, student_layer: conv2}]"]])
def test_distillation_runs_on_ray_with_a_frozen_teacher(trained_teacher, tmp_path, hints):
    copy_run(trained_teacher, tmp_path)
    cfg = _cfg(tmp_path, "student.train.epochs=3", *hints)
    lines = []
    run_stages(cfg, ["data", "teacher", "student"], log=lines.append)
    assert "[teacher] done already (outputs verified); --force redoes it" in lines
    assert any("distilled from the teacher" in line for line in lines)
    teacher_before = (tmp_path / "tiny" / "teacher" / "model.safetensors").read_bytes()
    metrics = _metrics(tmp_path, "student")
    assert len(metrics["history"]) == 3 and metrics["history"][-1]["loss"] < metrics["history"][0]["loss"]
    assert (tmp_path / "tiny" / "teacher" / "model.safetensors").read_bytes() == teacher_before


def _ray_worker_pids() -> list[int]:
    """Ray Train workers of this test's own Ray instance: descendants of this process (another
    Ray on the same machine must not lose a worker to this test)."""
    rows = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True,
                          text=True).stdout.splitlines()
    parent = {int(r.split()[0]): int(r.split()[1]) for r in rows}
    mine, new = set(), {os.getpid()}
    while new:
        mine |= new
        new = {pid for pid, ppid in parent.items() if ppid in mine} - mine
    return [int(r.split()[0]) for r in rows if "RayTrainWorker" in r and int(r.split()[0]) in mine]


def test_killed_worker_resumes_from_the_last_checkpoint(tmp_path):
    """SIGKILL a training worker once two checkpoints are registered: the group restarts and
    resumes from the last registered one instead of from scratch."""
    cfg = _cfg(tmp_path, "teacher.train.epochs=30")  # epochs take ~0.3 s here: time to catch one
    root = tmp_path / "tiny"
    killed = []  # (pid, last registered epoch when it was killed)

    def kill_after_two_checkpoints():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            registered = registered_epoch(str(root))
            if registered >= 2 and _ray_worker_pids():
                pid = _ray_worker_pids()[-1]
                subprocess.run(["kill", "-9", str(pid)])
                killed.append((pid, registered))
            time.sleep(0.1)

    watcher = threading.Thread(target=kill_after_two_checkpoints, daemon=True)
    watcher.start()
    run_stages(cfg, ["data", "teacher"], log=lambda m: None)
    watcher.join(timeout=5)
    assert killed, "no worker was killed: the run finished before two checkpoints were registered"
    history = _metrics(tmp_path, "teacher")["history"]
    assert [h["epoch"] for h in history] == list(range(1, 31))
    resumed = [h["resumed_from"] for h in history if "resumed_from" in h]
    # At most one finished epoch is redone (plus the one in flight): Ray can restart from the
    # checkpoint before the newest when a worker dies within ~2 s of reporting it.
    assert resumed and resumed[0] >= killed[0][1] - 1, (resumed, killed)
    # The stage records why it resumed: the failure Ray Train reported, with the epoch after it.
    [restart] = _metrics(tmp_path, "teacher")["restarts"]
    assert restart["epoch"] == restart["resumed_from"] + 1 and restart["worker_failures"], restart


def test_a_worker_that_always_fails_ends_the_stage_with_a_clear_error(tmp_path):
    """Every attempt fails at start-up (the model to fine-tune is damaged): after
    `ray.max_failures` restarts the stage stops with one line naming the cause, not a hang."""
    from distillery.core.errors import TrainingFailed
    from distillery.models.architectures import make_spec
    from distillery.run.rundir import RunDir
    from distillery.training.job import TrainJob
    from distillery.training.on_ray import fit_on_ray

    cfg = _cfg(tmp_path, "ray.max_failures=1")
    run_stages(cfg, ["data"], log=lambda m: None)
    broken = tmp_path / "tiny" / "variants" / "no-such-variant"
    broken.mkdir(parents=True)
    (broken / "arch.json").write_text("{}")
    manifest = json.loads((tmp_path / "tiny" / "data" / "manifest.json").read_text())
    spec = make_spec(cfg.student.model, manifest["image_shape"], manifest["num_classes"])
    job = TrainJob(which="student_scratch", spec=spec, train=cfg.student.train,
                   image_shape=manifest["image_shape"], train_rows=manifest["counts"]["train"]["total"],
                   init_dir="variants/no-such-variant")
    start = time.monotonic()
    with pytest.raises(TrainingFailed) as e:
        fit_on_ray(job, cfg, RunDir.at(cfg), name="always-fails")
    message = str(e.value)
    assert "no-such-variant" in message and "restarted 1 time(s)" in message and "\n" not in message
    assert time.monotonic() - start < 300


def test_cached_teacher_logits_are_computed_once_and_reused(trained_teacher, tmp_path):
    copy_run(trained_teacher, tmp_path)
    cfg = _cfg(tmp_path, "distill.cache_teacher_logits=true", "student.train.epochs=2")
    run_stages(cfg, ["data", "teacher", "teacher_logits", "student"], log=lambda m: None)
    root = tmp_path / "tiny"
    import pyarrow.parquet as pq
    import torch

    from distillery import data

    table = pq.read_table(sorted((root / "teacher_logits").glob("*.parquet")))
    x, _ = data.decode_batch(table, [1, 8, 8])
    teacher, _ = artifacts.load(root / "teacher")
    cached = torch.tensor(table.column("teacher_logits").to_pylist())
    assert cached.shape == (len(x), 4)
    assert torch.allclose(cached, teacher(x).detach(), atol=1e-5)
    assert len(_metrics(tmp_path, "student")["history"]) == 2
    # A second student with another temperature reuses the cache: the stage is not redone.
    lines = []
    run_stages(_cfg(tmp_path, "distill.cache_teacher_logits=true", "student.train.epochs=2",
                    "distill.temperature=2"),
               ["data", "teacher", "teacher_logits", "student"], log=lines.append)
    assert "[teacher_logits] done already (outputs verified); --force redoes it" in lines
    assert any(line.startswith("[student] running") for line in lines)


def test_workers_distil_from_an_imported_program_on_an_unlabeled_transfer_set(trained_teacher, tmp_path):
    """The teacher as a torch.export program (each worker loads the run's verified copy, nothing
    unpickled) and a transfer set without labels streamed to the workers: the soft term alone."""
    import torch
    from torch.export import Dim

    teacher, _ = artifacts.load(trained_teacher / "teacher")
    program = tmp_path / "teacher.pt2"
    torch.export.save(torch.export.export(teacher, (torch.zeros(2, 1, 8, 8),),
                                          dynamic_shapes=({0: Dim("batch")},)), str(program))
    cfg = _cfg(tmp_path, "student.train.epochs=3", f"teacher.import_from={program}",
               "distill.transfer={source: synthetic, image_shape: [1, 8, 8], num_classes: 4, "
               "num_samples: 200, labeled: false}")
    lines = []
    run_stages(cfg, ["data", "transfer", "teacher", "student"], log=lines.append)
    assert any("the soft term alone: the student never sees a label on the transfer set" in line
               for line in lines)
    root = tmp_path / "tiny"
    manifest = json.loads((root / "manifest.json").read_text())["stages"]
    # Other images than the run's 168 training ones (200 drawn afresh; none is a val/test image).
    assert manifest["transfer"]["metrics"] == {"rows": 200, "labeled": False, "left_out_held_out": 0,
                                               "seconds": manifest["transfer"]["metrics"]["seconds"]}
    assert manifest["teacher"]["metrics"]["test_accuracy"] == \
        _metrics_of(trained_teacher, "teacher")["test_accuracy"]
    history = _metrics(tmp_path, "student")["history"]
    assert len(history) == 3 and history[-1]["loss"] < history[0]["loss"]
    assert all(len(h["samples_per_s_per_worker"]) == 2 and h["samples"] == 200 for h in history)


def _metrics_of(run_dir, which):
    return json.loads((run_dir / which / "metrics.json").read_text())
