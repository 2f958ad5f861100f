"""The base of every config model: unknown keys are errors (``extra="forbid"``), instances are immutable."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
