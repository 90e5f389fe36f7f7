"""The web playground served by the ingress (filled in by the playground work)."""

from __future__ import annotations

from fastapi import APIRouter


def playground_router() -> APIRouter:
    return APIRouter()
