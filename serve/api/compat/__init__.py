"""Compatibility adapters: the hosted APIs' shapes (fal queue, Stability v2beta, OpenAI-style
generations) as thin routers over the one job service (:class:`~serve.api.service.VideoService`).

Each adapter module exposes ``router(service, tenants, *, on_ended) -> APIRouter``; every route
admits through ``service.admit`` (same validation, limits, fair scheduling, metering, webhooks,
storage and tenant isolation as the native API) and renders failures in its API's own error shape
(``serve.api.errors.adapter_route``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Awaitable, Callable

from fastapi import APIRouter

if TYPE_CHECKING:
    from ...tenants import TenantRegistry
    from ..service import VideoService

#: Adapter modules under this package; each adds itself here with one line.
ADAPTERS: list[str] = [
    "files",
    "generations",
    "fal",
    "stability",
]


def compat_routers(service: "VideoService", tenants: "TenantRegistry", *,
                   on_ended: Callable[[str], Awaitable[None]] | None = None) -> list[APIRouter]:
    import importlib

    return [importlib.import_module(f"{__name__}.{name}").router(service, tenants, on_ended=on_ended)
            for name in ADAPTERS]
