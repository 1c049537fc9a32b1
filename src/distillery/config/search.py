"""The search section of the config: what a trial may choose, how Tune stops trials early,
and the budget the chosen model must meet (see `search`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from distillery.config.compress import Finetune, Int8Static, PruneChannels, Step, VariantConfig
from distillery.core.schema import Strict


def _default_search_recipes() -> list[list]:
    # round_to 8: 16 channels is all conv1 of the narrowest student has.
    return [[], [Int8Static()], [PruneChannels(mac_ratio=1.5, round_to=8), Finetune(epochs=10)]]


class BudgetConfig(Strict):
    """What the searched model must meet, measured as a replica runs it (1 torch thread, its
    fastest serving mode, batch 1 on the validation images), and what to maximise under it."""

    max_p50_ms: float | None = Field(None, gt=0.0, le=600_000.0,
                                     description="batch-1 median latency bound (ms)")
    as_fast_as: str | None = Field("student", description="no slower at batch 1 than this model of the run "
                                   "(within compress.speedup_margin, timed beside the trials) and no more "
                                   "MACs; null: no such bound")
    min_throughput: float | None = Field(None, gt=0.0,
                                         description="images/s at compress.bench.throughput_batch")
    max_size_kib: float | None = Field(None, gt=0.0, description="bytes on disk of the weights, in KiB")
    min_accuracy: float | None = Field(None, gt=0.0, le=1.0, description="validation accuracy floor")
    maximise: Literal["accuracy", "throughput"] = Field("accuracy", description="accuracy: validation "
                                                        "accuracy; throughput: images/s")

    @field_validator("as_fast_as")
    @classmethod
    def _a_run_model(cls, v: str | None) -> str | None:
        if v is not None and v not in ("teacher", "student", "student_scratch"):
            raise ValueError("use teacher, student, student_scratch or null")
        return v


class SpaceConfig(Strict):
    """What the search chooses from, per trial (uniformly at random)."""

    width_mult: list[Annotated[float, Field(gt=0.0, le=8.0)]] = Field(
        [0.25, 0.5, 0.75, 1.0], min_length=1, description="the student's width (cnn's width_mult)")
    temperature: list[Annotated[float, Field(gt=0.0, le=100.0)]] = Field(
        [1.0, 2.0, 4.0, 8.0], min_length=1, description="distillation's T")
    alpha: list[Annotated[float, Field(ge=0.0, le=1.0)]] = Field([0.5, 0.9, 1.0], min_length=1,
                                                                 description="distillation's alpha")
    epochs: list[Annotated[int, Field(ge=1, le=10_000)]] = Field(
        [100, 200, 400, 800], min_length=1,
        description="the schedule's length (ASHA may stop a trial sooner)")
    augment: list[bool] = Field([True, False], min_length=1, description="random shifts while training")
    recipe: list[Annotated[list[Step], Field(max_length=8)]] = Field(
        default_factory=_default_search_recipes, min_length=1,
        description="compression steps after training ([]: none), e.g. [{kind: int8_static}]")

    @field_validator("recipe")
    @classmethod
    def _valid_recipes(cls, recipes: list[list]) -> list[list]:
        for steps in recipes:
            if any(step.combines for step in steps):
                raise ValueError("a cascade joins two models; the search compresses one (no cascade step)")
            if steps:
                VariantConfig(name="trial", steps=steps)  # the compress stage's rules on step order
        return recipes


class SearchConfig(Strict):
    """A Ray Tune search over distilled students and their compression, under a budget."""

    enabled: bool = Field(False, description="`distillery run`: search before compressing; the chosen model "
                          "joins the frontier as `searched` and is served")
    trials: int = Field(24, ge=1, le=10_000, description="trials Ray Tune runs")
    cpus_per_trial: float = Field(1.0, gt=0.0, le=256.0, description="CPUs each trial reserves")
    max_concurrent: int | None = Field(None, ge=1, le=10_000,
                                       description="default: as many as the CPUs allow")
    grace_percent: float = Field(15.0, gt=0.0, le=100.0, description="ASHA: no trial stops before this share "
                                 "of its epochs; rungs at this times 3, 9, ...")
    reduction_factor: float = Field(3.0, gt=1.0, le=100.0,
                                    description="ASHA: the top 1/this of trials at a rung go on")
    reports: int = Field(20, ge=1, le=1000, description="validation reports per trial (what ASHA compares)")
    space: SpaceConfig = SpaceConfig()
    budget: BudgetConfig = BudgetConfig()
