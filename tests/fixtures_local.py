"""``make serve``'s local deployment (``svd-serve up``, tiny CPU model, SQLite, local storage) as a
session fixture: started once for every test that needs a real service behind real clients.

Tenants: ``alice`` and ``bob`` (ordinary, with webhook secrets) and ``limited`` (one submission per
minute, burst 1, at most 1 queued job). The config differs from the default only in the data paths
and ``url_allowlist: [127.0.0.1]``, so the tests' own webhook receivers on loopback may be called.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml


@dataclass
class LocalDeployment:
    url: str
    keys: dict[str, str]
    webhook_secrets: dict[str, str]
    data_dir: Path


@pytest.fixture(scope="session")
def local_service(tmp_path_factory, tiny_model_dir, tiny_t2i_model_dir):
    from loadtest.local import LocalService
    from serve.tenants import add_tenant, rotate_webhook_secret

    data = tmp_path_factory.mktemp("local-service")
    tenants = data / "tenants.yaml"
    keys = {name: add_tenant(tenants, name) for name in ("alice", "bob")}
    keys["limited"] = add_tenant(tenants, "limited", rate_limit_per_minute=1, burst=1, max_queued_jobs=1)
    secrets = {name: rotate_webhook_secret(tenants, name).webhook_secret for name in ("alice", "bob")}
    config = data / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"source": str(tiny_model_dir), "dtype": "fp32", "device": "cpu"},
        "text_to_image_model": {"source": str(tiny_t2i_model_dir), "dtype": "fp32", "device": "cpu"},
        "storage": {"local_dir": str(data / "outputs")},
        "job_store": {"sqlite_path": str(data / "jobs.sqlite3")},
        "auth": {"tenants_file": str(tenants)},
        "url_allowlist": ["127.0.0.1"],
    }))
    service = LocalService(data, config=config, log_path=data / "service.log")
    try:
        service.start()
        yield LocalDeployment(url=service.url, keys=keys, webhook_secrets=secrets, data_dir=data)
    finally:
        service.stop()
