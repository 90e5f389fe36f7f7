"""Load each distinct sub-model once per process, however many served models use it.

A replica serving several SVD models and fine-tunes would otherwise hold one VAE and one CLIP
image encoder per model although they are byte-identical, and often the same U-Net too. Identity
is decided by content (:mod:`~pipelines.loader.fingerprint`), never by source or name, and a
component is shared only on the same device and dtype.

:class:`SharedComponents` holds WEAK references: it never keeps a module alive by itself, so when
the last model using a component is unloaded its memory is freed, and the next model needing it
loads it again. Only torch modules (components with weight files) go through it; schedulers and
image processors are loaded fresh for every model: they are tiny, and a scheduler is stateful
(``set_timesteps`` and ``step`` mutate it), so sharing one between models would let concurrent
requests corrupt each other's sampling.
"""

from __future__ import annotations

import logging
import threading
import weakref
from functools import partial
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

from pipelines.errors import ModelLoadError
from pipelines.loader.fingerprint import component_fingerprint, component_weight_files
from pipelines.loader.layout import _read_model_index
from pipelines.loader.local import _load_component
from pipelines.loader.spec import ModelSpec, _runtime_device_dtype

__all__ = ["SharedComponents", "load_components_shared"]

logger = logging.getLogger(__name__)


class SharedComponents:
    """A per-process, thread-safe cache of loaded components, keyed by
    ``(component name, fingerprint, device, dtype)`` and holding weak references only.

    :meth:`get_or_load` runs a key's loader at most once while some holder keeps its result
    alive; concurrent callers of one key wait for that single load (a per-key lock), while loads
    of different keys run in parallel. A result that cannot be weakly referenced (an int, a
    tuple, ...) is returned but not cached. ``loads`` and ``hits`` count what happened.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: weakref.WeakValueDictionary[Hashable, Any] = weakref.WeakValueDictionary()
        #: key -> [lock, number of callers using it]; removed when the last one leaves.
        self._key_locks: dict[Hashable, list] = {}
        self.loads = 0
        self.hits = 0

    def get_or_load(self, key: Hashable, loader: Callable[[], Any]) -> Any:
        """The live value for ``key``, or ``loader()``'s result, cached weakly under ``key``."""
        with self._lock:
            value = self._values.get(key)
            if value is not None:
                self.hits += 1
                return value
            entry = self._key_locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                with self._lock:
                    value = self._values.get(key)  # loaded by the caller we waited for
                    if value is not None:
                        self.hits += 1
                        return value
                value = loader()  # outside self._lock: other keys load in parallel
                with self._lock:
                    self.loads += 1
                    try:
                        self._values[key] = value
                    except TypeError:
                        logger.debug("Not caching %r: %s objects cannot be weakly referenced", key, type(value))
                return value
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._key_locks[key]

    def alive(self) -> int:
        """Number of components currently alive in the cache (not ``__len__``: an empty cache
        must stay truthy for ``cache or SharedComponents()``)."""
        with self._lock:
            return len(self._values)

    def __repr__(self) -> str:
        return f"SharedComponents(alive={self.alive()}, loads={self.loads}, hits={self.hits})"


def load_components_shared(
    spec: ModelSpec,
    names: Sequence[str],
    *,
    cache: SharedComponents,
    unet_override: str | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Load the named components of ``spec`` through ``cache``; returns ``(components, fingerprints)``.

    Like :func:`pipelines.loader.load_components`, but a torch module whose (name, fingerprint,
    device, dtype) is already alive in ``cache`` is returned as is (the same object: callers must
    treat shared modules as read-only). ``unet_override`` is a fine-tuned U-Net checkpoint (see
    :func:`~pipelines.loader.unet_checkpoint.load_unet_checkpoint`) used instead of the model's own;
    when it is a folder with its own config, the base model's U-Net is not even downloaded (a
    single file needs the base ``unet/config.json``, and a Hub or S3 sync fetches whole component
    folders, so there the base U-Net weights are downloaded but not loaded). It is ignored when
    ``names`` has no ``unet``.
    """
    from pipelines.loader import resolve_model_dir  # the package imports this module's siblings
    from pipelines.loader.unet_checkpoint import (
        _load_resolved,
        resolve_unet_checkpoint,
        unet_checkpoint_fingerprint,
    )

    names = (names,) if isinstance(names, str) else tuple(names)
    if not names:
        raise ModelLoadError("load_components_shared needs at least one component name")
    if len(set(names)) != len(names):
        raise ModelLoadError(f"Duplicate component names in {list(names)}")
    device, dtype = _runtime_device_dtype(spec)

    override_path: Path | None = None
    download = names
    if unet_override is not None and "unet" in names:
        override_path = resolve_unet_checkpoint(unet_override, spec)
        if override_path.is_dir():  # a diffusers folder brings its own config: skip the base U-Net
            download = tuple(n for n in names if n != "unet")
    model_dir = resolve_model_dir(spec, components=download)
    index = _read_model_index(model_dir)

    components: dict[str, Any] = {}
    fingerprints: dict[str, str] = {}
    for name in names:
        if name == "unet" and override_path is not None:
            path = override_path
            fingerprint = unet_checkpoint_fingerprint(path, base_dir=model_dir, spec=spec)
            loader = partial(_load_resolved, path, base_dir=model_dir, spec=spec, label=unet_override)
            shared = True
        else:
            fingerprint = component_fingerprint(model_dir, name, spec=spec, index=index)
            loader = partial(_load_component, model_dir, index, name, spec=spec, device=device, dtype=dtype)
            shared = bool(component_weight_files(model_dir, name, spec))
        fingerprints[name] = fingerprint
        if shared:
            components[name] = cache.get_or_load((name, fingerprint, str(device), str(dtype)), loader)
        else:
            components[name] = loader()  # tiny and (scheduler) stateful: never shared
    return components, fingerprints
