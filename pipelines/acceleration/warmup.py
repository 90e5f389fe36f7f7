"""Make a stage ready to serve: accelerate its network, load the compile cache, compile every
warm-up shape by running the stage itself once per shape, save the cache, set the serving stance.
Under the ``aot`` engine the warm-up's calls are recorded, exported and compiled into packages
(or the packages come from the cache), and the warm-up then runs through them.

The warm-up calls the real stage object (the same code a request runs), with synthetic inputs of
the shape and the fewest sampling steps that exercise every graph (2), so what gets compiled is
exactly what requests will call: guided batches, decode chunks and all.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import PIL.Image
import torch

from ..params import GenerationParams
from ..payloads import EncodedImage, SampledLatents
from . import aot
from .cache import AOT_SUFFIX, CompileCache, cache_key
from .compile import accelerate_stage, enter_serving_stance, stage_network
from .options import CompileEngine, StageAcceleration, WarmupShape

logger = logging.getLogger(__name__)

#: Sampling steps in a warm-up run: the first step and a later one (a later step has the same
#: shapes; two make sure nothing specialises on the first).
WARMUP_STEPS = 2
#: Warm-ups run one at a time: each flips torch's process-wide compiler stance to "default" for its
#: duration, and two interleaved flips would restore each other's stance out of order.
_WARMUP_LOCK = threading.Lock()
#: Set on a network once prepared: (options, warmed shapes).
PREPARED_MARK = "_svd_prepared"
#: The SVD VAE's spatial downsampling (latents are width/8 x height/8).
VAE_FACTOR = 8


@dataclass
class ReadyReport:
    """What preparing a stage cost (logged, exported as metrics, shown by ``svd-serve warm-cache``)."""

    stage: str
    compiled: bool
    cache: str
    """``off`` (no cache configured or not compiled), ``hit``, ``miss``, ``error`` (the cache could
    not be read: compiled from scratch), ``shared`` (the network was prepared already for a
    model sharing it), or ``partial`` (``aot``: the cached packages covered some warm-up calls; the
    rest were compiled and the archive stored again)."""
    accelerate_s: float = 0.0
    cache_load_s: float = 0.0
    warmup_s: dict[str, float] = field(default_factory=dict)
    """Seconds per warm-up shape (the compile happens inside the first call of each)."""
    cache_save_s: float = 0.0
    cache_bytes: int = 0
    aot_build_s: float = 0.0
    """``aot`` engine: seconds exporting and compiling packages (0 on a cache hit)."""
    aot_packages: int = 0
    """``aot`` engine: compiled packages in use (one per distinct call signature of the warm-up)."""

    @property
    def total_s(self) -> float:
        return (self.accelerate_s + self.cache_load_s + sum(self.warmup_s.values()) + self.cache_save_s
                + self.aot_build_s)


def prepare_stage(stage: str, *, components: dict[str, Any], stage_object: Any, options: StageAcceleration,
                  shapes: Sequence[WarmupShape], cache: CompileCache | None = None) -> ReadyReport:
    """Accelerate ``stage`` in place and compile its warm-up ``shapes``; returns the costs.

    ``cache`` defaults to ``options.cache_dir``. Stages without a network (video encode, plugins)
    and eager stages come back at once with ``compiled=False``."""
    from .compile import STAGE_NETWORKS

    if stage not in STAGE_NETWORKS:
        return ReadyReport(stage=stage, compiled=False, cache="off")
    prepared = (options, tuple(shapes))
    existing = getattr(stage_network(stage, components), PREPARED_MARK, None)
    if existing is not None:
        # A network shared with a model loaded earlier (same weights): already accelerated and
        # compiled; doing it again would rebuild its processors and recompile.
        if existing[0] != options:
            raise ValueError(f"stage {stage!r}: a shared network was prepared with other options")
        missing = [shape for shape in shapes if shape not in existing[1]]
        report = ReadyReport(stage=stage, compiled=options.compiled, cache="shared")
        if missing and options.compiled and options.warmup:
            if options.engine is CompileEngine.AOT:
                _aot_compile(stage=stage, network=stage_network(stage, components), stage_object=stage_object,
                             options=options, shapes=missing, report=report)
            report.warmup_s = _add(report.warmup_s, warm_up(stage, stage_object, shapes=missing, options=options))
            setattr(stage_network(stage, components), PREPARED_MARK, (options, existing[1] + tuple(missing)))
            enter_serving_stance(options)
        return report
    started = time.perf_counter()
    network = accelerate_stage(stage, components, options)
    setattr(network, PREPARED_MARK, prepared)
    report = ReadyReport(stage=stage, compiled=options.compiled, cache="off",
                         accelerate_s=time.perf_counter() - started)
    if not options.compiled:
        return report
    if cache is None and options.cache_dir:
        cache = CompileCache(options.cache_dir)
    started = time.perf_counter()
    key = cache_key(stage=stage, network=network, options=options, shapes=shapes) if cache else None
    report.cache_load_s = time.perf_counter() - started  # on CPU the key probes the vector ISA: seconds, once
    if options.engine is CompileEngine.AOT:
        try:
            _aot_prepare(stage=stage, network=network, stage_object=stage_object, options=options, shapes=shapes,
                         report=report, cache=cache, key=key)
        except BaseException:
            # Nothing half-prepared stays behind: a retry on this (shared) network starts over.
            aot.uninstall(network)
            network.__dict__.pop(PREPARED_MARK, None)
            raise
        _log_ready(report)
        return report
    if cache is not None:
        started = time.perf_counter() - report.cache_load_s
        try:
            report.cache = "hit" if cache.load(key) else "miss"
        except Exception as error:  # noqa: BLE001 - the cache is an optimisation: compile without it
            logger.warning("compile cache %s unreachable (%s); compiling from scratch", cache.location, error)
            report.cache = "error"
        report.cache_load_s = time.perf_counter() - started
    if options.warmup and shapes:
        report.warmup_s = warm_up(stage, stage_object, shapes=shapes, options=options)
        if cache is not None and report.cache == "miss":
            started = time.perf_counter()
            try:
                report.cache_bytes = cache.save(key)
            except Exception as error:  # noqa: BLE001 - the stage is compiled and serves; only sharing is lost
                logger.warning("could not store the compile cache in %s (%s)", cache.location, error)
            report.cache_save_s = time.perf_counter() - started
        # Only after a warm-up: with none, the first request of each shape must still compile.
        enter_serving_stance(options)
    _log_ready(report)
    return report


def _log_ready(report: ReadyReport) -> None:
    logger.info("stage %s ready in %.1f s (compile cache %s; warm-up %s)", report.stage, report.total_s, report.cache,
                ", ".join(f"{k} {v:.1f}s" for k, v in report.warmup_s.items()) or "none")


def _add(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {label: a.get(label, 0.0) + b.get(label, 0.0) for label in {**a, **b}}


def _aot_prepare(*, stage: str, network: torch.nn.Module, stage_object: Any, options: StageAcceleration,
                 shapes: Sequence[WarmupShape], report: ReadyReport, cache: CompileCache | None, key: Any) -> None:
    """The ``aot`` engine: packages from the cache, or compiled from the warm-up's calls (and
    stored); then the warm-up runs through them. Warm-up calls that a cached archive does not cover
    (it was made under other settings: a decode chunk, a guidance batch) get packages too, and the
    archive is stored again with them (``partial``)."""
    runners, stored = None, {}
    if cache is not None:
        started = time.perf_counter() - report.cache_load_s
        try:
            data = cache.read_blob(key, suffix=AOT_SUFFIX)
        except Exception as error:  # noqa: BLE001 - the cache is an optimisation: compile without it
            logger.warning("compile cache %s unreachable (%s); compiling from scratch", cache.location, error)
            report.cache, data = "error", None
        else:
            report.cache = "miss"
        if data is not None:
            try:
                stored = aot.unpack(data)
                runners = {signature: aot.load_package(blob, network) for signature, blob in stored.items()}
                report.cache = "hit"
            except Exception as error:  # noqa: BLE001 - a torn or foreign archive: compile, then replace it
                logger.warning("compiled packages in %s unusable (%s); compiling from scratch", cache.location, error)
                runners, stored = None, {}
        report.cache_load_s = time.perf_counter() - started
    dispatch = aot.install(network, runners or {})
    new: dict[str, bytes] = {}
    if runners is None:
        new = _aot_compile(stage=stage, network=network, stage_object=stage_object, options=options, shapes=shapes,
                           report=report)
    before = dispatch.eager_calls
    report.warmup_s = _add(report.warmup_s, warm_up(stage, stage_object, shapes=shapes, options=options))
    missed = dispatch.eager_calls - before
    if missed and report.cache == "hit":  # an archive made under other settings: complete it
        logger.warning("stage %s: %d warm-up calls matched no cached package; compiling them", stage, missed)
        new = _aot_compile(stage=stage, network=network, stage_object=stage_object, options=options, shapes=shapes,
                           report=report)
        report.cache = "partial"
    elif missed:  # calls a package cannot take (non-dense inputs): they run eagerly
        logger.warning("stage %s: %d warm-up calls run eagerly (not compilable ahead of time)", stage, missed)
    report.aot_packages = len(dispatch.runners)
    if cache is not None and new and report.cache in ("miss", "partial"):
        started = time.perf_counter()
        try:
            report.cache_bytes = cache.write_blob(key, aot.pack({**stored, **new}), suffix=AOT_SUFFIX)
        except Exception as error:  # noqa: BLE001 - the stage is compiled and serves; only sharing is lost
            logger.warning("could not store the compiled packages in %s (%s)", cache.location, error)
        report.cache_save_s = time.perf_counter() - started


def _aot_compile(*, stage: str, network: torch.nn.Module, stage_object: Any, options: StageAcceleration,
                 shapes: Sequence[WarmupShape], report: ReadyReport) -> dict[str, bytes]:
    """Run the warm-up eagerly, recording the network's calls; a package per new call signature,
    added to the network's dispatch. Returns the packages made."""
    dispatch = aot.installed_dispatch(network)
    with aot.record_calls(network) as calls:
        report.warmup_s = _add(report.warmup_s, warm_up(stage, stage_object, shapes=shapes, options=options))
    started = time.perf_counter()
    packages = {signature: aot.build_package(network, call, options) for signature, call in calls.items()
                if signature not in dispatch.runners}
    for signature, data in packages.items():
        dispatch.runners[signature] = aot.load_package(data, network)
    report.aot_build_s += time.perf_counter() - started
    return packages


def warm_up(stage: str, stage_object: Any, *, shapes: Sequence[WarmupShape],
            options: StageAcceleration) -> dict[str, float]:
    """Run the stage once per shape under the default compiler stance; seconds per shape."""
    seconds: dict[str, float] = {}
    # While this runs, a request on another thread with a shape nobody warmed up compiles instead of
    # running eagerly (the stance is process-wide); model loads are rare, and it ends with the warm-up.
    with _WARMUP_LOCK, torch.compiler.set_stance("default"):
        for shape in shapes:
            started = time.perf_counter()
            run_once(stage, stage_object, shape)
            _synchronize(stage_object)
            seconds[shape.label()] = time.perf_counter() - started
    return seconds


def warmup_params(shape: WarmupShape, *, steps: int = WARMUP_STEPS) -> GenerationParams:
    return GenerationParams(width=shape.width, height=shape.height, num_frames=shape.num_frames,
                            num_inference_steps=steps, seed=0,
                            decode_chunk_size=shape.decode_chunk_size).resolved(shape.num_frames)


def run_once(stage: str, stage_object: Any, shape: WarmupShape) -> Any:
    """One call of the stage on synthetic input of ``shape``."""
    params = warmup_params(shape)
    latent_hw = (shape.height // VAE_FACTOR, shape.width // VAE_FACTOR)
    if stage == "image_encode":
        return stage_object(PIL.Image.new("RGB", (shape.width, shape.height), (127, 127, 127)), params)
    if stage == "sampling":
        config = stage_object.unet.config
        encoded = EncodedImage(
            image_embeddings=torch.zeros(1, 1, config.cross_attention_dim),
            image_latents=torch.zeros(1, config.in_channels // 2, *latent_hw),
            generator_state=torch.Generator("cpu").manual_seed(0).get_state(),
        )
        return stage_object(encoded, params)
    if stage == "decode":
        channels = stage_object.vae.config.latent_channels
        return stage_object(SampledLatents(latents=torch.zeros(1, shape.num_frames, channels, *latent_hw)), params)
    raise ValueError(f"no warm-up for stage {stage!r}")


def _synchronize(stage_object: Any) -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
