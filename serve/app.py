"""``serve.app:build_app``: the Serve application builder.

    serve run serve/serve_config.yaml            # or: serve deploy, or a KubeRay RayService

``args`` are validated by :class:`serve.config.AppConfig`; the deployments are the registered
stages (:mod:`pipelines.registry`) plus the job runner and the ingress, and their options come from
it, so the YAML, the Helm chart and ``svd-serve up`` all describe the application the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ray.serve import Application

from pipelines.registry import STAGES, TEXT_TO_IMAGE

from .config import AppConfig
from .ingress import Ingress
from .runner import JobRunner
from .stage_replica import StageReplica


def _absolute(path: str | None) -> str | None:
    # abspath, not resolve(): a Kubernetes Secret mount is a chain of symlinks whose target
    # changes on every update, so the link itself is the path that stays valid.
    return None if path is None else os.path.abspath(os.path.expanduser(path))


def localize_paths(config: AppConfig) -> AppConfig:
    """Make relative paths absolute here, in the driver: replicas run in other working directories."""
    return config.model_copy(update={
        "model": _localized_model(config.model),
        "text_to_image_model": _localized_model(config.text_to_image_model),
        "storage": config.storage.model_copy(update={"local_dir": _absolute(config.storage.local_dir)}),
        "job_store": config.job_store.model_copy(update={"sqlite_path": _absolute(config.job_store.sqlite_path)}),
        "auth": config.auth.model_copy(update={"tenants_file": _absolute(config.auth.resolved_tenants_file())}),
    })


def _localized_model(spec):
    if spec is None:
        return None
    source = spec.source
    if source.startswith((".", "~")) or Path(source).expanduser().is_dir():
        return spec.model_copy(update={"source": _absolute(source)})
    return spec


def build_app(args: dict[str, Any] | AppConfig | None = None) -> Application:
    """Bind one deployment per registered stage, the job runner and the ingress into one application."""
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args or {})
    config = localize_paths(config)
    raw = config.model_dump(mode="json")
    stages = {
        spec.name: StageReplica.options(name=spec.deployment, **config.stages.for_stage(spec).to_serve_options())
        .bind(raw, spec.name)
        for spec in config.built_stages()
    }
    runner = JobRunner.options(**config.stages.runner.to_serve_options()).bind(raw, stages)
    model_stage = stages[STAGES.model_stage().name]
    return Ingress.options(**config.stages.ingress.to_serve_options()).bind(
        raw, runner, model_stage, stages.get(TEXT_TO_IMAGE.name))
