"""Download the files an SVD pipeline needs from the Hugging Face Hub, or fall back to the cache.

A download asks the Hub for the repo's file list and model_index.json, then fetches with
``snapshot_download`` only model_index.json, the component configs and one weight set per
component (:func:`_select_hub_files`). When the Hub cannot answer (no network, HF_HUB_OFFLINE, a
5xx outage) a snapshot of the same revision cached by an earlier run is used, provided it covers
what is asked for now. Every failure becomes a one-line :class:`~pipelines.errors.ModelLoadError`
that names the repo and revision and never the token. huggingface_hub is imported when called.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import ModelLoadError
from pipelines.loader.layout import (
    _CONFIG_SUFFIXES,
    _component_filter,
    _index_components,
    _is_weight_file,
    _pick_weights,
    _read_model_index,
)
from pipelines.loader.spec import CACHE_DIR_ENV, ModelSpec, _one_line, _wants_fp16_files

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _HubRequest:
    """One resolution of a Hub source: what is asked for, with which token, into which cache."""

    spec: ModelSpec
    token: str | None
    #: Whether a token is available (passed, HF_TOKEN, or a stored login): changes the hints.
    has_token: bool
    cache_dir: Path | None
    #: The cache directory as shown in messages (huggingface_hub's own when ``cache_dir`` is None).
    cache_label: Path | str
    want_fp16: bool
    in_scope: Callable[[str], bool]

    @property
    def repo(self) -> str:
        return self.spec.source

    @property
    def rev_label(self) -> str:
        return self.spec.revision or "main"


def _download_from_hub(spec: ModelSpec, *, token: str | None, components: Sequence[str] | None) -> Path:
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    request = _hub_request(spec, token, components)
    try:
        filenames, index_path = _list_repo(request)
    except _hub_transport_errors() as err:
        return _from_cache(request, err)
    except (HfHubHTTPError, HFValidationError) as err:
        if _is_outage(err):
            return _from_cache(request, err)
        raise _hub_error(request, err) from err

    index = _read_model_index(Path(index_path).parent)
    allow = _select_hub_files(filenames, index, request.want_fp16, spec.variant, request.in_scope, request.repo)
    logger.info(
        "Downloading %d files of %s (revision %s) from the Hub", len(allow), request.repo, request.rev_label
    )
    return _snapshot(request, allow)


def _hub_request(spec: ModelSpec, token: str | None, components: Sequence[str] | None) -> _HubRequest:
    from huggingface_hub import constants, get_token

    token = token or os.environ.get("HF_TOKEN") or None
    has_token = token is not None or get_token() is not None
    cache_dir = _hub_cache_dir(spec)
    return _HubRequest(
        spec=spec,
        token=token,
        has_token=has_token,
        cache_dir=cache_dir,
        cache_label=cache_dir or constants.HF_HUB_CACHE,
        want_fp16=_wants_fp16_files(spec),
        in_scope=_component_filter(components),
    )


def _hub_cache_dir(spec: ModelSpec) -> Path | None:
    root = spec.cache_dir or os.environ.get(CACHE_DIR_ENV)
    return Path(root).expanduser() / "huggingface" if root else None


def _list_repo(request: _HubRequest) -> tuple[list[str], str]:
    """The repo's file names at the revision, and the local path of its model_index.json."""
    from huggingface_hub import HfApi, hf_hub_download

    repo = request.repo
    info = HfApi(token=request.token).model_info(repo, revision=request.spec.revision)
    filenames = [sibling.rfilename for sibling in (info.siblings or [])]
    if "model_index.json" not in filenames:
        raise ModelLoadError(f"Model repo {repo!r} has no model_index.json: it is not a diffusers pipeline repo")
    index_path = hf_hub_download(
        repo, "model_index.json", revision=info.sha, cache_dir=request.cache_dir, token=request.token
    )
    return filenames, index_path


def _snapshot(request: _HubRequest, allow: list[str]) -> Path:
    """Download the ``allow``-ed files of the revision; returns the snapshot directory."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    repo = request.repo
    try:
        path = snapshot_download(
            repo,
            revision=request.spec.revision,
            cache_dir=request.cache_dir,
            token=request.token,
            allow_patterns=allow,
        )
    except _hub_transport_errors() as err:
        raise ModelLoadError(
            f"Lost the connection to the Hub while downloading {repo!r} ({type(err).__name__}); retry"
        ) from err
    except (HfHubHTTPError, HFValidationError) as err:
        raise _hub_error(request, err) from err
    except OSError as err:
        raise ModelLoadError(
            f"Could not store {repo!r} in the cache at {request.cache_label}: {_one_line(err)}"
        ) from err
    return Path(path)


def _from_cache(request: _HubRequest, err: Exception) -> Path:
    """The Hub cannot answer: use the cached snapshot of this revision, if an earlier run made one."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo = request.repo
    try:
        snapshot = Path(
            snapshot_download(
                repo,
                revision=request.spec.revision,
                cache_dir=request.cache_dir,
                token=request.token,
                local_files_only=True,
                allow_patterns=["model_index.json"],
            )
        )
    except (LocalEntryNotFoundError, OSError, ValueError) as cache_err:
        raise _unreachable(request, err) from cache_err
    if not (snapshot / "model_index.json").is_file():
        raise _unreachable(request, err) from None
    if constants.HF_HUB_OFFLINE:
        logger.info("HF_HUB_OFFLINE is set: using the cached snapshot %s", snapshot)
    else:
        logger.warning("The Hub is unavailable (%s): using the cached snapshot %s", type(err).__name__, snapshot)
    files = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
    try:  # the files of an earlier download must cover what is asked for now
        _select_hub_files(
            files, _read_model_index(snapshot), request.want_fp16, request.spec.variant, request.in_scope, repo
        )
    except ModelLoadError as gap:
        raise ModelLoadError(
            f"The Hub is unavailable and the cached copy of {repo!r} is incomplete: {gap}"
        ) from err
    return snapshot


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
# Reading failures
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


def _http_status(err: Exception):
    """The HTTP status of the Hub's answer carried by ``err``, if any."""
    return getattr(getattr(err, "response", None), "status_code", None)


def _is_outage(err: Exception) -> bool:
    from huggingface_hub.errors import HfHubHTTPError

    status = _http_status(err)
    return isinstance(err, HfHubHTTPError) and isinstance(status, int) and status >= 500


def _hub_failure(err: Exception) -> str:
    status = _http_status(err)
    return f"HTTP {status}" if isinstance(status, int) else type(err).__name__


def _unreachable(request: _HubRequest, err: Exception) -> ModelLoadError:
    from huggingface_hub import constants

    where = f"{request.repo!r} (revision {request.rev_label}) is not in the cache at {request.cache_label}"
    if constants.HF_HUB_OFFLINE:
        return ModelLoadError(f"HF_HUB_OFFLINE is set and {where}")
    return ModelLoadError(
        f"Cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({_hub_failure(err)}) and {where}"
    )


def _hub_error(request: _HubRequest, err: Exception) -> ModelLoadError:
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = request.repo
    # Order matters: GatedRepoError is a RepositoryNotFoundError.
    if isinstance(err, GatedRepoError):
        if request.has_token:
            return ModelLoadError(
                f"Model repo {repo!r} is gated and HF_TOKEN has no access: accept its licence at "
                f"{constants.ENDPOINT}/{repo} with the account that owns the token"
            )
        return ModelLoadError(f"Model repo {repo!r} is gated: accept its licence on the Hub and set HF_TOKEN")
    if isinstance(err, RevisionNotFoundError):
        return ModelLoadError(f"Model repo {repo!r} has no revision {request.rev_label!r}")
    if isinstance(err, RepositoryNotFoundError):
        hint = "the token cannot read it" if request.has_token else "set HF_TOKEN if it is private"
        return ModelLoadError(
            f"Model repo {repo!r} was not found on the Hub ({hint}), and no local directory has that name"
        )
    if isinstance(err, HFValidationError):
        return ModelLoadError(f"{repo!r} is neither a local directory, an s3:// URL nor a valid Hub repo id")
    if isinstance(err, HfHubHTTPError):
        status = _http_status(err)
        if status == 401:
            return ModelLoadError("The Hub rejected HF_TOKEN (invalid or expired token)")
        return ModelLoadError(f"The Hub answered HTTP {status} for {repo!r}; try again later")
    return ModelLoadError(f"Could not download {repo!r} from the Hub: {_one_line(err)}")
