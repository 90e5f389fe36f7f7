"""The models one stage replica holds: loaded on demand by model id, shared where identical.

A model stage (image encode, sampling, decode) serves every image-to-video model of the zoo. Serve's
model multiplexing (``@serve.multiplexed``) keeps up to ``max_num_models_per_replica`` of them per
replica, unloads the least recently used one to make room, and routes a request to a replica that
already holds its model. What one model costs is shared with the others where the weights are the
same: components are loaded through one :class:`~pipelines.loader.shared.SharedComponents` cache
keyed by a hash of their config and weights, so SVD-XT and its fine-tunes share one VAE and one
image encoder, and a LoRA model shares its base's U-Net outright (the adapter is applied per
request, see :mod:`pipelines.adapters`).

Eviction is safe for requests in flight: a request holds its :class:`LoadedModel` for as long as
it runs, so an evicted model's weights stay alive until its last request ends, and an evicted LoRA
model removes its adapter from the shared U-Net only then.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator

from pipelines.loader import load_stage_components, resolve_model_dir
from pipelines.loader.unet_checkpoint import fetch_adapter
from pipelines.registry import StageSpec

from .telemetry import metrics, tracer
from .zoo import ModelCatalog, Weights

logger = logging.getLogger("ray.serve.svd_serve")

#: Models a replica keeps when nothing says how many fit (no GPU to measure).
DEFAULT_MODELS_PER_REPLICA = 4
#: The share of a replica's GPU memory models may fill when the count is derived from memory.
MODEL_MEMORY_FRACTION = 0.8


class LoadedModel:
    """One model as a stage replica holds it: the built stage, and the LoRA adapter to apply."""

    def __init__(self, model_id: str, stage: Any, *, load_seconds: float, adapters: Any = None,
                 on_evicted: Callable[["LoadedModel"], None] | None = None,
                 release_adapter: Callable[[], None] | None = None) -> None:
        self.model_id, self.stage, self.adapters = model_id, stage, adapters
        self.adapter = adapter_name(model_id)
        self._release_adapter = release_adapter
        self.load_seconds = load_seconds
        self.loaded_at = time.monotonic()
        self._on_evicted = on_evicted
        self._active = 0
        self._evicted = False
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def use(self) -> Iterator[Any]:
        """The stage, with this model's adapter active for the calling thread, for one request."""
        with self._lock:
            self._active += 1
        try:
            if self.adapters is None:
                yield self.stage
            else:
                with self.adapters.active(self.adapter):
                    yield self.stage
        finally:
            with self._lock:
                self._active -= 1
                drop = self._evicted and self._active == 0
            if drop:
                self._drop_adapter()

    def __del__(self) -> None:
        # Serve's multiplexer calls this when it unloads the model (LRU), then drops it.
        with self._lock:
            if self._evicted:
                return
            self._evicted = True
            drop = self._active == 0
        if self._on_evicted is not None:
            self._on_evicted(self)
        if drop:
            self._drop_adapter()

    def _drop_adapter(self) -> None:
        if self._release_adapter is not None:
            release, self._release_adapter = self._release_adapter, None
            release()


class StageModels:
    """Loads the models of one stage by id (the multiplexed loader calls :meth:`load`)."""

    def __init__(self, spec: StageSpec, catalog: ModelCatalog) -> None:
        from pipelines.loader.shared import SharedComponents

        self.spec, self.catalog = spec, catalog
        self.components = SharedComponents()
        self.evictions = 0
        self.load_seconds: dict[str, float] = {}
        self._adapters: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()  # U-Net -> adapters
        # Holders of each adapter: a model evicted while a request still runs on it and loaded
        # again meanwhile must not lose its adapter when that request ends.
        self._adapter_holders: dict[tuple[int, str], int] = {}
        self._lock = threading.Lock()

    def load(self, model_id: str) -> LoadedModel:
        """Fetch and load ``model_id``'s components for this stage (shared ones from the cache) and
        build the stage, timed: a span, a metric and a log line per load."""
        entry = self.catalog.get(model_id)
        if entry is None:
            raise LookupError(f"model {model_id!r} is not registered")
        weights = self.catalog.weights(entry)
        start = time.perf_counter()
        with tracer().start_as_current_span("model_load", attributes={"svd.stage": self.spec.name,
                                                                      "svd.model": model_id}):
            components = self._components(weights)
            stage = self.spec.build(components)
            adapters = self._with_adapter(model_id, weights, components) if weights.lora else None
        release = self._releaser(adapters, adapter_name(model_id)) if adapters is not None else None
        seconds = time.perf_counter() - start
        recorder = metrics()
        if recorder is not None:
            recorder.model_load_seconds.observe(seconds, tags={"stage": self.spec.name, "model": model_id})
        logger.info("%s loaded model %s in %.2fs", self.spec.name, model_id, seconds)
        self.load_seconds[model_id] = seconds
        return LoadedModel(model_id, stage, load_seconds=seconds, adapters=adapters, on_evicted=self._evicted,
                           release_adapter=release)

    def models_that_fit(self, first: LoadedModel, *, gpu_share: float) -> int:
        """How many models like ``first`` fit in this replica's GPU share (no GPU: the default)."""
        import torch

        if not torch.cuda.is_available():
            return DEFAULT_MODELS_PER_REPLICA
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory * (gpu_share or 1.0)
        used = max(1, torch.cuda.memory_allocated())  # the first model (components shared with later ones count once)
        return max(1, min(64, int(total * MODEL_MEMORY_FRACTION // used)))

    def default_num_frames(self, model_id: str) -> int:
        """The model's own frame count, from its U-Net config (no weights loaded)."""
        entry = self.catalog.get(model_id)
        if entry is None:
            raise LookupError(f"model {model_id!r} is not registered")
        return int(unet_config(self.catalog.weights(entry)).get("num_frames") or 14)

    # -- inside -----------------------------------------------------------------------------------

    def _components(self, weights: Weights) -> dict[str, Any]:
        from pipelines.loader.shared import load_components_shared

        if self.spec.component_loader is not None or not self.spec.components:
            return load_stage_components(self.spec, weights.pipeline)
        unet_override = weights.unet if "unet" in self.spec.components else None
        components, _ = load_components_shared(weights.pipeline, self.spec.components, cache=self.components,
                                               unet_override=unet_override)
        return components

    def _with_adapter(self, model_id: str, weights: Weights, components: dict[str, Any]) -> Any:
        """The shared U-Net's adapter set, with this model's LoRA loaded into it (once)."""
        unet = components.get("unet")
        if unet is None:  # stages without the U-Net share the base's components unchanged
            return None
        from pipelines.adapters import LoraAdapters

        with self._lock:
            adapters = self._adapters.get(unet)
            if adapters is None:
                adapters = self._adapters[unet] = LoraAdapters(unet)
            name = adapter_name(model_id)
            adapters.load(name, fetch_adapter(weights.lora, weights.pipeline), scale=weights.lora_scale)
            key = (id(adapters), name)
            self._adapter_holders[key] = self._adapter_holders.get(key, 0) + 1
        return adapters

    def _releaser(self, adapters: Any, name: str) -> Callable[[], None]:
        """Unloads the adapter from the shared U-Net when its last holder lets go."""
        def release() -> None:
            with self._lock:
                key = (id(adapters), name)
                self._adapter_holders[key] -= 1
                if self._adapter_holders[key] == 0:
                    del self._adapter_holders[key]
                    adapters.unload(name)

        return release

    def _evicted(self, model: LoadedModel) -> None:
        self.evictions += 1
        recorder = metrics()
        if recorder is not None:
            recorder.model_evictions.inc(tags={"stage": self.spec.name, "model": model.model_id})
        logger.info("%s unloaded model %s", self.spec.name, model.model_id)


def adapter_name(model_id: str) -> str:
    """The adapter's name inside the U-Net: model ids may hold '/' and '.', adapter names may not."""
    import hashlib

    return "lora_" + hashlib.sha256(model_id.encode()).hexdigest()[:16]


def unet_config(weights: Weights) -> dict[str, Any]:
    """The U-Net config of a model: its checkpoint folder's, else its pipeline's."""
    if weights.unet is not None and not weights.unet.startswith("s3://"):
        folder = Path(weights.unet).expanduser()
        if (folder / "config.json").is_file():
            return json.loads((folder / "config.json").read_text())
    model_dir = resolve_model_dir(weights.pipeline, components=("unet",))
    return json.loads((model_dir / "unet" / "config.json").read_text())
