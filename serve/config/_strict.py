"""The base of every config section: unknown keys are an error (a typo never goes unnoticed)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
