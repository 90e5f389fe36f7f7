"""The native API and its adapters in process (``create_api`` over a real SQLite store and local
storage, no Ray), with tenants made for the test: the shared set-up of the API test modules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from serve.api.app import create_api
from serve.api.service import VideoService
from serve.config import AppConfig
from serve.jobstore import make_job_store
from serve.storage import make_storage
from serve.tenants import TenantRegistry, add_tenant
from serve.zoo import ModelCatalog, make_model_store

#: The model's own frame count as the fake model stage reports it.
MODEL_FRAMES = 14


def make_api(tmp_path: Path, *, tenants: dict[str, dict[str, Any]] | None = None, on_ended=None,
             **config: Any) -> TestClient:
    """A TestClient with ``.keys`` (tenant -> API key), ``.service`` and ``.tenants_file``. Tenants
    default to ``alice`` and ``bob``; ``config`` overrides AppConfig fields (storage and job store
    live under ``tmp_path``)."""
    settings = {"storage": {"local_dir": str(tmp_path / "outputs")},
                "job_store": {"sqlite_path": str(tmp_path / "jobs.sqlite3")},
                "max_upload_bytes": 256 * 1024, **config}
    settings["storage"] = {"local_dir": str(tmp_path / "outputs"), **settings["storage"]}
    app_config = AppConfig.model_validate(settings)
    tenants_file = tmp_path / "tenants.yaml"
    keys = {name: add_tenant(tenants_file, name, **policy)
            for name, policy in (tenants or {"alice": {}, "bob": {}}).items()}

    async def model_info(model_id=None):
        return {"num_frames": MODEL_FRAMES}

    service = VideoService(app_config, store=make_job_store(app_config.job_store),
                           storage=make_storage(app_config.storage), model_info=model_info,
                           catalog=ModelCatalog(app_config, make_model_store(app_config.job_store)))
    client = TestClient(create_api(service, TenantRegistry(tenants_file), on_ended=on_ended))
    client.keys, client.service, client.tenants_file = keys, service, tenants_file
    return client
