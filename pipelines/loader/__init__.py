"""Resolve SVD weights from a local directory, the Hugging Face Hub or S3, and load them.

Three sources, one :class:`ModelSpec`:

* a local directory in diffusers' ``save_pretrained`` layout (it must hold ``model_index.json``);
* a Hugging Face repo id (default :data:`DEFAULT_MODEL_ID`), fetched with
  ``huggingface_hub.snapshot_download`` restricted to the files the pipeline needs: the component
  configs plus one weight set per component, the ``fp16`` variant when it is wanted and present;
* ``s3://bucket/prefix``, mirrored with boto3 into a local cache directory and kept current with a
  manifest of (key, size, ETag), so that a restart with an unchanged bucket downloads nothing.

:func:`load_components` loads only the named sub-models (each serving stage runs in its own
process and needs only some of them); :func:`load_pipeline` loads them all into a
``StableVideoDiffusionPipeline``. Every failure a caller can act on is a one-line
:class:`~pipelines.errors.ModelLoadError`; messages never include a token or an AWS key.

This module is the public API; the work is split by concern:

* :mod:`~pipelines.loader.spec`: :class:`ModelSpec`, constants, source kind, device and dtype;
* :mod:`~pipelines.loader.layout`: the save_pretrained layout and the choice of weight files;
* :mod:`~pipelines.loader.local`: loading one component with the library allowlist;
* :mod:`~pipelines.loader.hub`: the Hugging Face download and its cache fallback;
* :mod:`~pipelines.loader.s3`: the S3 mirror (listing, download, manifest, lock).

Heavy libraries (torch, diffusers, transformers, boto3) are imported lazily so that resolving a
Hub or S3 source stays cheap in processes that never load weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.errors import ModelLoadError
from pipelines.loader.hub import _download_from_hub
from pipelines.loader.hub import _select_hub_files  # noqa: F401 - imported from here by the tests
from pipelines.loader.layout import _check_local_dir, _index_components, _read_model_index
from pipelines.loader.layout import _component_filter  # noqa: F401 - imported from here by the tests
from pipelines.loader.local import _load_component
from pipelines.loader.s3 import S3SyncResult, sync_s3
from pipelines.loader.fingerprint import component_fingerprint, file_fingerprint
from pipelines.loader.shared import SharedComponents, load_components_shared
from pipelines.loader.unet_checkpoint import load_unet_checkpoint, write_unet_checkpoint
from pipelines.loader.spec import (
    CACHE_DIR_ENV,
    DEFAULT_CACHE_DIR,
    DEFAULT_MODEL_ID,
    DEFAULT_TEXT_TO_IMAGE_MODEL_ID,
    PIPELINE_COMPONENTS,
    ModelSpec,
    _one_line,
    _runtime_device_dtype,
    _source_kind,
)

__all__ = [
    "CACHE_DIR_ENV",
    "DEFAULT_CACHE_DIR",
    "DEFAULT_MODEL_ID",
    "DEFAULT_TEXT_TO_IMAGE_MODEL_ID",
    "PIPELINE_COMPONENTS",
    "ModelSpec",
    "S3SyncResult",
    "SharedComponents",
    "component_fingerprint",
    "file_fingerprint",
    "load_components_shared",
    "load_unet_checkpoint",
    "write_unet_checkpoint",
    "load_components",
    "load_stage_components",
    "load_pipeline",
    "read_pipeline_file",
    "resolve_model_dir",
    "sync_s3",
]

def resolve_model_dir(
    spec: ModelSpec, *, token: str | None = None, components: Sequence[str] | None = None
) -> Path:
    """Return a local directory in save_pretrained layout for ``spec``, downloading if needed.

    A local directory is validated and returned unchanged. ``token`` (default: ``HF_TOKEN`` or the
    stored ``huggingface-cli login``) is used for Hub sources only. ``components`` restricts a Hub or
    S3 download to those sub-models (plus model_index.json); None downloads all of them.
    """
    kind = _source_kind(spec.source)
    if spec.revision is not None and kind != "hf":
        raise ModelLoadError(
            f"revision is only meaningful for Hugging Face repo ids, not for {spec.source!r}"
        )
    if kind == "local":
        return _check_local_dir(Path(spec.source).expanduser())
    if kind == "s3":
        return _check_local_dir(sync_s3(spec, components=components).local_dir)
    return _check_local_dir(_download_from_hub(spec, token=token, components=components))


def read_pipeline_file(spec: ModelSpec, relative: str, *, token: str | None = None) -> str:
    """One small text file of a pipeline (``unet/config.json``) without downloading its weights:
    read from a local directory, one Hub file download (cached), or one S3 object."""
    kind = _source_kind(spec.source)
    if kind == "local":
        path = Path(spec.source).expanduser() / relative
        if not path.is_file():
            raise ModelLoadError(f"{spec.source} has no {relative}")
        return path.read_text()
    if kind == "hf":
        from huggingface_hub import hf_hub_download

        from pipelines.loader.hub import _hub_cache_dir

        try:
            return Path(hf_hub_download(spec.source, relative, revision=spec.revision, cache_dir=_hub_cache_dir(spec),
                                        token=token)).read_text()
        except Exception as err:  # noqa: BLE001 - offline, gated, missing: one line either way
            raise ModelLoadError(f"cannot read {relative} of {spec.source}: {_one_line(err)}") from err
    from pipelines import s3client
    from pipelines.loader.s3 import _endpoint_label, _parse_s3_url, _s3_client, _s3_error

    bucket, prefix = _parse_s3_url(spec.source)
    try:
        return _s3_client(spec).get_object(Bucket=bucket, Key=prefix + relative)["Body"].read().decode()
    except s3client.botocore_errors() as err:
        raise _s3_error(err, action="read", url=f"s3://{bucket}/{prefix}{relative}", endpoint=_endpoint_label(spec),
                        bucket=bucket) from err


def load_components(
    spec: ModelSpec, names: Sequence[str] = PIPELINE_COMPONENTS, *, token: str | None = None
) -> dict[str, Any]:
    """Load only the named sub-models (e.g. ``("unet", "scheduler")`` for the sampler stage).

    Torch modules are cast to the spec's dtype, moved to its device and put in eval mode with
    gradients disabled; the scheduler and feature extractor are returned as loaded.
    """
    names = (names,) if isinstance(names, str) else tuple(names)
    if not names:
        raise ModelLoadError("load_components needs at least one component name")
    if len(set(names)) != len(names):
        raise ModelLoadError(f"Duplicate component names in {list(names)}")
    device, dtype = _runtime_device_dtype(spec)
    model_dir = resolve_model_dir(spec, token=token, components=names)
    index = _read_model_index(model_dir)
    return {
        name: _load_component(model_dir, index, name, spec=spec, device=device, dtype=dtype) for name in names
    }


def load_stage_components(stage, spec: ModelSpec) -> dict[str, Any]:
    """What one registered stage (a :class:`pipelines.registry.StageSpec`) needs from ``spec``:
    its ``component_loader``'s result, or its declared components by name (none: ``{}``)."""
    loader = stage.component_loader_function()
    if loader is not None:
        return loader(spec)
    return load_components(spec, stage.components) if stage.components else {}


def load_pipeline(spec: ModelSpec, *, token: str | None = None):
    """Load the whole ``StableVideoDiffusionPipeline`` on the spec's device and dtype, in eval mode."""
    from diffusers import StableVideoDiffusionPipeline

    device, dtype = _runtime_device_dtype(spec)
    model_dir = resolve_model_dir(spec, token=token)
    index = _read_model_index(model_dir)
    class_name = index.get("_class_name")
    if class_name != StableVideoDiffusionPipeline.__name__:
        raise ModelLoadError(
            f"{spec.source} is a {class_name or 'unknown'} pipeline, not a StableVideoDiffusionPipeline"
        )
    components = {
        name: _load_component(model_dir, index, name, spec=spec, device=device, dtype=dtype)
        for name in _index_components(index)
    }
    try:
        return StableVideoDiffusionPipeline(**components)
    except TypeError as err:
        raise ModelLoadError(
            f"{model_dir}/model_index.json does not match StableVideoDiffusionPipeline: {_one_line(err)}"
        ) from err
