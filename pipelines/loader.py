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

Heavy libraries (torch, diffusers, transformers, boto3) are imported lazily so that resolving a
Hub or S3 source stays cheap in processes that never load weights.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipelines.errors import ModelLoadError

try:  # POSIX only; without it concurrent syncs of one prefix are still safe, just less efficient.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CACHE_DIR_ENV",
    "DEFAULT_CACHE_DIR",
    "DEFAULT_MODEL_ID",
    "PIPELINE_COMPONENTS",
    "ModelSpec",
    "S3SyncResult",
    "load_components",
    "load_pipeline",
    "resolve_model_dir",
    "sync_s3",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "stabilityai/stable-video-diffusion-img2vid-xt-1-1"

#: Environment variable overriding the default cache root (``~/.cache/svd-serve/models``).
CACHE_DIR_ENV = "SVD_SERVE_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/svd-serve/models"

#: Every sub-model of ``StableVideoDiffusionPipeline``; the default of :func:`load_components`.
PIPELINE_COMPONENTS = ("image_encoder", "feature_extractor", "vae", "unet", "scheduler")

# Only these libraries may be named in model_index.json: the file can come from an untrusted
# bucket, and importing an arbitrary module named there would execute its code.
_ALLOWED_LIBRARIES = ("diffusers", "transformers")

_MANIFEST_NAME = ".svd-serve-manifest.json"
_LOCK_NAME = ".svd-serve.lock"
_PART_SUFFIX = ".svd-part"
_MANIFEST_VERSION = 1

# Weight files as written by diffusers and transformers, optionally sharded and/or with a variant:
#   diffusion_pytorch_model.safetensors, model.fp16.safetensors,
#   diffusion_pytorch_model.fp16-00001-of-00002.safetensors, model.safetensors.index.fp16.json
_WEIGHT_FILE = re.compile(
    r"^(?:diffusion_pytorch_model|model|pytorch_model)(?:\.(?P<variant>[A-Za-z0-9_]+))?"
    r"(?:-\d+-of-\d+)?\.(?P<ext>safetensors|bin)$"
)
_WEIGHT_INDEX = re.compile(
    r"^(?:diffusion_pytorch_model|model|pytorch_model)\.(?P<ext>safetensors|bin)\.index"
    r"(?:\.(?P<variant>[A-Za-z0-9_]+))?\.json$"
)
_CONFIG_SUFFIXES = (".json", ".txt")


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


@dataclass(frozen=True)
class S3SyncResult:
    """What :func:`sync_s3` did: the local mirror and which files it had to (re)download."""

    #: Local directory mirroring the prefix (a diffusers save_pretrained layout).
    local_dir: Path
    #: Paths (relative to ``local_dir``) fetched by this call, because they were new or had changed.
    downloaded: tuple[str, ...]
    #: Number of files whose cached copy matched the bucket's size and ETag and was kept.
    reused: int
    #: Paths deleted because their object no longer exists under the prefix.
    removed: tuple[str, ...]


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


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


def sync_s3(spec: ModelSpec, *, components: Sequence[str] | None = None) -> S3SyncResult:
    """Mirror ``spec.source`` (``s3://bucket/prefix``) into the cache and return what was fetched.

    Objects whose (size, ETag) match the manifest of the previous sync, and whose local file still
    has that size, are not downloaded again. Each download is written to a temporary name and
    renamed into place, so an interrupted sync never leaves a partial file that looks current.
    """
    bucket, prefix = _parse_s3_url(spec.source)
    url = f"s3://{bucket}/{prefix}"
    local_dir = _cache_root(spec) / "s3" / bucket / prefix.rstrip("/")

    client = _s3_client(spec)
    endpoint = _endpoint_label(spec)
    listing = _list_s3_objects(client, bucket, prefix, url=url, endpoint=endpoint)
    if not listing:
        raise ModelLoadError(f"No objects under {url}: check the bucket and prefix")
    if "model_index.json" not in listing:
        raise ModelLoadError(f"{url} has no model_index.json: it is not a diffusers save_pretrained layout")
    try:
        local_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ModelLoadError(f"Cannot create the cache directory {local_dir}: {_one_line(err)}") from err
    in_scope = _component_filter(components)
    wanted = {rel: obj for rel, obj in listing.items() if in_scope(rel)}

    downloaded: list[str] = []
    removed: list[str] = []
    reused = 0
    # One sync per prefix at a time: the stages of one node share the cache and start together.
    with _locked(local_dir / _LOCK_NAME):
        _remove_stale_parts(local_dir)
        manifest = _read_manifest(local_dir, bucket=bucket, prefix=prefix)
        for rel, obj in sorted(wanted.items()):
            target = local_dir / rel
            entry = manifest.get(rel)
            if entry == obj and target.is_file() and target.stat().st_size == obj["size"]:
                reused += 1
                continue
            _download_s3_object(client, bucket, obj, target, endpoint=endpoint)
            manifest[rel] = obj
            # Record progress after every file so an interrupted sync resumes where it stopped.
            _write_manifest(local_dir, bucket=bucket, prefix=prefix, objects=manifest)
            downloaded.append(rel)
        for rel in sorted(set(manifest) - set(listing)):
            if in_scope(rel):
                (local_dir / rel).unlink(missing_ok=True)
                del manifest[rel]
                removed.append(rel)
        if removed:
            _write_manifest(local_dir, bucket=bucket, prefix=prefix, objects=manifest)

    logger.info(
        "Synced %s into %s: %d downloaded, %d unchanged, %d removed",
        url,
        local_dir,
        len(downloaded),
        reused,
        len(removed),
    )
    return S3SyncResult(
        local_dir=local_dir, downloaded=tuple(downloaded), reused=reused, removed=tuple(removed)
    )


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


# --------------------------------------------------------------------------------------------
# Sources, devices and dtypes
# --------------------------------------------------------------------------------------------


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


def _check_local_dir(path: Path) -> Path:
    if not path.exists():
        raise ModelLoadError(f"Model directory {path} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"Model source {path} is not a directory")
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(
            f"Model directory {path} has no model_index.json: it is not a diffusers save_pretrained layout"
        )
    return path


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
    text = str(err).strip().splitlines()
    line = text[0].strip() if text else ""
    line = line or type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Weight file selection (shared by the Hub download and local loading)
# --------------------------------------------------------------------------------------------


def _weight_sets(filenames: Sequence[str]) -> dict[tuple[str | None, str], list[str]]:
    """Group a component folder's weight files by (variant, format); index files included."""
    sets: dict[tuple[str | None, str], list[str]] = {}
    for name in filenames:
        match = _WEIGHT_FILE.match(name) or _WEIGHT_INDEX.match(name)
        if match:
            sets.setdefault((match["variant"], match["ext"]), []).append(name)
    return sets


def _is_weight_file(name: str) -> bool:
    return bool(_WEIGHT_FILE.match(name) or _WEIGHT_INDEX.match(name))


def _pick_weights(
    filenames: Sequence[str], *, want_fp16: bool, mode: str, where: str
) -> tuple[str | None, list[str]]:
    """Choose one weight set in a component folder: returns (variant, its files).

    safetensors beats .bin (no pickle), then the wanted precision beats the other one. A folder
    without weights (scheduler, feature extractor) gives ``(None, [])``.
    """
    sets = _weight_sets(filenames)
    if not sets:
        return None, []
    if mode == "fp16":
        order = [("fp16", "safetensors"), ("fp16", "bin")]
    elif mode == "none":
        order = [(None, "safetensors"), (None, "bin")]
    else:
        first, second = ("fp16", None) if want_fp16 else (None, "fp16")
        order = [(first, "safetensors"), (second, "safetensors"), (first, "bin"), (second, "bin")]
    for key in order:
        if key in sets:
            return key[0], sets[key]
    wanted = "fp16" if mode == "fp16" else "full-precision"
    present = sorted(name for files in sets.values() for name in files)
    raise ModelLoadError(f"{where} has no {wanted} weight files (variant={mode!r}); it has {present}")


def _component_filter(components: Sequence[str] | None):
    if components is None:
        return lambda rel: True
    wanted = set(components)
    return lambda rel: rel == "model_index.json" or rel.split("/", 1)[0] in wanted


def _index_components(index: dict) -> list[str]:
    """Component names of a model_index.json (entries are ``[library, class]``; nulls are absent parts)."""
    return [
        key
        for key, value in index.items()
        if not key.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0] and value[1]
    ]


def _read_model_index(model_dir: Path) -> dict:
    path = model_dir / "model_index.json"
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"Cannot read {path}: {_one_line(err)}") from err
    if not isinstance(index, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return index


# --------------------------------------------------------------------------------------------
# Component loading
# --------------------------------------------------------------------------------------------


def _load_component(model_dir: Path, index: dict, name: str, *, spec: ModelSpec, device: str, dtype) -> Any:
    import torch

    available = _index_components(index)
    if name not in available:
        raise ModelLoadError(f"{model_dir}/model_index.json has no component {name!r} (it has {available})")
    library, class_name = index[name]
    if library not in _ALLOWED_LIBRARIES:
        raise ModelLoadError(
            f"Component {name!r} comes from {library!r}; only {list(_ALLOWED_LIBRARIES)} are allowed"
        )
    cls = getattr(importlib.import_module(library), class_name, None)
    if cls is None:
        raise ModelLoadError(
            f"Component {name!r} names {library}.{class_name}, which this {library} version lacks"
        )
    folder = model_dir / name
    if not folder.is_dir():
        raise ModelLoadError(f"Model directory {model_dir} has no {name}/ folder")

    kwargs: dict[str, Any] = {}
    is_module = issubclass(cls, torch.nn.Module)
    if is_module:
        files = [p.name for p in folder.iterdir() if p.is_file()]
        variant, chosen = _pick_weights(
            files, want_fp16=dtype in (torch.float16, torch.bfloat16), mode=spec.variant, where=str(folder)
        )
        if not chosen:
            raise ModelLoadError(f"{folder} has no weight files (*.safetensors or *.bin)")
        if variant is not None:
            kwargs["variant"] = variant
        # transformers >= 4.56 renamed torch_dtype to dtype (the old name warns, and in v5 the
        # default became "auto", i.e. the checkpoint's dtype); diffusers still uses torch_dtype.
        if _is_transformers_model(cls):
            kwargs["dtype"] = dtype
        else:
            kwargs["torch_dtype"] = dtype
            # diffusers defaults to low_cpu_mem_usage=True and, without accelerate, warns on every
            # load before falling back; ask for it only when it can be honoured.
            kwargs["low_cpu_mem_usage"] = importlib.util.find_spec("accelerate") is not None
        logger.info("Loading %s (%s, variant=%s) from %s", name, class_name, variant or "none", folder)
    try:
        component = cls.from_pretrained(str(folder), **kwargs)
        if is_module:
            component = component.to(device).eval()
            component.requires_grad_(False)  # inference only: no autograd bookkeeping even without no_grad
    except ModelLoadError:
        raise
    except Exception as err:  # noqa: BLE001 - anything from the libraries becomes one actionable line
        raise ModelLoadError(f"Could not load {name} ({class_name}) from {folder}: {_one_line(err)}") from err
    return component


def _is_transformers_model(cls) -> bool:
    try:
        import transformers
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    if not issubclass(cls, transformers.PreTrainedModel):
        return False
    from packaging.version import Version

    return Version(transformers.__version__).release >= (4, 56)


# --------------------------------------------------------------------------------------------
# Hugging Face Hub
# --------------------------------------------------------------------------------------------


def _hub_transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of whichever HTTP client this huggingface_hub version uses."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    errors: list[type[BaseException]] = [OfflineModeIsEnabled]
    for module, attr in (
        ("httpx2", "TransportError"),
        ("httpx", "TransportError"),
        ("requests", "ConnectionError"),
        ("requests", "Timeout"),
    ):
        try:
            errors.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _hub_failure(err: Exception) -> str:
    status = getattr(getattr(err, "response", None), "status_code", None)
    return f"HTTP {status}" if isinstance(status, int) else type(err).__name__


def _hub_cache_dir(spec: ModelSpec) -> Path | None:
    root = spec.cache_dir or os.environ.get(CACHE_DIR_ENV)
    return Path(root).expanduser() / "huggingface" if root else None


def _download_from_hub(spec: ModelSpec, *, token: str | None, components: Sequence[str] | None) -> Path:
    from huggingface_hub import HfApi, constants, get_token, hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = spec.source
    revision = spec.revision
    rev_label = revision or "main"
    token = token or os.environ.get("HF_TOKEN") or None
    has_token = token is not None or get_token() is not None
    cache_dir = _hub_cache_dir(spec)
    cache_label = cache_dir or constants.HF_HUB_CACHE
    want_fp16 = _wants_fp16_files(spec)
    wanted_components = _component_filter(components)

    def hub_error(err: Exception) -> ModelLoadError:
        # Order matters: GatedRepoError is a RepositoryNotFoundError.
        if isinstance(err, GatedRepoError):
            if has_token:
                return ModelLoadError(
                    f"Model repo {repo!r} is gated and HF_TOKEN has no access: accept its licence at "
                    f"{constants.ENDPOINT}/{repo} with the account that owns the token"
                )
            return ModelLoadError(
                f"Model repo {repo!r} is gated: accept its licence on the Hub and set HF_TOKEN"
            )
        if isinstance(err, RevisionNotFoundError):
            return ModelLoadError(f"Model repo {repo!r} has no revision {rev_label!r}")
        if isinstance(err, RepositoryNotFoundError):
            hint = "the token cannot read it" if has_token else "set HF_TOKEN if it is private"
            return ModelLoadError(
                f"Model repo {repo!r} was not found on the Hub ({hint}), and no local directory has that name"
            )
        if isinstance(err, HFValidationError):
            return ModelLoadError(
                f"{repo!r} is neither a local directory, an s3:// URL nor a valid Hub repo id"
            )
        if isinstance(err, HfHubHTTPError):
            status = getattr(getattr(err, "response", None), "status_code", None)
            if status == 401:
                return ModelLoadError("The Hub rejected HF_TOKEN (invalid or expired token)")
            return ModelLoadError(f"The Hub answered HTTP {status} for {repo!r}; try again later")
        return ModelLoadError(f"Could not download {repo!r} from the Hub: {_one_line(err)}")

    def unreachable(err: Exception) -> ModelLoadError:
        if constants.HF_HUB_OFFLINE:
            return ModelLoadError(
                f"HF_HUB_OFFLINE is set and {repo!r} (revision {rev_label}) is not in the cache at {cache_label}"
            )
        return ModelLoadError(
            f"Cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({_hub_failure(err)}) and {repo!r} "
            f"(revision {rev_label}) is not in the cache at {cache_label}"
        )

    def from_cache(err: Exception) -> Path:
        """The Hub cannot answer: use the cached snapshot of this revision, if an earlier run made one."""
        try:
            snapshot = Path(
                snapshot_download(
                    repo,
                    revision=revision,
                    cache_dir=cache_dir,
                    token=token,
                    local_files_only=True,
                    allow_patterns=["model_index.json"],
                )
            )
        except (LocalEntryNotFoundError, OSError, ValueError) as cache_err:
            raise unreachable(err) from cache_err
        if not (snapshot / "model_index.json").is_file():
            raise unreachable(err) from None
        if constants.HF_HUB_OFFLINE:
            logger.info("HF_HUB_OFFLINE is set: using the cached snapshot %s", snapshot)
        else:
            logger.warning(
                "The Hub is unavailable (%s): using the cached snapshot %s", type(err).__name__, snapshot
            )
        files = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
        try:  # the files of an earlier download must cover what is asked for now
            _select_hub_files(
                files, _read_model_index(snapshot), want_fp16, spec.variant, wanted_components, repo
            )
        except ModelLoadError as gap:
            raise ModelLoadError(
                f"The Hub is unavailable and the cached copy of {repo!r} is incomplete: {gap}"
            ) from err
        return snapshot

    def is_outage(err: Exception) -> bool:
        status = getattr(getattr(err, "response", None), "status_code", None)
        return isinstance(err, HfHubHTTPError) and isinstance(status, int) and status >= 500

    api = HfApi(token=token)
    try:
        info = api.model_info(repo, revision=revision)
        filenames = [sibling.rfilename for sibling in (info.siblings or [])]
        if "model_index.json" not in filenames:
            raise ModelLoadError(
                f"Model repo {repo!r} has no model_index.json: it is not a diffusers pipeline repo"
            )
        index_path = hf_hub_download(
            repo, "model_index.json", revision=info.sha, cache_dir=cache_dir, token=token
        )
    except _hub_transport_errors() as err:
        return from_cache(err)
    except (HfHubHTTPError, HFValidationError) as err:
        if is_outage(err):
            return from_cache(err)
        raise hub_error(err) from err

    index = _read_model_index(Path(index_path).parent)
    allow = _select_hub_files(filenames, index, want_fp16, spec.variant, wanted_components, repo)
    logger.info("Downloading %d files of %s (revision %s) from the Hub", len(allow), repo, rev_label)
    try:
        path = snapshot_download(
            repo, revision=revision, cache_dir=cache_dir, token=token, allow_patterns=allow
        )
    except _hub_transport_errors() as err:
        raise ModelLoadError(
            f"Lost the connection to the Hub while downloading {repo!r} ({type(err).__name__}); retry"
        ) from err
    except (HfHubHTTPError, HFValidationError) as err:
        raise hub_error(err) from err
    except OSError as err:
        raise ModelLoadError(
            f"Could not store {repo!r} in the cache at {cache_label}: {_one_line(err)}"
        ) from err
    return Path(path)


def _select_hub_files(
    filenames: Sequence[str], index: dict, want_fp16: bool, mode: str, in_scope, repo: str
) -> list[str]:
    """The repo files the pipeline needs: model_index.json, component configs, one weight set each.

    Everything else (e.g. the repo's single-file checkpoint, images, other variants) is skipped.
    """
    by_folder: dict[str, list[str]] = {}
    for name in filenames:
        folder, _, base = name.partition("/")
        if base and "/" not in base:
            by_folder.setdefault(folder, []).append(base)
    selected = ["model_index.json"]
    for component in _index_components(index):
        if not in_scope(f"{component}/"):
            continue
        files = by_folder.get(component, [])
        if not files:
            raise ModelLoadError(
                f"Model repo {repo!r} lists component {component!r} but has no {component}/ files"
            )
        _, weights = _pick_weights(files, want_fp16=want_fp16, mode=mode, where=f"{repo}/{component}")
        configs = [f for f in files if f.endswith(_CONFIG_SUFFIXES) and not _is_weight_file(f)]
        selected += [f"{component}/{f}" for f in sorted(configs + weights)]
    return selected


# --------------------------------------------------------------------------------------------
# S3
# --------------------------------------------------------------------------------------------


def _parse_s3_url(source: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> ("bucket", "a/b/"); the prefix always ends with '/' unless empty."""
    rest = source[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}", bucket):
        raise ModelLoadError(f"{source!r} is not a valid s3://bucket/prefix URL")
    parts = [p for p in prefix.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ModelLoadError(f"{source!r}: '.' and '..' are not allowed in the prefix")
    # The trailing slash keeps s3://b/models/svd from also matching models/svd-old/.
    return bucket, "".join(f"{p}/" for p in parts)


def _endpoint_label(spec: ModelSpec) -> str:
    raw = spec.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not raw:
        return "AWS S3"
    parts = urlsplit(raw)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")  # no userinfo


def _s3_client(spec: ModelSpec):
    import boto3
    from botocore.config import Config

    # Few fast retries: a wrong endpoint should fail in seconds, not minutes.
    config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=120)
    return boto3.session.Session().client(
        "s3", endpoint_url=spec.s3_endpoint_url, region_name=spec.s3_region, config=config
    )


def _s3_error(err: Exception, *, action: str, url: str, endpoint: str, bucket: str) -> ModelLoadError:
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        ParamValidationError,
        PartialCredentialsError,
    )

    if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
        return ModelLoadError(
            f"No AWS credentials for {url}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role"
        )
    if isinstance(err, EndpointConnectionError):
        return ModelLoadError(f"Cannot reach the S3 endpoint {endpoint} to {action} {url}")
    if isinstance(err, ParamValidationError):
        return ModelLoadError(f"Invalid S3 request to {action} {url}: {_one_line(err)}")
    if isinstance(err, ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return ModelLoadError(f"S3 bucket {bucket!r} does not exist at {endpoint}")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
            return ModelLoadError(f"S3 rejected the credentials ({code}) when trying to {action} {url}")
        if code in ("AccessDenied", "AllAccessDisabled", "403") or status == 403:
            return ModelLoadError(
                f"Access denied to {action} {url}: check the credentials and the bucket policy"
            )
        if code in ("NoSuchKey", "404") or status == 404:
            return ModelLoadError(f"An object disappeared while trying to {action} {url}; retry the load")
        return ModelLoadError(f"S3 error {code or status} while trying to {action} {url}")
    return ModelLoadError(f"S3 failure while trying to {action} {url} ({type(err).__name__})")


def _list_s3_objects(client, bucket: str, prefix: str, *, url: str, endpoint: str) -> dict[str, dict]:
    from botocore.exceptions import BotoCoreError, ClientError

    objects: dict[str, dict] = {}
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                rel = key[len(prefix) :]
                if not rel or rel.endswith("/"):
                    continue  # "folder" marker objects created by consoles
                parts = rel.split("/")
                if any(p in ("", ".", "..") for p in parts):
                    raise ModelLoadError(
                        f"Object key {key!r} under {url} cannot be mirrored safely to a local path"
                    )
                if parts[-1] in (_MANIFEST_NAME, _LOCK_NAME) or parts[-1].endswith(_PART_SUFFIX):
                    continue  # our own bookkeeping, e.g. from a cache directory copied into the bucket
                objects[rel] = {
                    "key": key,
                    "size": int(obj["Size"]),
                    "etag": str(obj.get("ETag", "")).strip('"'),
                }
    except (BotoCoreError, ClientError) as err:
        raise _s3_error(err, action="list", url=url, endpoint=endpoint, bucket=bucket) from err
    return objects


def _download_s3_object(client, bucket: str, obj: dict, target: Path, *, endpoint: str) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=_PART_SUFFIX)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            client.download_file(bucket, obj["key"], str(tmp))
        except (BotoCoreError, ClientError) as err:
            raise _s3_error(
                err, action="download", url=f"s3://{bucket}/{obj['key']}", endpoint=endpoint, bucket=bucket
            ) from err
        size = tmp.stat().st_size
        if size != obj["size"]:
            raise ModelLoadError(
                f"s3://{bucket}/{obj['key']} changed during download ({size} bytes, listed {obj['size']}); retry the load"
            )
        os.replace(tmp, target)  # atomic: readers see the old file or the whole new one
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale_parts(local_dir: Path) -> None:
    """Delete temporary files left by a sync that was killed mid-download."""
    for part in local_dir.rglob(f"*{_PART_SUFFIX}"):
        part.unlink(missing_ok=True)


def _read_manifest(local_dir: Path, *, bucket: str, prefix: str) -> dict[str, dict]:
    try:
        data = json.loads((local_dir / _MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return {}  # first sync, or an unreadable manifest: everything is fetched again
    if (
        not isinstance(data, dict)
        or data.get("version") != _MANIFEST_VERSION
        or data.get("bucket") != bucket
        or data.get("prefix") != prefix
    ):
        return {}
    objects = data.get("objects")
    return dict(objects) if isinstance(objects, dict) else {}


def _write_manifest(local_dir: Path, *, bucket: str, prefix: str, objects: dict[str, dict]) -> None:
    data = {"version": _MANIFEST_VERSION, "bucket": bucket, "prefix": prefix, "objects": objects}
    fd, tmp_name = tempfile.mkstemp(dir=local_dir, prefix=f"{_MANIFEST_NAME}.", suffix=_PART_SUFFIX)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
    os.replace(tmp_name, local_dir / _MANIFEST_NAME)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)
