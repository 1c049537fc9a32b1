"""The typed pipeline config: YAML in, validated dataclass-like models out.

Pydantic (already a Ray Serve dependency) does the checking; every model forbids unknown
keys and coerces nothing (`strict`), so `epochs: "5"` or a misspelt key fails before any
work starts, with a message naming the key and what is allowed.

The package holds schemas only (the compression recipes in `compress`, the search in
`search`, where a run may live in `location`) and imports no stage: every layer reads its
own section from here without reaching up into another stage.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from distillery.config.compress import CompressConfig
from distillery.config.location import check_location
from distillery.config.search import SearchConfig
from distillery.config.sections import (  # noqa: F401 (the config's public names)
    DATA_SOURCES,
    CNNConfig,
    DataConfig,
    DistillConfig,
    HintConfig,
    LoadTestConfig,
    ModelConfig,
    RayConfig,
    ResNetConfig,
    ServeConfig,
    TorchvisionConfig,
    TrainConfig,
)
from distillery.core.errors import UserError
from distillery.core.files import atomic_write_bytes
from distillery.core.roles import TRAINED
from distillery.core.schema import Strict


class StageConfig(Strict):
    """A model to build and how to train it. `model.kind` defaults per stage."""

    model: ModelConfig
    train: TrainConfig = TrainConfig()
    import_from: str | None = Field(None, description="teacher only: use this model instead of training one: "
                                    "a model folder (arch.json + model.safetensors), a finished run's "
                                    "directory (its teacher), a .safetensors file of weights for `model` "
                                    "(e.g. kind: torchvision, name: resnet18) or a torch.export program "
                                    "(.pt2); verified, scored on this run's test split, frozen")


def _kind_default(default: ResNetConfig | CNNConfig) -> BeforeValidator:
    """A stage field's validator: its `model.kind` (and the model itself) may be left out."""

    def fill(value: Any) -> Any:
        if isinstance(value, dict):
            model = value.get("model", {})
            if isinstance(model, dict) and "kind" not in model:
                value = {**value, "model": {"kind": default.kind, **model}}
        return value

    return BeforeValidator(fill)


class PipelineConfig(Strict):
    """The whole run. One YAML file per preset in configs/."""

    name: str = Field("digits", description="run name: the run directory is storage_path/name")
    storage_path: str = Field("runs", description="a folder (shared by every node on a cluster) or an "
                                                   "s3:// or gs:// URI")
    seed: int = Field(0, ge=0, description="seeds the splits, the initial weights and the data order")
    threads: int | None = Field(None, ge=1, le=1024, description="torch threads; default: all cores")
    data: DataConfig = DataConfig()
    teacher: Annotated[StageConfig, _kind_default(ResNetConfig())] = StageConfig(model=ResNetConfig())
    # Measured on digits (3 seeds): augmentation costs this small student 2-4 points, and
    # distillation helps it most without (it regularises in augmentation's place).
    student: Annotated[StageConfig, _kind_default(CNNConfig())] = StageConfig(
        model=CNNConfig(width_mult=0.5), train=TrainConfig(epochs=40, augment=False))
    distill: DistillConfig = DistillConfig()
    compress: CompressConfig = CompressConfig()
    search: SearchConfig = SearchConfig()
    serve: ServeConfig = Field(default_factory=ServeConfig)  # its host's default is read at load time
    loadtest: LoadTestConfig = LoadTestConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _check_combinations(self) -> PipelineConfig:
        if self.distill.hints and self.student.train.parallelism != "ddp":
            raise ValueError("distill.hints need student.train.parallelism: ddp (the adapters wrap the "
                             "student, which FSDP's per-layer sharding and pipeline stages do not see whole)")
        if self.distill.hints and self.distill.cache_teacher_logits:
            raise ValueError("distill.hints need the live teacher; set distill.cache_teacher_logits: false")
        for which in ("teacher", "student"):
            stage = self.stage_for(which)
            if stage.model.kind == "torchvision" and stage.train.parallelism == "pipeline":
                raise ValueError(f"{which}.train.parallelism: pipeline cuts cnn and resnet models into "
                                 "stages; train a torchvision model with ddp or fsdp")
        if self.distill.transfer and self.distill.cache_teacher_logits:
            raise ValueError("distill.cache_teacher_logits caches the logits of the run's training split; "
                             "with distill.transfer set it to false")
        if not self.data.labeled:
            raise ValueError("data.labeled: false: the run's own data needs labels (to train and score); "
                             "give unlabeled images as distill.transfer")
        scratch = self.search.enabled and self.search.budget.as_fast_as == "student_scratch"
        if scratch and not self.distill.baseline:
            raise ValueError("search.budget.as_fast_as: student_scratch needs distill.baseline: true "
                             "(without it the run trains no student_scratch)")
        if self.student.import_from:
            raise ValueError("student.import_from: only the teacher is imported; the students are "
                             "what this run makes")
        return self

    @field_validator("storage_path")
    @classmethod
    def _folder_or_object_store(cls, v: str) -> str:
        return check_location(v)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", v):
            raise ValueError("use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return v

    def stage_for(self, which: str) -> StageConfig:
        """The model and training config of a training stage: the teacher's, or the student's
        (shared by the student alone and the distilled student)."""
        return self.teacher if which == "teacher" else self.student

    @property
    def trained(self) -> tuple[str, ...]:
        """The models this run trains (or imports), in training order: `student_scratch`
        only with `distill.baseline`."""
        return tuple(m for m in TRAINED if self.distill.baseline or m != "student_scratch")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Load a YAML preset, apply `a.b=value` overrides, validate. Errors name the key."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path}: the top level must be a mapping of keys to values")
    for item in overrides:
        _apply_override(raw, item)
    return from_dict(raw, source=str(path or "config"))


def from_dict(raw: dict[str, Any], source: str = "config") -> PipelineConfig:
    """Validate a plain dict (from YAML, JSON or a Ray worker's train_loop_config)."""
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise UserError(f"{source}: " + "; ".join(_describe(err) for err in e.errors())) from None


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. teacher.train.epochs=5")
    try:
        value = yaml.safe_load(text)  # so "5" is an int, "0.1" a float, "[1,2]" a list
    except yaml.YAMLError:
        value = text
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value):
        value = float(value)  # YAML 1.1 reads 1e-06 (no dot) as a string
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {item!r}: {part} is not a section")
        node = child
    node[leaf] = value


def _describe(err: ErrorDetails) -> str:
    loc = [str(p) for p in err["loc"] if p not in ("resnet", "cnn", "torchvision")]  # drop union tags
    key = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(err["loc"][:-1])
        return f"{key}: unknown key (allowed here: {', '.join(allowed)})"
    got = err.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{key}: {err['msg']}{shown}"


def _allowed_keys(loc: tuple) -> list[str]:
    """The keys a config section accepts, found by walking the models along `loc`."""
    model: Any = PipelineConfig
    for part in loc:
        if part == "resnet":
            model = ResNetConfig
        elif part == "cnn":
            model = CNNConfig
        elif part == "torchvision":
            model = TorchvisionConfig
        elif isinstance(part, str) and model is not None and part in getattr(model, "model_fields", {}):
            ann = model.model_fields[part].annotation
            ann = next((a for a in (ann, *typing.get_args(ann))
                        if isinstance(a, type) and issubclass(a, BaseModel)),
                       None)  # a section that may be null (`DataConfig | None`) too
            model = ann
        else:
            model = None
    return sorted(model.model_fields) if model is not None else []


def save_resolved(cfg: PipelineConfig, path: str | Path) -> None:
    atomic_write_bytes(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
