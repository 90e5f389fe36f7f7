"""Apply a stage's :class:`StageAcceleration` to its loaded networks, in place.

Everything is in place (``Module.compile()``, processor swaps, weight layout), so a stage keeps
using ``unet.config`` and friends unchanged, and eager and compiled runs share one code path in
:mod:`pipelines.stages`. Order: attention, memory format, FP8, compile; the warm-up that makes
the compile happen is :mod:`pipelines.acceleration.warmup`.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import torch

from .options import AttentionBackend, CompileEngine, CompileScope, ShapePolicy, StageAcceleration

logger = logging.getLogger(__name__)

#: The network each stage's acceleration applies to, as (component, attribute path inside it).
#: The decoder is compiled without the VAE's encoder (which the image-encode stage uses once per job).
STAGE_NETWORKS: dict[str, tuple[str, str]] = {
    "image_encode": ("image_encoder", ""),
    "sampling": ("unet", ""),
    "decode": ("vae", "decoder"),
}

#: Repeated block classes compiled one by one in ``regional`` scope (outermost match wins).
REGIONAL_BLOCKS = frozenset({
    "SpatioTemporalResBlock", "TransformerSpatioTemporalModel",  # SVD U-Net
    "MidBlockTemporalDecoder", "UpBlockTemporalDecoder",  # SVD temporal VAE decoder
    "CLIPEncoderLayer",  # CLIP vision tower
})

#: Distinct (block class, shape) graphs dynamo may keep per code object in regional scope: the
#: U-Net's blocks come in 4 widths x up/down/mid, each traced per warm-up shape.
REGIONAL_RECOMPILE_LIMIT = 256

_SDPA_BACKENDS = {
    AttentionBackend.FLASH: "FLASH_ATTENTION",
    AttentionBackend.CUDNN: "CUDNN_ATTENTION",
    AttentionBackend.EFFICIENT: "EFFICIENT_ATTENTION",
    AttentionBackend.MATH: "MATH",
}


def stage_network(stage: str, components: dict[str, Any]) -> torch.nn.Module:
    """The module a stage's acceleration applies to; ``ValueError`` for a stage without one."""
    if stage not in STAGE_NETWORKS:
        raise ValueError(f"stage {stage!r} has no network to accelerate; known: {', '.join(STAGE_NETWORKS)}")
    component, path = STAGE_NETWORKS[stage]
    if component not in components:
        raise ValueError(f"stage {stage!r} needs component {component!r}, which is not loaded")
    module = components[component]
    for part in filter(None, path.split(".")):
        module = getattr(module, part)
    return module


def accelerate_stage(stage: str, components: dict[str, Any], options: StageAcceleration) -> torch.nn.Module:
    """Apply ``options`` to the stage's network in place and return it. Compilation itself is lazy:
    it happens at the first call of each shape (the warm-up)."""
    network = stage_network(stage, components)
    owner = components[STAGE_NETWORKS[stage][0]]
    if options.attention is not AttentionBackend.DEFAULT and hasattr(owner, "set_attn_processor"):
        from diffusers.models.attention_processor import AttnProcessor2_0

        owner.set_attn_processor(AttnProcessor2_0())
    pin_attention_backend(options)
    if options.channels_last:
        to_channels_last(network)
    if options.fp8:
        if stage != "sampling":
            raise ValueError(f"fp8 applies to the sampling stage's U-Net only, not to {stage!r}")
        from .fp8 import quantize_linears_fp8

        quantize_linears_fp8(network)
    if options.compiled and options.engine is CompileEngine.JIT:
        compile_network(network, options)  # the aot engine compiles from the warm-up's calls (aot.py)
    return network


def compile_network(network: torch.nn.Module, options: StageAcceleration) -> int:
    """``Module.compile`` the network (full scope) or its repeated blocks (regional); returns the
    number of modules compiled."""
    mode = options.compile.value
    kwargs: dict[str, Any] = {"dynamic": options.shape_policy is ShapePolicy.DYNAMIC}
    if mode != "default":
        kwargs["mode"] = mode
    if options.scope is CompileScope.FULL:
        network.compile(**kwargs)
        return 1
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, REGIONAL_RECOMPILE_LIMIT)
    compiled = 0
    for module in _outermost_blocks(network):
        module.compile(**kwargs)
        compiled += 1
    if not compiled:
        raise ValueError(f"{type(network).__name__} has none of the repeated blocks regional compile knows "
                         f"({', '.join(sorted(REGIONAL_BLOCKS))}); use scope 'full'")
    return compiled


def _outermost_blocks(network: torch.nn.Module) -> Iterator[torch.nn.Module]:
    for child in network.children():
        if type(child).__name__ in REGIONAL_BLOCKS:
            yield child
        else:
            yield from _outermost_blocks(child)


def to_channels_last(module: torch.nn.Module) -> None:
    """Conv weights to channels_last. ``module.to(memory_format=...)`` fails on the SVD U-Net, whose
    temporal ResNet blocks hold 5-D Conv3d weights; those get channels_last_3d instead."""
    for layer in module.modules():
        if isinstance(layer, torch.nn.Conv2d):
            layer.to(memory_format=torch.channels_last)
        elif isinstance(layer, torch.nn.Conv3d):
            layer.to(memory_format=torch.channels_last_3d)


def pin_attention_backend(options: StageAcceleration) -> None:
    """Pin SDPA to the configured backend for this process (nothing for sdpa/default). Process-wide
    on purpose: ``sdpa_kernel`` saves and restores global flags, so per-call pins on concurrent
    requests would restore each other's state out of order; a stage replica serves one stage."""
    name = _SDPA_BACKENDS.get(options.attention)
    if name is None:
        return
    backends = torch.backends.cuda
    backends.enable_flash_sdp(name == "FLASH_ATTENTION")
    backends.enable_cudnn_sdp(name == "CUDNN_ATTENTION")
    backends.enable_mem_efficient_sdp(name == "EFFICIENT_ATTENTION")
    backends.enable_math_sdp(name == "MATH")


def enter_serving_stance(options: StageAcceleration) -> None:
    """Set the process's compiler stance for serving, after warm-up: under the ``static`` policy a
    shape that was not warmed up runs eagerly instead of compiling mid-request (graphs already
    compiled are still used); ``dynamic`` graphs cover every shape, so nothing changes.

    The stance is process-wide in torch (not per thread), which is why it is set once here rather
    than around each call: concurrent calls would restore each other's stance out of order. A model
    loaded later warms up under ``torch.compiler.set_stance("default")`` (see warmup.py)."""
    if options.compiled and options.engine is CompileEngine.JIT and options.shape_policy is ShapePolicy.STATIC:
        torch.compiler.set_stance("eager_on_recompile")
