"""Content fingerprints of model components, so identical sub-models are loaded once.

Several SVD models and fine-tunes share a replica, and most of them carry byte-identical VAEs and
CLIP image encoders (often the same U-Net too). Whether two components are the same is decided by
what would be loaded, never by their source or path: a fingerprint is a sha256 over

* the component's ``[library, class]`` from model_index.json,
* its config files: JSON parsed and re-serialized with sorted keys, without bookkeeping keys
  (``_diffusers_version``, ``_name_or_path``, ``transformers_version``, any ``_``-prefixed key),
  so whitespace, key order or the library version that wrote them do not matter; other config
  files (tokenizer ``.txt`` / ``.model``) by their bytes,
* the sha256 of each weight file of the set the loader picks for the spec (the same
  :func:`~pipelines.loader.layout._pick_weights` rule as :mod:`~pipelines.loader.local`), in
  file-name order. File names themselves are left out, so a fine-tune folder holding a copy of a
  model's U-Net has that U-Net's fingerprint; a sharded set's index JSON is hashed as a weight file.

Weight files are streamed in 1 MiB chunks and their digests cached in-process by (absolute path,
size, mtime_ns): fingerprinting a multi-GB model a second time costs a few ``stat`` calls.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

from pipelines.errors import ModelLoadError
from pipelines.loader.layout import (
    _CONFIG_SUFFIXES,
    _index_components,
    _is_weight_file,
    _pick_weights,
    _read_model_index,
)
from pipelines.loader.spec import ModelSpec, _one_line, _wants_fp16_files

__all__ = [
    "component_configs",
    "component_fingerprint",
    "component_weight_files",
    "file_fingerprint",
    "fingerprint_parts",
]

_CHUNK = 1 << 20
#: Bumped whenever what goes into a fingerprint changes, so old and new never compare equal.
_FORMAT = 1
#: Keys dropped from config JSON at every level besides ``_``-prefixed ones: written by the
#: library that saved the file, they do not change the module that is built.
_IGNORED_KEYS = frozenset({"transformers_version"})
#: Bounded so a long-lived replica re-syncing changed files does not grow the cache forever.
_MAX_CACHED_FILES = 4096

_file_hashes: OrderedDict[tuple[str, int, int], str] = OrderedDict()
_file_hashes_lock = threading.Lock()


def file_fingerprint(path: str | Path) -> str:
    """Hex sha256 of one file's bytes, cached by (absolute path, size, mtime_ns).

    A rewritten file gets a new mtime (and usually size), so the cache never serves a stale
    digest for it; two threads hashing the same new file at once both read it, which is harmless.
    """
    path = Path(path).expanduser().absolute()
    try:
        stat = path.stat()
    except OSError as err:
        raise ModelLoadError(f"Cannot read {path}: {_one_line(err)}") from err
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _file_hashes_lock:
        cached = _file_hashes.get(key)
        if cached is not None:
            _file_hashes.move_to_end(key)
            return cached
    digest = _sha256_file(path)
    with _file_hashes_lock:
        _file_hashes[key] = digest
        while len(_file_hashes) > _MAX_CACHED_FILES:
            _file_hashes.popitem(last=False)
    return digest


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    except OSError as err:
        raise ModelLoadError(f"Cannot read {path}: {_one_line(err)}") from err
    return digest.hexdigest()


def component_weight_files(model_dir: Path, name: str, spec: ModelSpec | None) -> list[Path]:
    """The weight files the loader would load for component ``name`` under ``spec``.

    The same choice as :func:`~pipelines.loader.local._load_component`: ``_pick_weights`` with the
    spec's variant mode, preferring fp16 files exactly when the runtime dtype is fp16/bf16
    (:func:`~pipelines.loader.spec._wants_fp16_files` agrees with it, without needing a GPU). With
    ``spec=None`` every weight file of the folder counts, which is stricter and never wrong.
    ``[]`` for components without weights (scheduler, feature extractor).
    """
    folder = model_dir / name
    if not folder.is_dir():
        raise ModelLoadError(f"Model directory {model_dir} has no {name}/ folder")
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if spec is None:
        chosen = [f for f in files if _is_weight_file(f)]
    else:
        _, chosen = _pick_weights(files, want_fp16=_wants_fp16_files(spec), mode=spec.variant, where=str(folder))
    return [folder / f for f in sorted(chosen)]


def component_fingerprint(
    model_dir: Path,
    name: str,
    *,
    spec: ModelSpec | None = None,
    variant_files: Sequence[str] | None = None,
    index: dict | None = None,
) -> str:
    """Hex sha256 identifying what loading component ``name`` of ``model_dir`` would produce.

    ``spec`` picks the weight set as the loader would (see :func:`component_weight_files`);
    ``variant_files`` (names inside the component folder) overrides that choice; with neither,
    all weight files of the folder are hashed. ``index`` saves re-reading model_index.json.
    """
    model_dir = Path(model_dir)
    index = _read_model_index(model_dir) if index is None else index
    if name not in _index_components(index):
        raise ModelLoadError(
            f"{model_dir}/model_index.json has no component {name!r} (it has {_index_components(index)})"
        )
    folder = model_dir / name
    if variant_files is not None:
        weights = [folder / f for f in sorted(variant_files)]
    else:
        weights = component_weight_files(model_dir, name, spec)
    return fingerprint_parts(index[name], component_configs(folder), [file_fingerprint(p) for p in weights])


def component_configs(folder: Path) -> dict[str, Path]:
    """The config files of a component folder (name -> path): what goes into its fingerprint
    besides the weights. Hidden files (our own bookkeeping) are skipped."""
    return {
        p.name: p
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.suffix in _CONFIG_SUFFIXES and not _is_weight_file(p.name)
    }


def fingerprint_parts(class_ref: Sequence[str], configs: dict[str, Path], weight_digests: Iterable[str]) -> str:
    """Combine a ``[library, class]``, config files (name -> path) and weight digests into one hex sha256.

    Shared with :mod:`~pipelines.loader.unet_checkpoint` so that a fine-tuned U-Net whose config
    and weights equal a model's U-Net gets the same fingerprint as that model's ``unet``.
    """
    document = {
        "format": _FORMAT,
        "class": list(class_ref),
        "configs": {rel: _config_digest(path) for rel, path in sorted(configs.items())},
        "weights": list(weight_digests),
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _config_digest(path: Path) -> str:
    """sha256 of a config file: canonical JSON for ``.json``, raw bytes for anything else."""
    if path.suffix != ".json":
        return file_fingerprint(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"Cannot read {path}: {_one_line(err)}") from err
    canonical = json.dumps(_strip_bookkeeping(data), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _strip_bookkeeping(value):
    if isinstance(value, dict):
        return {
            k: _strip_bookkeeping(v)
            for k, v in value.items()
            if not (isinstance(k, str) and (k.startswith("_") or k in _IGNORED_KEYS))
        }
    if isinstance(value, list):
        return [_strip_bookkeeping(v) for v in value]
    return value
