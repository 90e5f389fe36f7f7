"""How one stage's networks run: compile mode and scope, the shape policy, attention, memory
format, FP8. Exact by default: nothing here changes the steps or caches activations; FP8 is the
one approximate option and is off unless asked for.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, model_validator


class CompileMode(str, Enum):
    """``torch.compile`` modes (``none`` runs eagerly). The ``reduce-overhead`` and ``max-autotune``
    modes add CUDA graphs: one graph per shape, held in GPU memory; they pay where kernel launch
    time is a visible share of a step (small shapes, small GPUs' fast kernels), not for SVD-XT at
    576x1024, whose U-Net step is ~0.45 s of large kernels on an H100/H200."""

    NONE = "none"
    DEFAULT = "default"
    REDUCE_OVERHEAD = "reduce-overhead"
    MAX_AUTOTUNE = "max-autotune"
    MAX_AUTOTUNE_NO_CUDAGRAPHS = "max-autotune-no-cudagraphs"


class CompileEngine(str, Enum):
    """How a compiled network is made and reused.

    ``jit``: ``torch.compile`` in the replica; the compile cache pre-fills Inductor's caches, but
    dynamo still traces the network in every new process (minutes at full size).
    ``aot``: ``torch.export`` + AOTInductor, one package per warm-up call signature, compiled once
    (by ``svd-serve warm-cache`` or the first replica) and loaded by every later replica from the
    compile cache with no trace and no compile; weights stay the replica's own. Full scope and
    static shapes only; calls of other shapes, and calls with a LoRA adapter, run eagerly."""

    JIT = "jit"
    AOT = "aot"


class CompileScope(str, Enum):
    """What is compiled: the whole network (fastest, longest compile) or its repeated blocks one
    class at a time (each block class compiles once per distinct shape, so compile time falls
    several-fold; the fusions across block boundaries are lost)."""

    FULL = "full"
    REGIONAL = "regional"


class ShapePolicy(str, Enum):
    """Shapes that were not warmed up.

    ``static``: every warm-up shape gets its own static graph; any other shape runs eagerly (same
    numbers, eager speed) rather than stalling its request for a minutes-long compile.
    ``dynamic``: one graph with symbolic frame/height/width dimensions covers every shape (compiled
    once at warm-up; a little slower per step than static graphs, and CUDA-graph modes still
    record one graph per shape)."""

    STATIC = "static"
    DYNAMIC = "dynamic"


class AttentionBackend(str, Enum):
    """Attention kernels. ``sdpa`` lets PyTorch pick (flash, cuDNN, memory-efficient); the named
    ones pin ``torch.nn.attention.sdpa_kernel`` to one backend; ``default`` keeps diffusers'
    processors as loaded."""

    DEFAULT = "default"
    SDPA = "sdpa"
    FLASH = "flash"
    CUDNN = "cudnn"
    EFFICIENT = "efficient"
    MATH = "math"


class StageAcceleration(BaseModel):
    """Per-stage execution options (the serve config's ``stages.<name>.acceleration``)."""

    model_config = ConfigDict(extra="forbid")

    compile: CompileMode = Field(default=CompileMode.NONE, description=(
        "torch.compile mode for the stage's main network (sampling: the U-Net; decode: the VAE "
        "decoder; image_encode: the CLIP image encoder). 'none' runs eagerly."))
    engine: CompileEngine = Field(default=CompileEngine.JIT, description=(
        "'jit': torch.compile at replica start (the compile cache saves Inductor's work, dynamo "
        "still traces); 'aot': ahead-of-time packages loaded from the compile cache (a warm start "
        "compiles nothing). 'aot' needs scope 'full', shape_policy 'static', warmup on, and no "
        "CUDA-graph mode."))
    scope: CompileScope = Field(default=CompileScope.FULL, description=(
        "'full' compiles the whole network; 'regional' compiles its repeated blocks (much shorter "
        "compile, a little less speed)."))
    shape_policy: ShapePolicy = Field(default=ShapePolicy.STATIC, description=(
        "Shapes not covered by warm-up: 'static' runs them eagerly, 'dynamic' compiles one graph "
        "with symbolic sizes that serves every shape."))
    attention: AttentionBackend = Field(default=AttentionBackend.SDPA, description=(
        "Attention kernels: 'sdpa' (PyTorch picks), one pinned SDPA backend, or 'default' "
        "(diffusers' processors as loaded)."))
    channels_last: bool = Field(default=False, description=(
        "Convolution weights and activations in channels_last (3-D convs: channels_last_3d). "
        "Measured slower for the SVD U-Net in eager mode on an H200; may help compiled."))
    fp8: bool = Field(default=False, description=(
        "APPROXIMATE. Sampling only: the U-Net's transformer linears in float8 (e4m3, per-row "
        "dynamic scales for activations, per-channel for weights) through torch._scaled_mm. Needs "
        "a GPU with FP8 tensor cores (compute capability 8.9+: L4, L40, H100, H200) or a CPU. "
        "Output differs from bf16: see docs/benchmarks.md for PSNR/SSIM."))
    cache_dir: str | None = Field(default=None, description=(
        "Where compiled artifacts are kept and reused across replicas and restarts: a directory "
        "(a shared volume) or s3://bucket/prefix. None: the replica compiles from scratch."))
    warmup: bool = Field(default=True, description=(
        "Compile at replica start for the deployment's warm-up shapes, before the replica reports "
        "ready. False compiles on the first request of each shape (minutes at full size)."))

    @model_validator(mode="after")
    def _check(self) -> "StageAcceleration":
        compiled = self.compile is not CompileMode.NONE
        if not compiled and self.scope is not CompileScope.FULL:
            raise ValueError("scope 'regional' needs a compile mode other than 'none'")
        if not compiled and self.shape_policy is not ShapePolicy.STATIC:
            raise ValueError("shape_policy 'dynamic' needs a compile mode other than 'none'")
        if not compiled and self.cache_dir is not None:
            raise ValueError("cache_dir is only used when compile is not 'none'")
        if self.cache_dir is not None and not self.cache_dir.strip():
            raise ValueError("cache_dir must not be empty")
        if self.engine is CompileEngine.AOT:
            self._check_aot(compiled)
        return self

    def _check_aot(self, compiled: bool) -> None:
        if not compiled:
            raise ValueError("engine 'aot' needs a compile mode other than 'none'")
        if self.compile in (CompileMode.REDUCE_OVERHEAD, CompileMode.MAX_AUTOTUNE):
            raise ValueError(f"engine 'aot' does not record CUDA graphs: compile {self.compile.value!r} needs engine "
                             "'jit' (use 'default' or 'max-autotune-no-cudagraphs')")
        if self.scope is not CompileScope.FULL:
            raise ValueError("engine 'aot' compiles whole networks: scope must be 'full'")
        if self.shape_policy is not ShapePolicy.STATIC:
            raise ValueError("engine 'aot' compiles the warm-up shapes only: shape_policy must be 'static'")
        if not self.warmup:
            raise ValueError("engine 'aot' builds its packages from the warm-up calls: warmup must be true")

    @property
    def compiled(self) -> bool:
        return self.compile is not CompileMode.NONE


class WarmupShape(BaseModel):
    """One request shape a replica compiles for at start (all sizes in pixels)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    width: int = Field(ge=64, le=4096, multiple_of=8, description="Frame width in pixels.")
    height: int = Field(ge=64, le=4096, multiple_of=8, description="Frame height in pixels.")
    num_frames: int = Field(ge=1, le=128, description="Frames generated in one pass (one segment).")
    decode_chunk_size: int | None = Field(default=None, ge=1, le=128, description=(
        "Frames per VAE decoder call; None: the replica's own choice for this shape."))

    def label(self) -> str:
        chunk = f"/chunk {self.decode_chunk_size}" if self.decode_chunk_size else ""
        return f"{self.width}x{self.height}x{self.num_frames}{chunk}"


class LowVramOptions(BaseModel):
    """What a deployment does to fit a smaller GPU. Every default is off: full speed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    feed_forward_chunking: bool = Field(
        default=False,
        description="Run the U-Net's feed-forward layers one image (spatial blocks) and one frame (temporal blocks) "
        "at a time: SVD-XT's U-Net activations at 576x1024x25 fall from 7.7 to 4.4 GiB. Exact.",
    )
    split_guidance_batch: bool = Field(
        default=False,
        description="Run the unconditional and conditional halves of classifier-free guidance through the U-Net one "
        "after the other instead of as a batch of two: half the U-Net's activations. Exact.",
    )
    cpu_offload: bool = Field(
        default=False,
        description="Single process only (CLI, demo, text-to-image + video on one GPU): keep each stage's models in CPU "
        "memory and move them to the GPU for that stage's call only. Costs one transfer of each model per job. Exact.",
    )
    decode_chunk_size: int | None = Field(
        default=None, ge=1, le=64,
        description="Frames per VAE decoder call for requests that do not give decode_chunk_size. None: sized from the "
        "decoder's GPU memory budget (1.125 GiB per 576x1024 frame in bf16). The chunk shapes the pixels (the "
        "temporal decoder mixes the frames of a chunk): set it to make the same clip on every GPU size.",
    )

    @property
    def enabled(self) -> tuple[str, ...]:
        """Names of the options that are on (for logs and the benchmark's labels)."""
        return tuple(name for name, value in self.model_dump().items() if value not in (False, None))
