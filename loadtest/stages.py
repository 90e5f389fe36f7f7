"""The pipeline's stages as the load test sees them, all read from :mod:`pipelines.registry`.

A job's ``timings`` hold one entry per stage (by stage name), plus ``store`` (the upload of the
clip, done by the replica of the stage that produces the final value) and ``total``. Replica
counts are sampled per Serve deployment: ``Ingress``, ``JobRunner`` and one per stage.

Functions, not constants: stage plugins may register stages after this module is imported.
"""

from __future__ import annotations

from pipelines.registry import FINAL_VALUE, STAGES, StageSpec

#: The ``timings`` key of the clip upload (not a stage: the final stage's replica does it).
STORE = "store"
#: The deployments that are not pipeline stages, in the order reports list them.
NON_STAGE_DEPLOYMENTS = ("Ingress", "JobRunner")

#: GPU share per replica of the built-in stages in the Helm chart's defaults
#: (helm/svd-serve/values.yaml, ``stages.<config_key>.ray_actor_options.num_gpus``): the
#: production figures, where the registry's own defaults suit one machine. Mirrors the chart;
#: tests/test_loadtest_report.py checks that it still does. Other stages: their registry default.
CHART_GPU_SHARE = {"text_to_image": 1.0, "image_encode": 0.25, "sampling": 1.0, "decode": 0.5, "video_encode": 0.0}


def stage_names() -> tuple[str, ...]:
    """The registered stages, in pipeline order."""
    return STAGES.names()


def timing_names() -> tuple[str, ...]:
    """The per-stage ``timings`` keys, in pipeline order: every stage, then the upload."""
    return (*STAGES.names(), STORE)


def gpu_stages() -> tuple[str, ...]:
    """The stages that load model components (and so use the GPU): those that name their components,
    and those whose ``component_loader`` decides them from the model (text-to-image)."""
    return tuple(spec.name for spec in STAGES.stages() if spec.components or spec.component_loader)


def final_stage() -> StageSpec:
    """The (last registered) stage that produces the final value: its replica stores the clip."""
    finals = [spec for spec in STAGES.stages() if spec.output == FINAL_VALUE]
    if not finals:
        raise LookupError(f"no registered stage produces {FINAL_VALUE!r}")
    return finals[-1]


def stage_of(timing: str) -> str:
    """The stage a ``timings`` key is charged to: itself, or the final stage for the upload."""
    return final_stage().name if timing == STORE else timing


def deployment_of(timing: str) -> str | None:
    """The deployment whose replicas spend a ``timings`` entry (None for an unknown stage)."""
    stage = stage_of(timing)
    return STAGES.get(stage).deployment if stage in STAGES.names() else None


def stage_deployments() -> tuple[str, ...]:
    """The stages' deployments, in pipeline order."""
    return tuple(spec.deployment for spec in STAGES.stages())


def deployment_order() -> tuple[str, ...]:
    """Every deployment of the app, in the order reports list them."""
    return (*NON_STAGE_DEPLOYMENTS, *stage_deployments())


def default_gpu_shares() -> dict[str, float]:
    """GPU share per replica of every registered stage: the chart's, else the registry default."""
    return {spec.name: CHART_GPU_SHARE.get(spec.name, spec.resources.num_gpus) for spec in STAGES.stages()}
