"""Low-VRAM settings for 8-24 GB GPUs, and the per-stage peak memory behind them.

Every option is exact: the same arithmetic on the same values, split differently, so outputs
change by float noise at most (``tests/test_lowvram.py`` checks each on the tiny model):

* ``feed_forward_chunking``: the U-Net's feed-forward layers run on one image at a time (spatial
  blocks) and one frame at a time (temporal blocks): diffusers' ``enable_forward_chunking(1, 0)``.
  A feed-forward layer is per token, so the rows are the same rows. SVD-XT at 576x1024: U-Net
  activations 7.7 -> 4.4 GiB.
* ``split_guidance_batch``: the unconditional and conditional halves of classifier-free
  guidance go through the U-Net one after the other instead of as a batch of two. Every U-Net
  op is per sample (group norm, attention over one sample's tokens), so each half gets what it
  got in the batch. Halves the U-Net's activations.
* ``cpu_offload``: in one process (:class:`~pipelines.staged.StagedPipeline`: the CLI, the demo,
  text-to-image + video on one GPU), a stage's models move to the GPU for its call and back to
  CPU memory after it (plain ``.to()``), so only one stage's weights are on the GPU at a time.
  A serving replica holds one stage already: there it would only add transfers. It costs one
  transfer of each model per job (the U-Net's 2.8 GiB: a few tenths of a second over PCIe).
* ``decode_chunk_size``: frames per VAE decoder call for requests that leave it out. Unlike the
  three above it is *not* free of consequences: the temporal decoder's group norms and time
  convolutions span the chunk, so the chunk shapes the pixels (as ``decode_chunk_size`` does in
  diffusers). Left ``None``, the decoder sizes it from its memory budget (1.125 GiB per
  576x1024 frame in bf16, counted and measured), as it always has; set, every GPU size makes the
  same clip for the same request.

Not offered: attention slicing. The U-Net's attention runs through
``scaled_dot_product_attention``, whose fused kernels (flash, cuDNN, memory-efficient: every
CUDA GPU torch supports, in fp16/bf16) never hold the score matrix; the count puts attention
nowhere near the peak. diffusers' ``SlicedAttnProcessor`` would swap a fused kernel for a loop of
explicit score matrices: more memory per slice, and far slower. Nor VAE tiling: it changes the
pixels.

Which options a GPU size needs: :mod:`pipelines.acceleration.lowvram_profiles`.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .memory_count import LiveTensorBytes, module_bytes, module_tensors
from .options import LowVramOptions  # noqa: F401 - defined there (torch-free), part of this module's API

SPLIT_MARK = "_svd_serve_split_guidance"
#: Where a compiled dispatch (aot.py) sits under the split wrapper, so the wrapper's one-sample
#: calls are what it dispatches.
INNER_FORWARD_ATTR = "_svd_inner_forward"


# -- the module-level options ----------------------------------------------------------------------


def _component(components: Any, name: str) -> Any:
    if isinstance(components, dict):
        return components.get(name)
    return getattr(components, name, None)


def apply_low_vram(components: Any, options: LowVramOptions) -> None:
    """Set the U-Net's options on ``components`` (a dict of sub-models or a loaded pipeline), in
    place, on or off as ``options`` says: calling it again with other options undoes the first.
    ``cpu_offload`` and ``decode_chunk_size`` act on stages: :func:`apply_low_vram_to_pipeline`."""
    unet = _component(components, "unet")
    if unet is None:
        return
    set_feed_forward_chunking(unet, enabled=options.feed_forward_chunking)
    set_split_guidance_batch(unet, enabled=options.split_guidance_batch)


def set_feed_forward_chunking(unet: torch.nn.Module, *, enabled: bool) -> None:
    """Chunk size 1 over dim 0 (diffusers' setting for SVD): any frame count divides it, which a
    larger chunk would not (the temporal blocks chunk over frames)."""
    for module in unet.modules():
        if hasattr(module, "set_chunk_feed_forward"):
            module.set_chunk_feed_forward(chunk_size=1 if enabled else None, dim=0)


def set_split_guidance_batch(unet: torch.nn.Module, *, enabled: bool) -> None:
    """Install (or remove) a ``forward`` that runs a batch one sample at a time. A forward installed
    on the instance before (an ahead-of-time dispatch) moves under the wrapper, and back after."""
    installed = SPLIT_MARK in vars(unet)
    if enabled and not installed:
        below = vars(unet).pop("forward", None)
        if below is not None:
            setattr(unet, INNER_FORWARD_ATTR, below)
        unet.forward = _one_sample_at_a_time(unet)
        setattr(unet, SPLIT_MARK, True)
    elif not enabled and installed:
        del unet.forward
        delattr(unet, SPLIT_MARK)
        below = vars(unet).pop(INNER_FORWARD_ATTR, None)
        if below is not None:
            unet.forward = below


def forward_slot(unet: torch.nn.Module) -> str:
    """The instance attribute a dispatch goes in: under the split wrapper when there is one."""
    return INNER_FORWARD_ATTR if SPLIT_MARK in vars(unet) else "forward"


def _one_sample_at_a_time(unet: torch.nn.Module):
    @functools.wraps(type(unet).forward.__get__(unet))
    def split(sample, timestep, encoder_hidden_states, added_time_ids, return_dict: bool = True):
        forward = vars(unet).get(INNER_FORWARD_ATTR) or type(unet).forward.__get__(unet)  # late: a dispatch may come
        batch = sample.shape[0]
        if batch == 1:
            return forward(sample, timestep, encoder_hidden_states, added_time_ids, return_dict=return_dict)
        per_sample_timestep = torch.is_tensor(timestep) and timestep.ndim > 0 and timestep.shape[0] == batch
        outputs = [
            forward(sample[i : i + 1], timestep[i : i + 1] if per_sample_timestep else timestep,
                    encoder_hidden_states[i : i + 1], added_time_ids[i : i + 1], return_dict=False)[0]
            for i in range(batch)
        ]
        out = torch.cat(outputs)
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_spatio_temporal_condition import UNetSpatioTemporalConditionOutput

        return UNetSpatioTemporalConditionOutput(sample=out)

    return split


# -- stages: offload and the decoder's chunk -------------------------------------------------------


def stage_modules(stage: Any) -> list[torch.nn.Module]:
    """The ``nn.Module`` attributes of a stage object, and those in its dict attributes (the
    text-to-image stage keeps its sub-models in ``components``), each once."""
    if isinstance(stage, OffloadedStage):
        stage = stage.stage
    found: dict[int, torch.nn.Module] = {}
    for value in vars(stage).values():
        candidates = value.values() if isinstance(value, dict) else (value,)
        for candidate in candidates:
            if isinstance(candidate, torch.nn.Module):
                found.setdefault(id(candidate), candidate)
    return list(found.values())


class OffloadedStage:
    """A stage whose models wait in CPU memory and move to ``device`` for each call. Calls of all
    the offloaded stages of one pipeline take turns (one lock), so one stage's weights at most are
    on the GPU. Everything else (attributes, methods) is the wrapped stage's."""

    def __init__(self, stage: Any, *, device: torch.device, lock: threading.Lock) -> None:
        object.__setattr__(self, "stage", stage)
        object.__setattr__(self, "device", device)
        object.__setattr__(self, "_lock", lock)
        for module in stage_modules(stage):
            module.to("cpu")

    def __call__(self, *args, **kwargs):
        modules = stage_modules(self.stage)
        with self._lock:
            for module in modules:
                module.to(self.device)
            try:
                return self.stage(*args, **kwargs)
            finally:
                for module in modules:
                    module.to("cpu")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stage, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.stage, name, value)


def apply_low_vram_to_pipeline(pipeline: Any, options: LowVramOptions, *, device: str | torch.device) -> None:
    """Apply ``options`` to a :class:`~pipelines.staged.StagedPipeline` built on ``device``: the
    U-Net options on the sampler's U-Net, the decoder's default chunk, and (``cpu_offload``)
    every model-holding stage wrapped in :class:`OffloadedStage`. Offload is not undone by a
    second call; build a new pipeline instead."""
    device = torch.device(device)
    for stage in pipeline.stages.values():
        if hasattr(stage, "unet"):
            apply_low_vram({"unet": stage.unet}, options)
        if hasattr(stage, "default_chunk_size"):
            stage.default_chunk_size = options.decode_chunk_size
    if options.cpu_offload:
        lock = threading.Lock()
        for name, stage in list(pipeline.stages.items()):
            if stage_modules(stage) and not isinstance(stage, OffloadedStage):
                pipeline.stages[name] = OffloadedStage(stage, device=device, lock=lock)


# -- peak memory per stage ------------------------------------------------------------------------


@dataclass(frozen=True)
class StagePeak:
    """One stage's memory: the most bytes held during its call, and what was held when it began.

    ``method`` is ``"cuda"`` (``torch.cuda.max_memory_allocated``: tensors through the caching
    allocator, library workspaces included, the CUDA context not) or ``"counted"`` (off CUDA:
    the models' bytes plus the bytes of tensors the call created, live at once; see
    :mod:`.memory_count`)."""

    stage: str
    peak_bytes: int
    start_bytes: int
    method: Literal["cuda", "counted"]

    @property
    def added_bytes(self) -> int:
        """What the call added on top of what was already held (activations and transfers)."""
        return self.peak_bytes - self.start_bytes


def measure_stage_peaks(components: Any, params: Any, device: str | torch.device, *,
                        options: LowVramOptions | None = None, image: Any = None) -> dict[str, StagePeak]:
    """Run one job's GPU stages (image encode, sampling, decode) through a
    :class:`~pipelines.staged.StagedPipeline`'s stage objects and return each one's
    :class:`StagePeak`. The video encode is left out: it holds no GPU memory, and the GPU machine
    may have no ffmpeg.

    ``components`` are the video model's sub-models (a dict or a loaded pipeline) already on
    ``device``, or a built ``StagedPipeline``; ``options`` are applied to them first, in place
    (with ``cpu_offload`` the models move to CPU memory between stages). On CUDA the peaks are
    measured (``max_memory_allocated``, reset before each stage); elsewhere they are counted
    (``method="counted"``), exact for what eager PyTorch keeps alive. ``params`` are resolved
    here; ``image`` defaults to the sample image. Give small params on a CPU."""
    from pipelines.sample_image import draw_sample_image
    from pipelines.staged import StagedPipeline

    device = torch.device(device)
    pipeline = components if isinstance(components, StagedPipeline) else StagedPipeline(components)
    if options is not None:
        apply_low_vram_to_pipeline(pipeline, options, device=device)
    params = params.resolved(pipeline.default_num_frames)
    peaks: dict[str, StagePeak] = {}
    hook = _cuda_peak_hook(device, peaks) if device.type == "cuda" else _counted_peak_hook(pipeline, peaks)
    with hook("image_encode"):
        encoded = pipeline.stages["image_encode"](draw_sample_image() if image is None else image, params)
    with hook("sampling"):
        sampled = pipeline.stages["sampling"](encoded, params)
    del encoded
    with hook("decode"):
        pipeline.stages["decode"](sampled, params)
    return peaks


def _cuda_peak_hook(device: torch.device, peaks: dict[str, StagePeak]):
    @contextlib.contextmanager
    def hook(name: str):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield
        torch.cuda.synchronize(device)
        peaks[name] = StagePeak(name, torch.cuda.max_memory_allocated(device), start, "cuda")

    return hook


def _counted_peak_hook(pipeline: Any, peaks: dict[str, StagePeak]):
    @contextlib.contextmanager
    def hook(name: str):
        modules = [module for stage in pipeline.stages.values() for module in stage_modules(stage)]
        resident = module_bytes(*modules)
        with torch.inference_mode(), LiveTensorBytes(ignore=module_tensors(*modules)) as counter:
            yield
        peaks[name] = StagePeak(name, resident + counter.peak, resident, "counted")

    return hook
