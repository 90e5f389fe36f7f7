"""Load one sub-model from a local save_pretrained directory, with the library allowlist.

model_index.json names a ``[library, class]`` per component; the class is looked up in an
allowed library only (the file may come from an untrusted bucket, and importing a module named
there would run its code), its weights are chosen by :func:`~pipelines.loader.layout._pick_weights`,
and torch modules are cast, moved and frozen for inference. torch, diffusers and transformers are
imported when a component is loaded, never at import time.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from pathlib import Path
from typing import Any

from pipelines.errors import ModelLoadError
from pipelines.loader.layout import _index_components, _pick_weights
from pipelines.loader.spec import ModelSpec, _one_line

logger = logging.getLogger(__name__)

# Only these libraries may be named in model_index.json: the file can come from an untrusted
# bucket, and importing an arbitrary module named there would execute its code.
_ALLOWED_LIBRARIES = ("diffusers", "transformers")


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
