"""Compression recipes: a variant is a parent model plus a list of `model -> model` steps.

Each step is a small typed config (torchao's `quantize_(model, config)` style) with one
handler in `steps`; the variant's config is saved as `recipe.json` beside the weights it
produced, and `arch.json` there records what a fresh process re-applies to rebuild it
without pickle (`artifacts`). What can be checked without a model (sparsity below 1, step order,
parents that exist, bit widths the backend runs) is checked here, when the config loads;
layer names are checked against the parent model before any work starts (each handler's
`check`).
"""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from distillery.core.roles import RESERVED_NAMES, VARIANT_BASES
from distillery.core.schema import Strict


class StepConfig(Strict):
    """What every step declares, so the recipe rules and the stage need no list of kinds."""

    prunes: ClassVar[bool] = False  # removes weights or channels (a finetune may follow)
    quantizes: ClassVar[bool] = False  # changes the numerics: the last step, nothing builds on it
    # joins the parent with another model: the only step, nothing builds on it
    combines: ClassVar[bool] = False

    def numerics(self) -> str | None:
        """The arithmetic a quantization step leaves (int8_static, int4_weights, ...)."""
        return None


class PruneUnstructured(StepConfig):
    """Global magnitude pruning of conv/linear weights to `sparsity` (zeros stay zeros).

    Followed by `finetune`, the sparsity is reached gradually over the fine-tuning epochs
    (Zhu & Gupta 2017, cubic schedule); otherwise at once."""

    kind: Literal["prune_unstructured"] = "prune_unstructured"
    prunes: ClassVar[bool] = True
    sparsity: float = Field(gt=0.0, lt=1.0, description="fraction of prunable weights set to zero")
    exclude: list[str] = Field([], description="module names left dense, e.g. conv1")


class PruneChannels(StepConfig):
    """Dependency-aware removal of conv channels and linear units (Torch-Pruning) until the
    model needs `mac_ratio` times fewer multiply-accumulates. The classifier keeps its outputs."""

    kind: Literal["prune_channels"] = "prune_channels"
    prunes: ClassVar[bool] = True
    mac_ratio: float = Field(gt=1.0, le=100.0, description="target MACs(parent) / MACs(pruned)")
    importance: Literal["l1", "l2"] = Field("l2", description="norm of a channel group's weights")
    exclude: list[str] = Field([], description="module names whose channels are kept, e.g. conv1")
    # Measured on the digits teacher (2x fewer MACs, compiled, 1 thread): 33/67 channels ran
    # 1.3x faster than the original, 32/72 1.8x, 32/64 (round_to 16) 2.7x.
    round_to: int = Field(16, ge=1, le=1024, description="keep channel counts multiples of this: vector "
                          "kernels run whole registers (1: any count)")


class Finetune(StepConfig):
    """Train the pruned model further, distilled from the teacher, on Ray Train (DDP)."""

    kind: Literal["finetune"] = "finetune"
    epochs: int = Field(10, ge=1, le=1000, description="fine-tuning epochs")
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="peak learning rate")
    batch_size: int = Field(64, ge=1, le=65_536, description="images per optimizer step")
    distill: bool = Field(True, description="KD from the teacher (the distill section's T and alpha)")


class Int8Dynamic(StepConfig):
    """torchao's default int8 path: int8 weights, activations quantized per batch at run time
    (linear layers; convolutions stay fp32)."""

    kind: Literal["int8_dynamic"] = "int8_dynamic"
    quantizes: ClassVar[bool] = True

    def numerics(self) -> str:
        return self.kind


class Int8Static(StepConfig):
    """Whole-network int8 post-training quantization (torchao PT2E, x86 inductor quantizer),
    calibrated on a sample of the train split; quantization-aware training instead when
    post-training quantization loses more than `max_drop` validation accuracy."""

    kind: Literal["int8_static"] = "int8_static"
    quantizes: ClassVar[bool] = True
    calibration_samples: int = Field(512, ge=1, le=1_000_000, description="training images the observers "
                                     "see before convert")
    max_drop: float = Field(0.005, ge=-1.0, le=1.0,
                            description="allowed val-accuracy loss before QAT (0.005 = 0.5 point)")
    qat_epochs: int = Field(3, ge=1, le=1000, description="quantization-aware training epochs, when it runs")
    qat_lr: float = Field(1e-4, gt=0.0, le=1.0, description="its learning rate")

    def numerics(self) -> str:
        return self.kind


class WeightOnly(StepConfig):
    """Low-bit ("sub-integer") weight-only quantization of linear layers, per group of input
    weights (torchao IntxWeightOnlyConfig): int4 by default, down to int1."""

    kind: Literal["weight_only"] = "weight_only"
    quantizes: ClassVar[bool] = True
    bits: int = Field(4, description="1 to 8")
    group_size: int = Field(32, ge=1, le=65_536, description="input weights sharing one scale")

    def numerics(self) -> str:
        return f"int{self.bits}_weights"

    @field_validator("bits")
    @classmethod
    def _supported(cls, v: int) -> int:
        if not 1 <= v <= 8:
            raise ValueError(f"the torchao backend supports 1- to 8-bit weights, not {v}")
        return v


class Cascade(StepConfig):
    """A confidence cascade: the parent answers first, and the inputs it is unsure of (its
    confidence below a threshold) go on to the larger model `to`. The threshold is the lowest
    escalation rate whose validation accuracy reaches `target_accuracy` (default: `to`'s own
    validation accuracy). Served as one model: one replica holds both networks."""

    kind: Literal["cascade"] = "cascade"
    combines: ClassVar[bool] = True
    to: str = Field(description="the larger model: student, teacher or an earlier variant")
    confidence: Literal["max_prob", "margin"] = Field(
        "max_prob", description="the parent's top softmax probability, or its margin over the second")
    target_accuracy: float | None = Field(None, gt=0.0, le=1.0, description="validation accuracy to reach "
                                          "(0.99 = 99%); default: the larger model's")


Step = Annotated[
    PruneUnstructured | PruneChannels | Finetune | Int8Dynamic | Int8Static | WeightOnly | Cascade,
    Field(discriminator="kind")]


class VariantConfig(Strict):
    """One variant: `parent` (student, teacher or an earlier variant) and its steps."""

    name: str = Field(description="the variant's name: its folder under variants/ and its served model's")
    parent: str = Field("student", description="teacher, student, student_scratch, or an earlier variant")
    steps: list[Step] = Field(min_length=1, max_length=8,
                              description="applied in order, each `model -> model`")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,47}", v) or v in RESERVED_NAMES:
            raise ValueError("use 1-48 lower-case letters, digits, '_' or '-' (not student, "
                             "teacher, auto or server)")
        return v

    @model_validator(mode="after")
    def _order(self) -> VariantConfig:
        steps = self.steps
        quant = [i for i, s in enumerate(steps) if s.quantizes]
        if len(quant) > 1 or (quant and quant[0] != len(steps) - 1):
            raise ValueError("at most one quantization step, and it must be the last (a quantized "
                             "model is not pruned)")
        if any(s.kind == "finetune" and (i == 0 or not steps[i - 1].prunes) for i, s in enumerate(steps)):
            raise ValueError("finetune must follow a prune step (quantization-aware training "
                             "is int8_static's)")
        if any(s.combines for s in steps) and len(steps) > 1:
            raise ValueError("a cascade is a variant's only step (compress its members as "
                             "variants of their own)")
        return self

    def cascade_to(self) -> str | None:
        """The larger model of a cascade variant, else None."""
        return next((s.to for s in self.steps if isinstance(s, Cascade)), None)

    def numerics(self) -> str | None:
        """The arithmetic its last quantization step leaves (int8_static, int4_weights, ...);
        None when its steps do not quantize (it computes as its parent does)."""
        quantized = [s for s in self.steps if s.quantizes]
        return quantized[-1].numerics() if quantized else None

    def describe(self) -> str:
        """`parent -> step(args) -> ...`, for tables."""
        parts = [self.parent]
        for step in self.steps:
            args = ", ".join(f"{k}={v}" for k, v in step.model_dump(exclude={"kind"}).items()
                             if k in ("sparsity", "mac_ratio", "epochs", "bits"))
            args = f"to={step.to}" if isinstance(step, Cascade) else args
            parts.append(f"{step.kind}({args})" if args else step.kind)
        return " -> ".join(parts)


class BenchConfig(Strict):
    """How every variant is timed (see `measure.timing`)."""

    threads: int = Field(1, ge=1, le=1024,
                         description="torch threads while timing (1: as a Serve replica runs)")
    latency_runs: int = Field(200, ge=10, le=100_000, description="batch-1 runs for p50/p99")
    throughput_batch: int = Field(256, ge=1, le=65_536, description="batch size throughput is timed at")
    throughput_runs: int = Field(10, ge=1, le=10_000, description="timed batches for throughput")
    # `compile` is opt-in: a replica never runs a compiled graph (each new batch size would
    # recompile), so its figures are shown beside the served ones, not served, and timing it
    # cost the default run about 35 s of compiling.
    modes: list[Literal["eager", "channels_last", "compile"]] = Field(
        ["eager", "channels_last"], min_length=1,
        description="how each variant is run while timed; a replica runs the fastest servable one (compile: "
        "shown, never served)")


def _default_variants() -> list[VariantConfig]:
    tune = Finetune(epochs=10)
    return [
        VariantConfig(name="sparse50", steps=[PruneUnstructured(sparsity=0.5), tune]),
        # 16 is all conv1 has
        VariantConfig(name="slim", steps=[PruneChannels(mac_ratio=2.0, round_to=8), tune]),
        VariantConfig(name="int8-dynamic", steps=[Int8Dynamic()]),
        VariantConfig(name="int8", steps=[Int8Static()]),
        VariantConfig(name="int4-weights", steps=[WeightOnly(bits=4)]),
        VariantConfig(name="slim-int8", parent="slim", steps=[Int8Static()]),
        VariantConfig(name="teacher-int8", parent="teacher", steps=[Int8Static()]),
        # The digits student is so small (0.1M MACs) that call overhead, not arithmetic, bounds
        # its speed; channel pruning pays off on the compute-bound teacher (10M MACs).
        VariantConfig(name="teacher-slim", parent="teacher", steps=[PruneChannels(mac_ratio=2.0), tune]),
        # The student answers what it is sure of; the rest goes on to the teacher (or its slim copy).
        VariantConfig(name="cascade", steps=[Cascade(to="teacher")]),
        VariantConfig(name="cascade-slim", steps=[Cascade(to="teacher-slim")]),
    ]


class CompressConfig(Strict):
    """The variants to build and measure, and the accuracy floor for the recommendation."""

    variants: list[VariantConfig] = Field(default_factory=_default_variants, max_length=64)
    floor_below_teacher: float = Field(0.01, ge=0.0, le=1.0, description="recommend only variants within "
                                       "this validation accuracy of the teacher's (0.01 = 1 point); the test "
                                       "split only reports")
    speedup_margin: float = Field(0.05, ge=0.0, le=1.0, description="a variant counts as faster than its "
                                  "parent only by more than this fraction: timing noise on a shared machine "
                                  "is a few percent")
    bench: BenchConfig = BenchConfig()

    @model_validator(mode="after")
    def _parents(self) -> CompressConfig:
        seen: set[str] = set(VARIANT_BASES)
        for v in self.variants:
            if v.name in seen:
                raise ValueError(f"variant {v.name!r} is defined twice (or shadows a base model)")
            for role, name in (("parent", v.parent), ("cascade to", v.cascade_to() or v.parent)):
                if name not in seen:
                    raise ValueError(f"variant {v.name!r}: {role} {name!r} is not student, teacher or "
                                     "an earlier variant")
            seen.add(v.name)
        return self
