"""The models one stage replica holds: loaded on demand by model id, shared where identical.

A model stage (image encode, sampling, decode) serves every image-to-video model of the zoo. Serve's
model multiplexing (``@serve.multiplexed``) keeps up to ``max_num_models_per_replica`` of them per
replica, unloads the least recently used one to make room, and routes a request to a replica that
already holds its model. What one model costs is shared with the others where the weights are the
same: components are loaded through one :class:`~pipelines.loader.shared.SharedComponents` cache
keyed by a hash of their config and weights, so SVD-XT and its fine-tunes share one VAE and one
image encoder, and a LoRA model shares its base's U-Net outright (the adapter is applied per
request, see :mod:`pipelines.adapters`).

Models are keyed by version (``id@digest``, :meth:`~serve.zoo.ModelCatalog.version_key`): a
registry entry changed at run time is loaded afresh under its new key, and the old version ages out.
Eviction is safe for requests in flight: a request holds its :class:`LoadedModel` from the moment
the multiplexer hands it over until the request ends, so an evicted model's weights stay alive
until then, and an evicted LoRA model removes its adapter from the shared U-Net only then.
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

from pipelines.acceleration.compile import STAGE_NETWORKS
from pipelines.errors import ModelLoadError
from pipelines.loader import load_stage_components, read_pipeline_file
from pipelines.loader.unet_checkpoint import fetch_adapter
from pipelines.registry import StageSpec

from .telemetry import emit, record_model_load, tracer
from .zoo import ModelCatalog, ModelUnavailableError, ModelVersionChangedError, Weights

logger = logging.getLogger("ray.serve.svd_serve")

#: Models a replica keeps when nothing says how many fit (no GPU to measure).
DEFAULT_MODELS_PER_REPLICA = 4
#: The share of a replica's GPU memory models may fill when the count is derived from memory.
MODEL_MEMORY_FRACTION = 0.8


class LoadedModel:
    """One model as a stage replica holds it: the built stage, and the LoRA adapter to apply."""

    def __init__(self, key: str, stage: Any, *, load_seconds: float, adapters: Any = None,
                 on_evicted: Callable[["LoadedModel"], None] | None = None,
                 release_adapter: Callable[[], None] | None = None) -> None:
        self.key, self.model_id = key, key.rsplit("@", 1)[0]
        self.stage, self.adapters = stage, adapters
        self.adapter = adapter_name(key)
        self._release_adapter = release_adapter
        self.load_seconds = load_seconds
        self.loaded_at = time.monotonic()
        self._on_evicted = on_evicted
        self.ready: Any = None
        """What accelerating the stage cost (a ReadyReport), None for an eager stage."""
        self._active = 0
        self._evicted = False
        self._lock = threading.Lock()

    def hold(self) -> None:
        """One more request uses this model (taken as the multiplexer hands it over)."""
        with self._lock:
            self._active += 1

    def release(self) -> None:
        """That request ended; an evicted model lets its adapter go with its last request."""
        with self._lock:
            self._active -= 1
            drop = self._evicted and self._active == 0
        if drop:
            self._drop_adapter()

    @contextlib.contextmanager
    def applied(self) -> Iterator[Any]:
        """The stage, with this model's adapter active for the calling thread (a held model)."""
        if self.adapters is None:
            yield self.stage
        else:
            with self.adapters.active(self.adapter):
                yield self.stage

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

    def __init__(self, spec: StageSpec, catalog: ModelCatalog, *, acceleration: Any = None,
                 warmup_shapes: Any = (), low_vram: Any = None,
                 default_shape: Callable[[Any], Any] | None = None) -> None:
        """``acceleration`` (a :class:`~pipelines.acceleration.options.StageAcceleration`) is applied
        to every model this stage loads, compiled for ``warmup_shapes`` (none given: the shape
        ``default_shape(entry)`` gives for the model, i.e. what a request without size or length
        gets) before the model is handed to a request. ``low_vram`` (a
        :class:`~pipelines.acceleration.options.LowVramOptions`) is applied first."""
        from pipelines.loader.shared import SharedComponents

        self.spec, self.catalog = spec, catalog
        self.acceleration, self.warmup_shapes, self.default_shape = acceleration, tuple(warmup_shapes), default_shape
        self.low_vram = low_vram
        self.components = SharedComponents()
        self.evictions = 0
        self.load_seconds: dict[str, float] = {}
        self._adapters: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()  # U-Net -> adapters
        # Holders of each adapter: a model evicted while a request still runs on it and loaded
        # again meanwhile must not lose its adapter when that request ends.
        self._adapter_holders: dict[tuple[int, str], int] = {}
        self._lock = threading.Lock()

    def load(self, key: str) -> LoadedModel:
        """Fetch and load the components of model version ``key`` (``id@digest``, or a bare id)
        for this stage (shared ones from the cache) and build the stage, timed: a span, a metric
        and a log line per load. A model that is gone or cannot load is ModelUnavailableError (its
        detail, which may name operator paths, is logged, not shown to the tenant)."""
        model_id = key.rsplit("@", 1)[0]
        try:
            entry = self.catalog.get(model_id, fresh=True)  # the version the key names, not a cached older one
            if entry is None:
                raise ModelUnavailableError(f"model {model_id!r} is no longer registered")
            weights = self.catalog.weights(entry)
            if "@" in key and weights.digest != key.rsplit("@", 1)[1]:
                raise ModelVersionChangedError(f"model {model_id!r} changed since this job started", requested=key,
                                               current=f"{model_id}@{weights.digest}")
            start = time.perf_counter()
            with tracer().start_as_current_span("model_load", attributes={"svd.stage": self.spec.name,
                                                                          "svd.model": model_id}):
                components = self._components(weights)
                stage = self.spec.build(components)
                ready = self._prepare(stage, components, entry)  # before the adapter: nothing held if it fails
                adapters = self._with_adapter(key, weights, components) if weights.lora else None
        except ModelUnavailableError:
            raise
        except (LookupError, ValueError, ModelLoadError, OSError) as error:
            logger.error("%s could not load model %s: %s", self.spec.name, model_id, error)
            raise ModelUnavailableError(f"model {model_id!r} could not be loaded on this deployment (the operator "
                                        "can find why in the logs)") from None
        release = self._releaser(adapters, adapter_name(key)) if adapters is not None else None
        seconds = time.perf_counter() - start
        record_model_load(stage=self.spec.name, model=model_id, seconds=seconds)
        logger.info("%s loaded model %s in %.2fs", self.spec.name, key, seconds)
        self.load_seconds[model_id] = seconds
        model = LoadedModel(key, stage, load_seconds=seconds, adapters=adapters, on_evicted=self._evicted,
                            release_adapter=release)
        model.ready = ready
        return model

    def _prepare(self, stage: Any, components: dict[str, Any], entry: Any) -> Any:
        """Accelerate and warm up the stage (compile time counts as load time: it is what a model
        costs before it serves); None when this stage runs eagerly."""
        if self.low_vram is not None:
            from pipelines.acceleration.lowvram import apply_low_vram

            apply_low_vram(components, self.low_vram)  # before compiling: it changes the U-Net's calls
            if self.low_vram.decode_chunk_size is not None and hasattr(stage, "default_chunk_size"):
                stage.default_chunk_size = self.low_vram.decode_chunk_size
        if self.acceleration is None or self.spec.name not in STAGE_NETWORKS:
            return None
        from pipelines.acceleration.warmup import prepare_stage

        shapes = self.warmup_shapes or ((self.default_shape(entry),) if self.default_shape else ())
        with tracer().start_as_current_span("model_warmup", attributes={"svd.stage": self.spec.name,
                                                                        "svd.model": entry.id}):
            return prepare_stage(self.spec.name, components=components, stage_object=stage,
                                 options=self.acceleration, shapes=shapes)

    def models_that_fit(self, first: LoadedModel, *, gpu_share: float) -> int:
        """How many models like ``first`` fit in this replica's GPU share (no GPU: the default)."""
        import torch

        if not torch.cuda.is_available():
            return DEFAULT_MODELS_PER_REPLICA
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory * (gpu_share or 1.0)
        used = max(1, torch.cuda.memory_allocated())  # the first model (components shared with later ones count once)
        # The rest of the share is the requests' working memory (latents, activations, decode chunks).
        return max(1, min(64, int(total * MODEL_MEMORY_FRACTION // used)))

    def default_num_frames(self, model_id: str) -> int:
        """The model's own frame count, from its U-Net config alone (no weights fetched or loaded)."""
        entry = self.catalog.get(model_id)
        if entry is None:
            raise ModelUnavailableError(f"model {model_id!r} is no longer registered")
        return int(unet_config(self.catalog.weights(entry)).get("num_frames") or 14)

    # -- inside -----------------------------------------------------------------------------------

    def _components(self, weights: Weights) -> dict[str, Any]:
        from pipelines.adapters import LoraAdapters
        from pipelines.loader.shared import load_components_shared

        if self.spec.component_loader is not None or not self.spec.components:
            return load_stage_components(self.spec, weights.pipeline)
        unet_override = weights.unet if "unet" in self.spec.components else None
        components, _ = load_components_shared(weights.pipeline, self.spec.components, cache=self.components,
                                               unet_override=unet_override)
        unet = components.get("unet")
        if unet is not None:
            # Every U-Net gets its adapter set (its per-call hooks) before it serves a request: an
            # adapter injected later waits for the forwards in flight instead of racing them.
            with self._lock:
                if unet not in self._adapters:
                    self._adapters[unet] = LoraAdapters(unet)
        return components

    def _with_adapter(self, key: str, weights: Weights, components: dict[str, Any]) -> Any:
        """The shared U-Net's adapter set, with this model's LoRA loaded into it (once)."""
        unet = components.get("unet")
        if unet is None:  # stages without the U-Net share the base's components unchanged
            return None
        directory = fetch_adapter(weights.lora, weights.pipeline)  # a download: outside the lock
        name = adapter_name(key)
        with self._lock:
            adapters = self._adapters[unet]
            adapters.load(name, directory, scale=weights.lora_scale)
            holders = (id(adapters), name)
            self._adapter_holders[holders] = self._adapter_holders.get(holders, 0) + 1
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
        stage_name = self.spec.name
        emit(lambda m: m.model_evictions.inc(tags={"stage": stage_name, "model": model.model_id}))
        logger.info("%s unloaded model %s", self.spec.name, model.key)


def default_warmup_shape(config: Any, models: StageModels, entry: Any) -> Any:
    """What a request that gives no size or length gets from ``entry`` (its defaults over the
    deployment's ``default_params``): the shape a compiled stage warms up for when its deployment
    names none."""
    from pipelines.acceleration.options import WarmupShape
    from pipelines.params import GenerationParams

    from .api.request_params import with_defaults

    params = with_defaults(GenerationParams(), config.default_params, model=entry)
    width, height = params.size
    frames = params.num_frames or models.default_num_frames(entry.id)
    return WarmupShape(width=width, height=height, num_frames=frames, decode_chunk_size=params.decode_chunk_size)


def adapter_name(model_id: str) -> str:
    """The adapter's name inside the U-Net: model ids may hold '/' and '.', adapter names may not."""
    import hashlib

    return "lora_" + hashlib.sha256(model_id.encode()).hexdigest()[:16]


def unet_config(weights: Weights) -> dict[str, Any]:
    """The U-Net config of a model, fetched alone: its checkpoint folder's, else its pipeline's
    ``unet/config.json`` (a local file, one Hub file, or one S3 object)."""
    if weights.unet is not None and not weights.unet.startswith("s3://"):
        folder = Path(weights.unet).expanduser()
        if (folder / "config.json").is_file():
            return json.loads((folder / "config.json").read_text())
    return json.loads(read_pipeline_file(weights.pipeline, "unet/config.json"))
