"""What to load and how: :class:`ModelSpec`, the loader's constants, and how a spec is read.

This module holds everything that interprets a spec without touching weights: which kind of
source it names (local directory, Hub repo id, ``s3://`` URL), where its cache lives, which device
and dtype it resolves to on this machine, and whether fp16 weight files are preferred. It is the
bottom of the package: every other module imports from it and it imports from none of them.
torch is imported only when a device or dtype has to be resolved.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipelines.errors import ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "stabilityai/stable-video-diffusion-img2vid-xt-1-1"
#: Text-to-video's first frame comes from this text-to-image pipeline unless configured otherwise.
DEFAULT_TEXT_TO_IMAGE_MODEL_ID = "stabilityai/stable-diffusion-xl-base-1.0"

#: Environment variable overriding the default cache root (``~/.cache/svd-serve/models``).
CACHE_DIR_ENV = "SVD_SERVE_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/svd-serve/models"

#: Every sub-model of ``StableVideoDiffusionPipeline``; the default of :func:`load_components`.
PIPELINE_COMPONENTS = ("image_encoder", "feature_extractor", "vae", "unet", "scheduler")


class ModelSpec(BaseModel):
    """Where the SVD weights come from and how to load them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(
        DEFAULT_MODEL_ID,
        min_length=1,
        description=(
            "Hugging Face repo id ('org/name'), a local directory in diffusers' save_pretrained layout, "
            "or 's3://bucket/prefix'. An existing directory always wins over a repo id of the same name."
        ),
    )
    revision: str | None = Field(
        None,
        description="Hub branch, tag or commit to download (Hugging Face sources only); None means 'main'.",
    )
    dtype: Literal["fp32", "fp16", "bf16"] = Field(
        "fp16",
        description="Weight and compute precision. On CPU, fp16 falls back to fp32 (with a warning).",
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="'cpu', 'cuda' or 'cuda:N'; 'auto' picks cuda when a GPU is available, else cpu.",
    )
    variant: Literal["auto", "fp16", "none"] = Field(
        "auto",
        description=(
            "Which weight files to use: 'fp16' requires the fp16 variant files, 'none' the full-precision "
            "files; 'auto' prefers fp16 files when dtype is fp16/bf16 and full files otherwise, falling "
            "back to whichever exists."
        ),
    )
    cache_dir: str | None = Field(
        None,
        description=(
            f"Cache root for downloads; None means ${CACHE_DIR_ENV}, else {DEFAULT_CACHE_DIR}. "
            "S3 mirrors go under <root>/s3/<bucket>/<prefix>. Hub downloads go under <root>/huggingface "
            "when a root is set here or in the environment, else to huggingface_hub's own cache (HF_HOME)."
        ),
    )
    s3_endpoint_url: str | None = Field(
        None,
        description=(
            "S3-compatible endpoint (MinIO, Ceph, R2, ...); None means boto3's default, which honours "
            "AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL."
        ),
    )
    s3_region: str | None = Field(
        None, description="S3 region; None means boto3's default (AWS_REGION / AWS_DEFAULT_REGION / config)."
    )

    @field_validator("source")
    @classmethod
    def _strip_source(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("source must not be empty")
        return value

    @field_validator("s3_endpoint_url")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError("s3_endpoint_url must be an http:// or https:// URL")
        return value


def _source_kind(source: str) -> Literal["local", "hf", "s3"]:
    if source.startswith("s3://"):
        return "s3"
    if "://" in source:
        raise ModelLoadError(
            f"Unsupported model source {source!r}: use a directory, an s3:// URL or a Hub repo id"
        )
    # A repo id is 'name' or 'org/name'; anything that exists, is explicitly a path, or has more
    # than one slash is a directory, so a typo'd path gets "does not exist", not "repo not found".
    if Path(source).expanduser().exists() or source.startswith(("/", ".", "~")) or source.count("/") > 1:
        return "local"
    return "hf"


def _cache_root(spec: ModelSpec) -> Path:
    return Path(spec.cache_dir or os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR).expanduser()


def _wants_fp16_files(spec: ModelSpec) -> bool:
    """Whether fp16 weight files are preferred, judged without requiring a GPU to be present."""
    if spec.variant != "auto":
        return spec.variant == "fp16"
    if spec.dtype == "bf16":
        return True
    if spec.dtype == "fp32":
        return False
    # fp16 on CPU is loaded as fp32 (see _runtime_device_dtype): prefer the full-precision files.
    return _resolve_device(spec.device, require=False) != "cpu"


def _resolve_device(device: str, *, require: bool) -> str:
    if device == "cpu":
        return device
    import torch

    available = torch.cuda.is_available()
    if device == "auto":
        return "cuda" if available else "cpu"
    if require and not available:
        raise ModelLoadError(
            f"device {device!r} was requested but no CUDA GPU is available (use 'cpu' or 'auto')"
        )
    return device


def _runtime_device_dtype(spec: ModelSpec):
    import torch

    device = _resolve_device(spec.device, require=True)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[spec.dtype]
    if dtype == torch.float16 and device == "cpu":
        # Many CPU kernels (conv, group norm) have no fp16 implementation or are far slower than
        # fp32, so fp16 on CPU would fail or crawl; bf16 is supported on CPU and kept as asked.
        logger.warning("dtype fp16 is not supported on CPU: loading %s in fp32 instead", spec.source)
        dtype = torch.float32
    return device, dtype


def _one_line(err: BaseException, limit: int = 300) -> str:
    """The first line of ``err`` (its type name if empty), cut to ``limit`` characters."""
    text = str(err).strip().splitlines()
    line = text[0].strip() if text else ""
    line = line or type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
