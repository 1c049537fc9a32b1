"""The typed pipeline config: YAML in, validated dataclass-like models out.

Pydantic (already a Ray Serve dependency) does the checking; every model forbids unknown
keys and coerces nothing (`strict`), so `epochs: "5"` or a misspelt key fails before any
work starts, with a message naming the key and what is allowed.

The package holds schemas only (the compression recipes in `compress`, the search in
`search`, where a run may live in `location`) and imports no stage: every layer reads its
own section from here without reaching up into another stage.
"""

from __future__ import annotations

import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, BeforeValidator, Field, ValidationError, field_validator, model_validator

from distillery.config.compress import CompressConfig
from distillery.config.location import check_location
from distillery.config.search import SearchConfig
from distillery.errors import UserError
from distillery.files import atomic_write_bytes
from distillery.schema import Strict

# Each has a loader registered in `data.sources` (a unit test keeps the two lists equal).
DATA_SOURCES = ("digits", "cifar10", "parquet", "synthetic", "folder")


class DataConfig(Strict):
    """Where the images come from and how they are split."""

    source: Literal[DATA_SOURCES] = "digits"
    path: str | None = Field(None, description="cifar10: folder of *.bin files; parquet: file or folder; "
                             "folder: <class>/ or <split>/<class>/ subfolders of images")
    image_column: str = "image"
    label_column: str = "label"
    image_shape: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, min_length=3, max_length=3, description="C,H,W: parquet images stored flat; synthetic shape; folder: resize to (C 1 or 3)")
    num_classes: int | None = Field(None, ge=2, le=100_000, description="synthetic only")
    num_samples: int = Field(1000, ge=10, description="synthetic only")
    val_fraction: float = Field(0.1, ge=0.0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0.0, lt=0.5, description="sources without their own test split")
    max_train_samples: int | None = Field(None, ge=10, description="subsample train (stratified), for quick runs")
    shard_rows: int = Field(50_000, ge=1, description="rows per Parquet shard")
    labeled: bool = Field(True, description="false: images only (a transfer set without labels): a labeled "
                          "source's labels are dropped; an image folder is read at any depth, folder names ignored")


class ResNetConfig(Strict):
    """The teacher: a ResNet-style CNN (basic blocks, stride-2 between stages)."""

    kind: Literal["resnet"] = "resnet"
    width: int = Field(48, ge=4, le=1024, description="channels of the first stage; doubles per stage")
    blocks: list[Annotated[int, Field(ge=1, le=16)]] = Field([2, 2], min_length=1, max_length=4)


class CNNConfig(Strict):
    """The student of the brief: conv-relu-pool twice, then two linear layers."""

    kind: Literal["cnn"] = "cnn"
    width_mult: float = Field(1.0, gt=0.0, le=8.0, description="scales 32/64 conv channels and 128 hidden units")


class TorchvisionConfig(Strict):
    """A standard architecture by name: one of torchvision's classification models, no weights."""

    kind: Literal["torchvision"] = "torchvision"
    name: str = Field("mobilenet_v3_small", min_length=1, max_length=64,
                      description="e.g. resnet18, mobilenet_v3_small, efficientnet_b0, regnet_y_400mf")


ModelConfig = Annotated[Union[ResNetConfig, CNNConfig, TorchvisionConfig], Field(discriminator="kind")]


class TrainConfig(Strict):
    """One plain-PyTorch training run: optimizer, schedule, epochs."""

    epochs: int = Field(30, ge=1, le=10_000)
    batch_size: int = Field(64, ge=1, le=65_536)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0.0, le=10.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd only")
    weight_decay: float = Field(5e-4, ge=0.0, le=1.0)
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    augment: bool = Field(True, description="random 1-pixel shifts (and flips for cifar10)")
    parallelism: Literal["ddp", "fsdp", "pipeline"] = Field(
        "ddp", description="ddp: replicas, gradients all-reduced; fsdp: parameters, gradients and optimizer "
        "state sharded (FSDP2); pipeline: the model cut into one stage per worker (GPipe micro-batches)")
    microbatches: int = Field(4, ge=1, le=1024, description="pipeline only: micro-batches per batch")
    bf16: bool = Field(False, description="bf16 autocast of the forward pass on GPU (ignored on CPU)")


class HintConfig(Strict):
    """Feature (hint) distillation between a teacher and a student layer (FitNets)."""

    teacher_layer: str = Field(description="a module name in the teacher, e.g. stages.1")
    student_layer: str = Field(description="a module name in the student, e.g. conv2")
    weight: float = Field(1.0, gt=0.0, le=100.0, description="weight of the MSE between the adapted features")


class DistillConfig(Strict):
    """Hinton et al. (2015): alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, y)."""

    temperature: float = Field(4.0, gt=0.0, le=100.0)
    alpha: float = Field(0.9, ge=0.0, le=1.0, description="weight of the soft (teacher) term")
    hints: list[HintConfig] = Field([], max_length=4)
    cache_teacher_logits: bool = Field(
        False, description="compute the teacher's logits once with Ray Data into Parquet and reuse them "
        "(the student then trains without augmentation: the logits are for the stored images)")
    labels: bool = Field(True, description="false: the student never sees a label: the soft (teacher) term "
                         "alone, whatever alpha says")
    transfer: DataConfig | None = Field(
        None, description="a transfer set: the images the student is distilled on instead of the run's training "
        "split (any source; its own val/test rows and images in the run's val/test splits are left out). With "
        "labels they must name the teacher's classes (some may be missing); with labeled: false the loss is the "
        "soft term alone")

    @property
    def soft_only(self) -> bool:
        """The student is taught by the teacher alone: no label reaches it."""
        return not self.labels or (self.transfer is not None and not self.transfer.labeled)


class RayConfig(Strict):
    """Where and how wide the Ray Train stages run."""

    address: str | None = Field(None, description="Ray cluster address; default: the job's cluster, else a local one")
    workers: int = Field(2, ge=0, le=1024, description="Ray Train workers per training stage; 0: train in this process without Ray")
    use_gpu: bool = Field(False, description="one GPU per worker, nccl, bf16 autocast")
    cpus_per_worker: float = Field(1.0, gt=0.0, le=256.0)
    max_failures: int = Field(3, ge=0, le=100, description="worker failures a stage survives (resuming from its last checkpoint)")
    checkpoints_to_keep: int = Field(2, ge=1, le=100)
    shared_filesystem: bool = Field(False, description="storage_path is a folder mounted at the same path on every "
                                    "node (NFS, EFS); otherwise a cluster of several machines needs an s3:// or "
                                    "gs:// storage_path")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="where a stage's Ray Train workers go: PACK fills a node first, SPREAD spreads them "
        "over nodes, STRICT_SPREAD puts every worker on a different node (a stage waits until that many nodes "
        "are free); Ray's placement group strategies")


class ServeConfig(Strict):
    """The Ray Serve deployment of a run's models (see `serving.deployments`)."""

    enabled: bool = Field(True, description="`distillery run`: deploy the run's models, load-test them and keep "
                          "serving at the end (false: stop after the report, nothing served)")
    host: str = Field(default_factory=lambda: os.environ.get("DISTILLERY_SERVE_HOST", "127.0.0.1"),
                      description="where Serve's listeners bind: the ingress users reach (HAProxy's "
                      "HTTP and gRPC frontends) and the internal ones (replica ports, fallback proxies), which Ray "
                      "puts on one address. Default: what this node's Ray was started with (DISTILLERY_SERVE_HOST: 0.0.0.0 "
                      "on cluster.yaml's nodes, where its firewall leaves only the ingress open to users), else "
                      "127.0.0.1. HAProxy's stats and metrics "
                      "stay on loopback (the node's DISTILLERY_HAPROXY_STATS_HOST)")
    ingress: Literal["auto", "haproxy", "proxy"] = Field(
        "auto", description="HTTP ingress of a local Ray instance: HAProxy (Ray's fast ingress; ray[serve] ships the "
        "binary on Linux), Ray Serve's Python proxy, or auto: HAProxy when found. A cluster uses what its nodes "
        "were started with (cluster.yaml)")
    proxy_location: Literal["HeadOnly", "EveryNode"] = Field(
        "HeadOnly", description="where the ingress runs: on the head node, or also on every node that "
        "holds replicas (each answers on port and grpc_port; put a load balancer in front of them). "
        "With Ray's GCS fault tolerance (the head started with an external Redis, cluster.yaml) the "
        "workers' ingresses keep answering while the head is down")
    port: int = Field(8000, ge=1, le=65_535)
    grpc_port: int | None = Field(8001, ge=1, le=65_535, description="the protocol's gRPC service "
                                  "(inference.GRPCInferenceService) on this port; null: no gRPC")
    models: list[str] | None = Field(None, description="models to serve; default: the Pareto front and the recommended one")
    auto: bool = Field(True, description="serve the adaptive model `auto`")
    auto_slo_ms: float = Field(100.0, gt=0.0, le=600_000.0, description="auto's latency objective (ms, arrival to "
                               "answer in its replica): the most accurate model that meets it at the current load")
    min_replicas: int = Field(1, ge=0, le=1000)
    max_replicas: int = Field(2, ge=1, le=1000)
    target_ongoing_requests: float = Field(2.0, gt=0.0, le=10_000.0)
    upscale_delay_s: float = Field(3.0, ge=0.0, le=3600.0)
    downscale_delay_s: float = Field(30.0, ge=0.0, le=86_400.0)
    # Beyond it Serve's router retries with backoff: one replica at concurrency 32 fell from
    # 349 to 54 requests/s with 16 here. Requests waiting inside a replica also batch better.
    max_ongoing_requests: int = Field(64, ge=1, le=100_000,
                                      description="per replica (gRPC: per model, plus max_queued_requests)")
    max_queued_requests: int = Field(64, ge=0, le=1_000_000,
                                     description="per deployment; beyond it: 503 (gRPC: UNAVAILABLE)")
    request_timeout_s: float = Field(10.0, gt=0.0, le=3600.0, description="beyond it: 408")
    max_batch_size: int = Field(64, ge=1, le=65_536, description="images per forward pass (dynamic batching)")
    batch_wait_timeout_s: float = Field(0.005, ge=0.0, le=10.0, description="the longest a batch waits for requests "
                                        "this replica is still reading; a lone request never waits")
    num_cpus: float = Field(0.5, gt=0.0, le=256.0, description="per replica (logical; the replica runs 1 torch thread)")
    max_body_bytes: int = Field(8 << 20, ge=1024, le=1 << 31)
    max_elements: int = Field(1 << 20, ge=1, le=1 << 30, description="floats per request")
    health_check_period_s: float = Field(10.0, gt=0.0, le=3600.0)
    health_check_timeout_s: float = Field(30.0, gt=0.0, le=3600.0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("WARNING", description="Serve's own logs")
    access_log: bool = Field(False, description="log every request (one line each: floods the console under load)")
    api_key_env: str | None = Field(None, description="name of an environment variable holding an API key; "
                                    "when set, every route but health needs header x-api-key")

    @model_validator(mode="after")
    def _replicas(self) -> "ServeConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self


class LoadTestConfig(Strict):
    """The load test of `distillery run` (and the defaults of `distillery loadtest`)."""

    models: list[str] | None = Field(None, description="default: every served model and auto")
    concurrency: list[Annotated[int, Field(ge=1, le=10_000)]] = Field([1, 8, 32], max_length=32,
                                                                   description="closed-loop levels; [] skips the sweep")
    duration_s: float = Field(3.0, gt=0.0, le=3600.0, description="per level")
    # Rates as multiples of one replica's capacity, measured first: a ramp one replica cannot
    # serve within the p99 target and two can, on any machine. Long enough at the end to see
    # the scale-down after serve.downscale_delay_s.
    ramp: list[Annotated[list[Annotated[float, Field(gt=0.0, le=100_000.0)]], Field(min_length=2, max_length=2)]] = Field(
        [[5.0, 0.25], [25.0, 1.4], [40.0, 0.05]], max_length=32,
        description="open-loop autoscaling ramp, run first: [seconds, load] steps, load as a multiple of the ramp "
        "model's measured one-replica capacity; [] skips it")
    adaptive: list[Annotated[list[Annotated[float, Field(gt=0.0, le=100_000.0)]], Field(min_length=2, max_length=2)]] = Field(
        [[6.0, 0.4], [12.0, 1.6], [8.0, 0.4]], max_length=32,
        description="the adaptive scenario: [seconds, load] steps, load as a multiple of the most accurate served "
        "model's measured capacity, sent to it alone, to the fastest alone and to auto; [] skips it")
    ramp_model: str | None = Field(None, description="default: the slowest served model (compute-bound, so a second "
                                   "replica adds capacity even on few cores)")
    ramp_images: int = Field(16, ge=1, le=4096, description="images per ramp request: the work of a request, not "
                             "the cost of sending it, should bound the replica")
    images: int = Field(1, ge=1, le=4096, description="images per request")
    p99_target_ms: float = Field(100.0, gt=0.0, le=600_000.0)


class StageConfig(Strict):
    """A model to build and how to train it. `model.kind` defaults per stage."""

    model: ModelConfig
    train: TrainConfig = TrainConfig()
    import_from: str | None = Field(None, description="teacher only: use this model instead of training one: a "
                                    "model folder (arch.json + model.safetensors), a finished run's directory (its "
                                    "teacher), a .safetensors file of weights for `model` (e.g. kind: torchvision, "
                                    "name: resnet18) or a torch.export program (.pt2); verified, scored on this "
                                    "run's test split, frozen")


def _stage(default: BaseModel) -> Any:
    """A stage field whose `model.kind` (and the model itself) may be left out."""

    def fill(value: Any) -> Any:
        if isinstance(value, dict):
            model = value.get("model", {})
            if isinstance(model, dict) and "kind" not in model:
                value = {**value, "model": {"kind": default.kind, **model}}
        return value

    return Annotated[StageConfig, BeforeValidator(fill)]


class PipelineConfig(Strict):
    """The whole run. One YAML file per preset in configs/."""

    name: str = Field("digits", description="run name: the run directory is storage_path/name")
    storage_path: str = Field("runs", description="a folder (shared by every node on a cluster) or an s3:// or "
                                                   "gs:// URI")
    seed: int = Field(0, ge=0)
    threads: int | None = Field(None, ge=1, le=1024, description="torch threads; default: all cores")
    data: DataConfig = DataConfig()
    teacher: _stage(ResNetConfig()) = StageConfig(model=ResNetConfig())
    # Measured on digits (3 seeds): augmentation costs this small student 2-4 points, and
    # distillation helps it most without (it regularises in augmentation's place).
    student: _stage(CNNConfig()) = StageConfig(model=CNNConfig(width_mult=0.5), train=TrainConfig(epochs=40, augment=False))
    distill: DistillConfig = DistillConfig()
    compress: CompressConfig = CompressConfig()
    search: SearchConfig = SearchConfig()
    serve: ServeConfig = Field(default_factory=ServeConfig)  # its host's default is read at load time
    loadtest: LoadTestConfig = LoadTestConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _check_combinations(self) -> "PipelineConfig":
        if self.distill.hints and self.student.train.parallelism != "ddp":
            raise ValueError("distill.hints need student.train.parallelism: ddp (the adapters wrap the "
                             "student, which FSDP's per-layer sharding and pipeline stages do not see whole)")
        if self.distill.hints and self.distill.cache_teacher_logits:
            raise ValueError("distill.hints need the live teacher; set distill.cache_teacher_logits: false")
        for which in ("teacher", "student"):
            stage = self.stage_for(which)
            if stage.model.kind == "torchvision" and stage.train.parallelism == "pipeline":
                raise ValueError(f"{which}.train.parallelism: pipeline cuts cnn and resnet models into stages; "
                                 "train a torchvision model with ddp or fsdp")
        if self.distill.transfer and self.distill.cache_teacher_logits:
            raise ValueError("distill.cache_teacher_logits caches the logits of the run's training split; with "
                             "distill.transfer set it to false")
        if not self.data.labeled:
            raise ValueError("data.labeled: false: the run's own data needs labels (to train and score); give "
                             "unlabeled images as distill.transfer")
        if self.student.import_from:
            raise ValueError("student.import_from: only the teacher is imported; the students are what this run makes")
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

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> PipelineConfig:
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


def _describe(err: dict[str, Any]) -> str:
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
            ann = next((a for a in (ann, *typing.get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)),
                       None)  # a section that may be null (`DataConfig | None`) too
            model = ann
        else:
            model = None
    return sorted(model.model_fields) if model is not None else []


def save_resolved(cfg: PipelineConfig, path: str | Path) -> None:
    atomic_write_bytes(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
