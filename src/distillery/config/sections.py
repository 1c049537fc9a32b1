"""The sections of the pipeline config that configure one layer each: data, the models and
how they train, distillation, Ray, serving and the load test (`PipelineConfig` gathers them)."""

from __future__ import annotations

import os
from typing import Annotated, Literal, get_args

from pydantic import Field, model_validator

from distillery.core.schema import Strict

# Each has a loader registered in `data.sources` (a unit test keeps the two lists equal).
DataSource = Literal["digits", "cifar10", "parquet", "synthetic", "folder"]
DATA_SOURCES = get_args(DataSource)


class DataConfig(Strict):
    """Where the images come from and how they are split."""

    source: DataSource = Field("digits", description="digits (embedded, 8x8 grey), cifar10 (its "
                               "binary batches), parquet, synthetic, or folder (image files)")
    path: str | None = Field(None, description="cifar10: folder of *.bin files; parquet: file or folder; "
                             "folder: <class>/ or <split>/<class>/ subfolders of images")
    image_column: str = Field("image", description="parquet: the column of images, each a flat list of C*H*W "
                              "numbers (encoded images are refused)")
    label_column: str = Field("label", description="parquet: the column of integer labels")
    image_shape: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, min_length=3, max_length=3,
        description="C,H,W: parquet images stored flat; synthetic shape; folder: resize to (C 1 or 3)")
    num_classes: int | None = Field(None, ge=2, le=100_000, description="synthetic only")
    num_samples: int = Field(1000, ge=10, description="synthetic only")
    val_fraction: float = Field(0.1, ge=0.0, lt=0.5, description="share of all rows held out of train "
                                "(unless the source has a val split) to choose on: the floor, the "
                                "recommended model, thresholds, the search")
    test_fraction: float = Field(0.2, gt=0.0, lt=0.5, description="sources without their own test split")
    max_train_samples: int | None = Field(None, ge=10,
                                          description="subsample train (stratified), for quick runs")
    shard_rows: int = Field(50_000, ge=1, description="rows per Parquet shard")
    labeled: bool = Field(True, description="false: images only (a transfer set without labels): a "
                          "labeled source's labels are dropped; an image folder is read at any depth, "
                          "folder names ignored")


class ResNetConfig(Strict):
    """The teacher: a ResNet-style CNN (basic blocks, stride-2 between stages)."""

    kind: Literal["resnet"] = "resnet"
    width: int = Field(48, ge=4, le=1024, description="channels of the first stage; doubles per stage")
    blocks: list[Annotated[int, Field(ge=1, le=16)]] = Field([2, 2], min_length=1, max_length=4,
                                                              description="basic blocks per stage")


class CNNConfig(Strict):
    """The student of the brief: conv-relu-pool twice, then two linear layers."""

    kind: Literal["cnn"] = "cnn"
    width_mult: float = Field(1.0, gt=0.0, le=8.0,
                              description="scales 32/64 conv channels and 128 hidden units")


class TorchvisionConfig(Strict):
    """A standard architecture by name: one of torchvision's classification models, no weights."""

    kind: Literal["torchvision"] = "torchvision"
    name: str = Field("mobilenet_v3_small", min_length=1, max_length=64,
                      description="e.g. resnet18, mobilenet_v3_small, efficientnet_b0, regnet_y_400mf")


ModelConfig = Annotated[ResNetConfig | CNNConfig | TorchvisionConfig, Field(discriminator="kind")]


class TrainConfig(Strict):
    """One plain-PyTorch training run: optimizer, schedule, epochs."""

    epochs: int = Field(30, ge=1, le=10_000, description="passes over the training split")
    batch_size: int = Field(64, ge=1, le=65_536, description="images per optimizer step, over all workers")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="AdamW, or SGD with momentum")
    lr: float = Field(3e-3, gt=0.0, le=10.0, description="peak learning rate (onecycle), or the starting one")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd only")
    weight_decay: float = Field(5e-4, ge=0.0, le=1.0, description="decoupled (AdamW) or L2 (SGD)")
    schedule: Literal["onecycle", "cosine", "constant"] = Field("onecycle", description="the learning rate "
                                                                "over the epochs")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="of the hard-label cross-entropy")
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

    temperature: float = Field(4.0, gt=0.0, le=100.0, description="T: how soft the teacher's and student's "
                               "probabilities are made in the soft term")
    alpha: float = Field(0.9, ge=0.0, le=1.0, description="weight of the soft (teacher) term")
    hints: list[HintConfig] = Field([], max_length=4, description="feature distillation (FitNets) between "
                                    "named layers, besides the logits")
    cache_teacher_logits: bool = Field(
        False, description="compute the teacher's logits once with Ray Data into Parquet and reuse them "
        "(the student then trains without augmentation: the logits are for the stored images)")
    labels: bool = Field(True, description="false: the student never sees a label: the soft (teacher) term "
                         "alone, whatever alpha says")
    baseline: bool = Field(True, description="also train the student alone on the labels (student_scratch): "
                           "the baseline distillation's gain is measured against; false saves that "
                           "training run, and the run then says nothing of a gain")
    transfer: DataConfig | None = Field(
        None, description="a transfer set: the images the student is distilled on instead of the run's "
        "training split (any source; its own val/test rows and images in the run's val/test splits are left "
        "out). With labels they must name the teacher's classes (some may be missing); with labeled: false "
        "the loss is the soft term alone")

    @property
    def soft_only(self) -> bool:
        """The student is taught by the teacher alone: no label reaches it."""
        return not self.labels or (self.transfer is not None and not self.transfer.labeled)


class RayConfig(Strict):
    """Where and how wide the Ray Train stages run."""

    address: str | None = Field(None, description="Ray cluster address; default: the job's cluster, "
                                "else a local one")
    workers: int = Field(2, ge=0, le=1024, description="Ray Train workers per training stage; 0: train in "
                         "this process without Ray")
    use_gpu: bool = Field(False, description="one GPU per worker, nccl, bf16 autocast")
    cpus_per_worker: float = Field(1.0, gt=0.0, le=256.0, description="CPUs each Ray Train worker reserves "
                                   "(its torch threads)")
    max_failures: int = Field(3, ge=0, le=100, description="worker failures a stage survives (resuming from "
                              "its last checkpoint)")
    checkpoints_to_keep: int = Field(2, ge=1, le=100, description="per training run, the newest kept")
    shared_filesystem: bool = Field(False, description="storage_path is a folder mounted at the same path on "
                                    "every node (NFS, EFS); otherwise a cluster of several machines needs an "
                                    "s3:// or gs:// storage_path")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="where a stage's Ray Train workers go: PACK fills a node first, SPREAD spreads "
        "them over nodes, STRICT_SPREAD puts every worker on a different node (a stage waits until that many "
        "nodes are free); Ray's placement group strategies")


class ServeConfig(Strict):
    """The Ray Serve deployment of a run's models (see `serving.serve_apps`)."""

    enabled: bool = Field(True, description="`distillery run`: deploy the run's models, load-test them and "
                          "keep serving at the end (false: stop after the report, nothing served)")
    host: str = Field(default_factory=lambda: os.environ.get("DISTILLERY_SERVE_HOST", "127.0.0.1"),
                      description="where Serve's listeners bind: the ingress users reach (HAProxy's HTTP and "
                      "gRPC frontends) and the internal ones (replica ports, fallback proxies), which Ray "
                      "puts on one address. Default: what this node's Ray was started with "
                      "(DISTILLERY_SERVE_HOST: 0.0.0.0 on cluster.yaml's nodes, where its firewall leaves "
                      "only the ingress open to users), else 127.0.0.1. HAProxy's stats and metrics stay on "
                      "loopback (the node's DISTILLERY_HAPROXY_STATS_HOST)")
    metrics: bool = Field(
        True,
        description="count requests, batching, cascade escalations and auto's decisions in "
        "the replicas, exported by Ray's metrics agent on every node (`distillery serve` writes "
        "a prometheus.yml that scrapes them)",
    )
    request_log_sample: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="share of inference requests each logged as "
        "one JSON line in its replica's log (id, model, images, outcome, queue and "
        "forward ms): 0.01 logs 1%; the id is also the reply's x-request-id header",
    )
    ingress: Literal["auto", "haproxy", "proxy"] = Field(
        "auto", description="HTTP ingress of a local Ray instance: HAProxy (Ray's fast ingress; ray[serve] "
        "ships the binary on Linux), Ray Serve's Python proxy, or auto: HAProxy when found. A cluster uses "
        "what its nodes were started with (cluster.yaml)")
    proxy_location: Literal["HeadOnly", "EveryNode"] = Field(
        "HeadOnly", description="where the ingress runs: on the head node, or also on every node that "
        "holds replicas (each answers on port and grpc_port; put a load balancer in front of them). "
        "With Ray's GCS fault tolerance (the head started with an external Redis, cluster.yaml) the "
        "workers' ingresses keep answering while the head is down")
    port: int = Field(8000, ge=1, le=65_535, description="the ingress's HTTP port")
    grpc_port: int | None = Field(8001, ge=1, le=65_535, description="the protocol's gRPC service "
                                  "(inference.GRPCInferenceService) on this port; null: no gRPC")
    models: list[str] | None = Field(None, description="models to serve; default: the Pareto front and "
                                     "the recommended one")
    auto: bool = Field(True, description="serve the adaptive model `auto`")
    auto_slo_ms: float = Field(100.0, gt=0.0, le=600_000.0, description="auto's latency objective (ms, "
                               "arrival to answer in its replica): the most accurate model that meets it at "
                               "the current load")
    min_replicas: int = Field(1, ge=0, le=1000, description="per model: autoscaling's floor")
    max_replicas: int = Field(2, ge=1, le=1000, description="per model: autoscaling's ceiling")
    target_ongoing_requests: float = Field(2.0, gt=0.0, le=10_000.0, description="requests per replica "
                                           "autoscaling aims at")
    upscale_delay_s: float = Field(3.0, ge=0.0, le=3600.0, description="load above target this long adds "
                                   "replicas")
    downscale_delay_s: float = Field(30.0, ge=0.0, le=86_400.0, description="load below target this long "
                                     "removes replicas")
    # Beyond it Serve's router retries with backoff: one replica at concurrency 32 fell from
    # 349 to 54 requests/s with 16 here. Requests waiting inside a replica also batch better.
    max_ongoing_requests: int = Field(64, ge=1, le=100_000,
                                      description="per replica (gRPC: per model, plus max_queued_requests)")
    max_queued_requests: int = Field(64, ge=1, le=1_000_000,  # Ray refuses 0 ("-1 or a positive integer")
                                     description="per deployment; beyond it: 503 (gRPC: UNAVAILABLE)")
    request_timeout_s: float = Field(10.0, gt=0.0, le=3600.0, description="beyond it: 408")
    max_batch_size: int = Field(64, ge=1, le=65_536, description="images per forward pass (dynamic batching)")
    batch_wait_timeout_s: float = Field(0.005, ge=0.0, le=10.0, description="the longest a batch waits for "
                                        "requests this replica is still reading; a lone request never waits")
    num_cpus: float = Field(0.5, gt=0.0, le=256.0,
                            description="per replica (logical; the replica runs 1 torch thread)")
    max_body_bytes: int = Field(8 << 20, ge=1024, le=1 << 31, description="a larger request is refused (413)")
    max_elements: int = Field(1 << 20, ge=1, le=1 << 30, description="floats per request")
    health_check_period_s: float = Field(10.0, gt=0.0, le=3600.0, description="how often Serve runs each "
                                         "replica's check (a forward pass)")
    health_check_timeout_s: float = Field(30.0, gt=0.0, le=3600.0, description="a check slower than this "
                                          "marks the replica unhealthy")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("WARNING", description="Serve's own logs")
    access_log: bool = Field(False,
                             description="log every request (one line each: floods the console under load)")
    api_key_env: str | None = Field(None, description="name of an environment variable holding an API key; "
                                    "when set, every route but health needs header x-api-key")

    @model_validator(mode="after")
    def _replicas(self) -> ServeConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas "
                             f"({self.max_replicas})")
        return self


class LoadTestConfig(Strict):
    """The load test of `distillery run` (`distillery loadtest` has flags of its own, with a
    longer sweep by default: a load test on its own has the time)."""

    models: list[str] | None = Field(None, description="default: every served model and auto")
    concurrency: list[Annotated[int, Field(ge=1, le=10_000)]] = Field(
        [1, 8, 32], max_length=32, description="closed-loop levels; [] skips the sweep")
    duration_s: float = Field(3.0, gt=0.0, le=3600.0, description="per level")
    # Rates as multiples of one replica's capacity, measured first: a ramp one replica cannot
    # serve within the p99 target and two can, on any machine. Long enough at the end to see
    # the scale-down after serve.downscale_delay_s.
    ramp: list[Annotated[list[Annotated[float, Field(gt=0.0, le=100_000.0)]],
                         Field(min_length=2, max_length=2)]] = Field(
        [[5.0, 0.25], [25.0, 1.4], [40.0, 0.05]], max_length=32,
        description="open-loop autoscaling ramp, run first: [seconds, load] steps, load as a multiple of the "
        "ramp model's measured one-replica capacity; [] skips it")
    adaptive: list[Annotated[list[Annotated[float, Field(gt=0.0, le=100_000.0)]],
                             Field(min_length=2, max_length=2)]] = Field(
        [[6.0, 0.4], [12.0, 1.6], [8.0, 0.4]], max_length=32,
        description="the adaptive scenario: [seconds, load] steps, load as a multiple of the most accurate "
        "served model's measured capacity, sent to it alone, to the fastest alone and to auto; [] skips it")
    ramp_model: str | None = Field(None, description="default: the slowest served model (compute-bound, so a "
                                   "second replica adds capacity even on few cores)")
    ramp_images: int = Field(16, ge=1, le=4096, description="images per ramp request: the work of a request, "
                             "not the cost of sending it, should bound the replica")
    images: int = Field(1, ge=1, le=4096, description="images per request")
    p99_target_ms: float = Field(100.0, gt=0.0, le=600_000.0, description="the sustained rate is the highest "
                                 "with p99 within this")
