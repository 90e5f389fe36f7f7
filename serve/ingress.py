"""The Serve ingress deployment: mounts the FastAPI app built by ``serve.api.app.create_api``,
behind the start-up gate (``/v1`` answers 503 not_ready until the models are ready)."""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve

from .api.app import create_api
from .api.errors import HTTPErrorMetrics, export_zero_error_series
from .api.service import VideoService
from .api.startup import ReadinessGate, StartupReadiness
from .config import AppConfig
from .jobstore import make_job_store
from .lifecycle import JobLifecycle
from .metering import make_usage_ledger
from .metering.api import usage_router
from .storage import make_storage
from .telemetry import setup_tracing, timed_replica
from .tenants import TenantRegistry
from .zoo import ModelCatalog, make_model_store

MODEL_INFO_TIMEOUT_S = 10.0
#: How long an admission waits for the text-to-image model's info before going on without it.
TEXT_TO_IMAGE_INFO_TIMEOUT_S = 2.0


@serve.deployment(name="Ingress", logging_config={"encoding": "JSON"})
@serve.ingress()
@timed_replica  # svd_replica_starts_total / svd_replica_ready_seconds
class Ingress:
    def __init__(self, config: dict[str, Any], runner, model_stage, text_to_image=None) -> None:
        self.config = AppConfig.model_validate(config)
        setup_tracing(self.config.tracing)
        self.runner = runner
        self.model_stage = model_stage  # the stage whose replicas know the loaded model
        self.text_to_image = text_to_image  # None: text-to-video is off
        self._text_to_image_info: dict[str, Any] | None = None
        self._model_info: dict[str | None, dict[str, Any]] = {}
        self.tenants = TenantRegistry(self.config.auth.resolved_tenants_file())
        store = make_job_store(self.config.job_store)
        self.ledger = make_usage_ledger(self.config.job_store, retention_s=self.config.job_store.usage_retention_s)
        storage = make_storage(self.config.storage)
        self.catalog = ModelCatalog(self.config, make_model_store(self.config.job_store))
        self.lifecycle = JobLifecycle(self.config, store=store, ledger=self.ledger, tenants=self.tenants,
                                      storage=storage)
        self.service = VideoService(
            self.config,
            store=store,
            storage=storage,
            model_info=self.model_info,
            text_to_image_info=self.text_to_image_info if text_to_image is not None else None,
            catalog=self.catalog,
        )
        #: Latched on the first successful readiness check (``/readyz`` or the gate's own).
        self.readiness = StartupReadiness(self._ready)
        export_zero_error_series()

    async def model_info(self, model_id: str | None = None) -> dict[str, Any]:
        """What a model defaults to (frames), asked of a model stage replica once per model (it
        reads another model's U-Net config without loading the model)."""
        if model_id in (None, self.catalog.default_id):
            key, model_id = None, None
        else:  # per version: a changed registry entry is asked again
            key = await asyncio.to_thread(self.catalog.version_key, model_id, fresh=False)
        if key not in self._model_info:
            self._model_info[key] = await asyncio.wait_for(self.model_stage.info.remote(model_id),
                                                           MODEL_INFO_TIMEOUT_S)
        return self._model_info[key]

    async def text_to_image_info(self) -> dict[str, Any]:
        """What the text-to-image model can make (its size multiple), asked of a replica once; a
        short wait, since admission goes on without it (readiness asks first, see ``_ready``)."""
        if self._text_to_image_info is None:
            self._text_to_image_info = await asyncio.wait_for(self.text_to_image.info.remote(),
                                                              TEXT_TO_IMAGE_INFO_TIMEOUT_S)
        return self._text_to_image_info

    async def _ready(self) -> None:
        await self.model_info()
        await asyncio.wait_for(self.runner.stats.remote(), MODEL_INFO_TIMEOUT_S)
        if self.text_to_image is not None and self._text_to_image_info is None:
            try:  # learnt here while idle; readiness does not depend on it (it may scale to zero)
                await self.text_to_image_info()
            except Exception:  # noqa: BLE001
                pass

    def __serve_build_asgi_app__(self):
        app = create_api(self.service, self.tenants, ready=self.readiness.check, on_ended=self.lifecycle.ended,
                         routers=[usage_router(self.ledger, self.tenants.authenticate)])
        app.add_middleware(ReadinessGate, readiness=self.readiness)  # before any other work
        # Outermost: counts every error response, the gate's 503s included.
        app.add_middleware(HTTPErrorMetrics, authenticate=self.tenants.authenticate)
        return app
