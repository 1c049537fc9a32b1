import pytest
import yaml
from conftest import ROOT

from distillery.config import PipelineConfig, load_config, save_resolved
from distillery.core.errors import UserError


@pytest.mark.parametrize("preset", ["digits", "tiny", "cifar10", "folder", "transfer"])
def test_presets_load(preset):
    cfg = load_config(ROOT / "configs" / f"{preset}.yaml")
    assert cfg.name == preset


def test_the_import_preset_imports_a_teacher_and_only_a_teacher():
    assert load_config(ROOT / "configs" / "import.yaml").teacher.import_from == "runs/digits"
    with pytest.raises(UserError, match="only the teacher is imported"):
        load_config(ROOT / "configs" / "import.yaml", ["student.import_from=runs/digits"])


def test_digits_preset_is_the_builtin_default():
    assert load_config(ROOT / "configs" / "digits.yaml") == PipelineConfig()


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["teacher.train.epochs=5", "student.model.width_mult=0.5",
                             "data.image_shape=[3,16,16]", "teacher.train.optimizer=sgd"])
    assert cfg.teacher.train.epochs == 5
    assert cfg.student.model.width_mult == 0.5
    assert cfg.data.image_shape == [3, 16, 16]
    assert cfg.teacher.train.optimizer == "sgd"
    assert cfg.teacher.model.kind == "resnet"  # untouched sections keep their defaults


@pytest.mark.parametrize("override, expected", [
    ("teacher.train.epochs=0", "teacher.train.epochs: Input should be greater than or equal to 1"),
    ("teacher.train.epocs=3",
     "teacher.train.epocs: unknown key (allowed here: augment, batch_size, bf16, epochs"),
    ("bogus=1", "bogus: unknown key (allowed here: compress, data, distill, loadtest, name"),
    ("data.source=mnist",
     "data.source: Input should be 'digits', 'cifar10', 'parquet', 'synthetic' or 'folder'"),
    ("teacher.model.width=wide", "teacher.model.width: Input should be a valid integer"),
    ("teacher.train.lr=true", "teacher.train.lr: Input should be a valid number"),
    ("teacher.train.lr=-1", "teacher.train.lr: Input should be greater than 0"),
    ("data.val_fraction=0.7", "data.val_fraction: Input should be less than 0.5"),
    ("student.model.width=4", "student.model.width: unknown key (allowed here: kind, width_mult)"),
    ("teacher.model.kind=vit", "teacher.model: Input tag 'vit'"),
    ("name=../escape", "name: Value error, use 1-64 letters"),
    ("data.image_shape=[1,8]", "data.image_shape: List should have at least 3 items"),
    ("teacher.train.epochs='5'", "teacher.train.epochs: Input should be a valid integer"),
    ("storage_path=hdfs://nn/runs", "storage_path: Value error, hdfs:// is not supported; give a folder"),
    ("storage_path=s3:///runs", "storage_path: Value error, 's3:///runs' names no bucket"),
    ("loadtest.ramp=[[5]]", "loadtest.ramp.0: List should have at least 2 items"),
    ("loadtest.ramp=[[5,-1]]", "loadtest.ramp.0.1: Input should be greater than 0"),
    ("serve.enabled=maybe", "serve.enabled: Input should be a valid boolean"),
])
def test_bad_values_name_the_key(override, expected):
    with pytest.raises(UserError) as e:
        load_config(None, [override])
    assert expected in str(e.value)


@pytest.mark.parametrize("override", ["noequals", "=5", "a..b=1"])
def test_malformed_override(override):
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        load_config(None, [override])


def test_override_into_a_scalar_is_refused():
    with pytest.raises(UserError, match="seed is not a section"):
        load_config(ROOT / "configs" / "tiny.yaml", ["seed.x=1"])


def test_file_errors(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("teacher: [unclosed")
    with pytest.raises(UserError, match="bad.yaml: not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "typo.yaml").write_text("teacher:\n  trian: {epochs: 3}\n")
    with pytest.raises(UserError, match="typo.yaml: teacher.trian: unknown key"):
        load_config(tmp_path / "typo.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["seed=7"])
    save_resolved(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["seed"] == 7
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("overrides, message", [
    (["teacher.model={kind: torchvision, name: resnet18}", "teacher.train.parallelism=pipeline"],
     "teacher.train.parallelism: pipeline cuts cnn and resnet models into stages"),
    (["distill.transfer={source: digits}", "distill.cache_teacher_logits=true"],
     "distill.cache_teacher_logits caches the logits of the run's training split"),
    (["data.labeled=false"], "the run's own data needs labels"),
    (["distill.baseline=false", "search.enabled=true", "search.budget.as_fast_as=student_scratch"],
     "as_fast_as: student_scratch needs distill.baseline: true"),
])
def test_combinations_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)


def test_a_student_is_soft_only_without_labels_or_with_an_unlabeled_transfer_set():
    assert not load_config(None, []).distill.soft_only
    assert load_config(None, ["distill.labels=false"]).distill.soft_only
    assert load_config(None, ["distill.transfer={source: digits, labeled: false}"]).distill.soft_only
    assert not load_config(None, ["distill.transfer={source: digits}"]).distill.soft_only


def test_the_transfer_preset_distils_a_standard_architecture_from_an_imported_teacher_without_labels():
    cfg = load_config(ROOT / "configs" / "transfer.yaml")
    assert cfg.teacher.import_from and cfg.teacher.model.kind == cfg.student.model.kind == "torchvision"
    assert cfg.distill.transfer.source == "folder" and cfg.distill.soft_only


def test_without_the_baseline_the_run_trains_no_student_alone():
    from distillery.pipeline.stages import stage_functions

    with_it, without = load_config(None, []), load_config(None, ["distill.baseline=false"])
    assert with_it.trained == ("teacher", "student_scratch", "student")
    assert without.trained == ("teacher", "student")
    assert "student_scratch" in stage_functions(with_it) and "student_scratch" not in stage_functions(without)
