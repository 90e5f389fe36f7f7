"""``svd-serve warm-cache``: compile every accelerated stage's warm-up shapes once and store the
artifacts in the stages' compile cache, ahead of a rollout, so the replicas that start next load
them instead of compiling (seconds instead of minutes).

It loads each stage's models exactly as a stage replica does (``StageModels.load``: the same
acceleration, warm-up shapes and cache key), so what it stores is what the replicas will look up;
run it on the GPU kind the replicas run on (the key includes the GPU name and compute capability).
Compiled graphs take the weights as inputs, so one model per architecture fills the cache for every
fine-tune of it; ``--model`` adds others.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Sequence

from pydantic import ValidationError

from pipelines.errors import SVDServeError


class WarmCacheError(SVDServeError):
    """A one-line reason the command cannot run (printed as ``svd-serve warm-cache: ...``)."""


def accelerated_stages(config: Any, only: Sequence[str] = ()) -> list[Any]:
    """The registered stages whose deployment compiles, in route order (``only`` filters by name)."""
    from pipelines import registry

    stages = []
    for spec in registry.STAGES.stages():
        acceleration = config.stages.for_stage(spec).acceleration
        chosen = not only or spec.name in only or spec.config_key in only
        if acceleration is None or not acceleration.compiled or not chosen:
            continue
        if acceleration.cache_dir is None:
            raise WarmCacheError(f"stage {spec.name!r} compiles but has no acceleration.cache_dir: there is no "
                                 "cache to fill (set one, e.g. a directory on the model-cache volume or s3://...)")
        stages.append(spec)
    unknown = set(only) - {name for spec in registry.STAGES.stages() for name in (spec.name, spec.config_key)}
    if unknown:
        raise WarmCacheError(f"unknown stage {sorted(unknown)[0]!r}; stages: {', '.join(registry.STAGES.names())}")
    if not stages:
        raise WarmCacheError("no stage of this config compiles (stages.<name>.acceleration.compile is 'none' "
                             "everywhere" + (f" among {', '.join(only)}" if only else "") + ")")
    return stages


def warm_cache(config: Any, *, stages: Sequence[str] = (), models: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Load (and so compile and store) each accelerated stage's models; one report row per load."""
    from .stage_models import StageModels, default_warmup_shape
    from .zoo import ModelUnavailableError
    from .zoo.catalog import ModelCatalog
    from .zoo.store import make_model_store

    catalog = ModelCatalog(config, make_model_store(config.job_store), ttl_s=0)
    rows = []
    for spec in accelerated_stages(config, stages):
        options = config.stages.for_stage(spec)
        loader = StageModels(spec, catalog, acceleration=options.acceleration, warmup_shapes=options.warmup_shapes,
                             low_vram=options.low_vram)
        loader.default_shape = lambda entry, loader=loader: default_warmup_shape(config, loader, entry)
        for model_id in models or [catalog.default_id]:
            if catalog.get(model_id) is None:
                raise WarmCacheError(f"no model {model_id!r} in this config or its registry")
            started = time.perf_counter()
            try:
                loaded = loader.load(catalog.version_key(model_id))
            except ModelUnavailableError as error:
                raise WarmCacheError(f"{spec.name}: {error}") from None
            report = loaded.ready
            rows.append({"stage": spec.name, "model": model_id, "cache": report.cache if report else "off",
                         "compile_s": round(sum(report.warmup_s.values()) + report.aot_build_s, 1) if report else 0.0,
                         "stored_bytes": report.cache_bytes if report else 0,
                         "seconds": round(time.perf_counter() - started, 1)})
            loaded.__del__()
    return rows


def cmd_warm_cache(args: argparse.Namespace) -> int:
    from .config import AppConfig

    try:
        config = AppConfig.from_file(args.config)
    except (OSError, ValidationError, ValueError) as error:
        raise WarmCacheError(f"cannot read the app config {args.config}: {str(error).splitlines()[0]}") from None
    rows = warm_cache(config, stages=args.stage or (), models=args.model or ())
    print(f"{'stage':<14} {'model':<24} {'cache':<6} {'compile s':>9} {'stored':>10} {'total s':>8}")
    for row in rows:
        stored = f"{row['stored_bytes'] / 1e6:.1f} MB" if row["stored_bytes"] else "-"
        print(f"{row['stage']:<14} {row['model']:<24} {row['cache']:<6} {row['compile_s']:>9.1f} {stored:>10} "
              f"{row['seconds']:>8.1f}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``svd-serve warm-cache`` to the top-level parser."""
    parser = commands.add_parser("warm-cache", help="compile the accelerated stages once and fill their compile "
                                                    "cache before a rollout")
    parser.add_argument("--config", required=True, help="the app config YAML the replicas run with")
    parser.add_argument("--stage", action="append", help="only this stage, by name (sampling) or config key (sampler); "
                                                         "repeatable; default: every compiled one")
    parser.add_argument("--model", action="append", help="warm for this model id too (repeatable; default: the "
                                                         "default model, which covers every model of its architecture)")
    parser.set_defaults(handler=cmd_warm_cache)
