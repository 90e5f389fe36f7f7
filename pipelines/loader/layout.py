"""diffusers' ``save_pretrained`` layout: model_index.json, component folders, weight file names.

Every source ends as a directory in this layout, and the Hub download, the S3 mirror and local
loading all need the same rules to read it: which components model_index.json lists, which files
of a component folder are weights, and which one weight set to use (safetensors over pickles, the
wanted precision over the other). Pure file-name and JSON logic; no heavy library is imported.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from pipelines.errors import ModelLoadError
from pipelines.loader.spec import _one_line

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
_CONFIG_SUFFIXES = (".json", ".txt", ".model")  # .model: sentencepiece tokenizers (SD 3.5, FLUX T5)


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


def _read_model_index(model_dir: Path) -> dict:
    path = model_dir / "model_index.json"
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"Cannot read {path}: {_one_line(err)}") from err
    if not isinstance(index, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return index


def _index_components(index: dict) -> list[str]:
    """Component names of a model_index.json (entries are ``[library, class]``; nulls are absent parts)."""
    return [
        key
        for key, value in index.items()
        if not key.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0] and value[1]
    ]


def _component_filter(components: Sequence[str] | None) -> Callable[[str], bool]:
    """A test on relative paths: model_index.json and the files of the named components (all if None)."""
    if components is None:
        return lambda rel: True
    wanted = set(components)
    return lambda rel: rel == "model_index.json" or rel.split("/", 1)[0] in wanted


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
