"""What every model spec has: the input shape and the class count (the rest is per kind)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from distillery.core.schema import Strict

Positive = Annotated[int, Field(ge=1)]


class Spec(Strict):
    in_shape: list[Positive] = Field(min_length=3, max_length=3)
    num_classes: int = Field(ge=2)
