"""A training job as the driver sends it to Ray Train workers: typed on both sides.

The driver builds a `TrainJob` (what to train, from what, on which files of the run); it
crosses the Ray boundary as a plain dict and every worker validates it back into a
`TrainJob` before it touches a model, so a wrong key or type fails there with a message,
not somewhere in the loop.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from distillery.config import TrainConfig
from distillery.config.compress import PruneUnstructured
from distillery.core.schema import Strict


class TrainJob(Strict):
    which: str = Field(description="what is trained: teacher, student_scratch, student, finetune:VARIANT")
    spec: dict[str, Any] = Field(description="the model's JSON spec (models.architectures)")
    train: TrainConfig
    image_shape: list[int]
    train_rows: int = Field(ge=1)
    flip: bool = Field(False, description="random horizontal flips (natural images only)")
    teacher_dir: str | None = Field(None, description="run-relative folder of a teacher to distill from live")
    init_dir: str | None = Field(None, description="run-relative folder of a saved model to start from")
    hints: bool = Field(True, description="use distill.hints (off when fine-tuning a pruned variant)")
    prune: PruneUnstructured | None = Field(None, description="gradual unstructured pruning while training")
    train_files: list[str] | None = Field(None, description="run-relative shards with cached teacher logits")
    train_split_dir: str = Field("data", description="run-relative prepared folder whose train split is "
                                 "trained on: data, or transfer (distill.transfer)")
    run: str = Field("", description="the run's folder or URI, set by fit_on_ray")
    run_files: dict[str, str] = Field({}, description="{run-relative path: sha256} every worker fetches")

    def to_worker(self) -> dict[str, Any]:
        return self.model_dump()
