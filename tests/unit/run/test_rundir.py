"""The run directory's bookkeeping: which stages run again when what they depend on changes
(`pipeline.stages.fingerprints`), and what the manifest counts as done (`RunDir`)."""

import json

import pytest

from distillery.config import load_config
from distillery.core.files import sha256_file
from distillery.pipeline.stages import fingerprints
from distillery.run.rundir import RunDir

STAGES = ("data", "teacher", "teacher_logits", "transfer", "student_scratch", "student", "evaluate", "search",
          "compress", "serve", "report")


def _changed(*overrides: str) -> set[str]:
    """The stages whose fingerprint `overrides` change, against the default config."""
    before, after = fingerprints(load_config(None, [])), fingerprints(load_config(None, list(overrides)))
    assert set(before) == set(STAGES)
    return {name for name in STAGES if before[name] != after[name]}


@pytest.mark.parametrize("overrides, stages", [
    (["seed=1"], set(STAGES)),  # every stage draws from the seed
    (["data.val_fraction=0.15"], set(STAGES)),
    (["teacher.train.epochs=5"], {"teacher", "teacher_logits", "student", "evaluate", "search", "compress",
                                  "serve", "report"}),
    (["student.train.epochs=5"], {"student_scratch", "student", "evaluate", "search", "compress", "serve",
                                  "report"}),
    (["distill.temperature=2.0"], {"student", "evaluate", "search", "compress", "serve", "report"}),
    (["compress.floor_below_teacher=0.02"], {"compress", "serve", "report"}),
    (["serve.max_batch_size=32"], {"serve", "report"}),
    (["loadtest.duration_s=1.0"], {"serve", "report"}),
    (["search.budget.max_p50_ms=0.5"], {"search"}),  # the search is off: no stage that runs reads it
    (["search.enabled=true", "search.budget.max_p50_ms=0.5"], {"search", "compress", "serve", "report"}),
    (["serve.enabled=false"], {"serve", "report"}),
    (["name=other"], set()),  # where the run lives is not what it computes
    # No baseline: the students are the same; what is scored and compared changes
    (["distill.baseline=false"], {"evaluate", "compress", "serve", "report"}),
])
def test_a_change_reruns_the_stages_that_read_it_and_those_downstream(overrides, stages):
    assert _changed(*overrides) == stages


def _run(tmp_path) -> RunDir:
    return RunDir.open(load_config(None, [f"storage_path={tmp_path}", "name=r"]))


def test_a_finished_stage_is_done_until_its_fingerprint_or_a_file_changes(tmp_path):
    run = _run(tmp_path)
    out = run.root / "teacher" / "model.bin"
    out.parent.mkdir()
    out.write_bytes(b"weights")
    assert not run.is_done("teacher", "fp1")
    assert run.start("teacher", "fp1") == 1
    run.finish("teacher", "fp1", [out], {"test_accuracy": 0.9})
    assert run.is_done("teacher", "fp1")
    assert run.manifest()["files"]["teacher/model.bin"] == sha256_file(out)
    assert not run.is_done("teacher", "fp2")  # its config or an input changed
    out.write_bytes(b"tampered")
    assert not run.is_done("teacher", "fp1")  # a recorded file no longer verifies
    out.unlink()
    assert not run.is_done("teacher", "fp1")


def test_a_failed_stage_keeps_its_attempt_so_ray_train_resumes_and_a_changed_one_starts_afresh(tmp_path):
    run = _run(tmp_path)
    assert run.start("teacher", "fp1") == 1
    run.fail("teacher", "worker group failed")
    assert run.stage("teacher")["status"] == "failed"
    assert run.start("teacher", "fp1") == 1  # same attempt: its checkpoints are resumed
    assert run.start("teacher", "fp2") == 2  # another config: a new attempt from scratch
    assert run.start("teacher", "fp2", fresh=True) == 3  # --force


def test_a_stale_stage_runs_again_and_keeps_its_record(tmp_path):
    run = _run(tmp_path)
    out = run.root / "student.bin"
    out.write_bytes(b"w")
    run.start("student", "fp")
    run.finish("student", "fp", [out], {"test_accuracy": 0.8})
    run.mark_stale(["student", "never-ran"])
    record = json.loads(run.manifest_path.read_text())["stages"]["student"]
    assert record["status"] == "stale" and record["metrics"] == {"test_accuracy": 0.8}
    assert not run.is_done("student", "fp")
    assert "never-ran" not in run.manifest()["stages"]
