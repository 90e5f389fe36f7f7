"""The Stable Video Diffusion pipeline as four stages with declared inputs and outputs.

This follows ``diffusers.StableVideoDiffusionPipeline.__call__`` (diffusers 0.42) step for step,
split where the model is split (``model_cpu_offload_seq = "image_encoder->unet->vae"``) plus a
CPU-only video encode stage. Each stage holds only the sub-models it needs, so each can live in
its own process on its own GPU share; what crosses a boundary is a small dataclass
(:mod:`pipelines.payloads`).

What crosses each boundary, for SVD-XT at 576x1024, 25 frames, fp16 (see docs/pipeline.md):

=================  =====================================================  ==============
boundary           payload                                                size
=================  =====================================================  ==============
encode -> sample   CLIP embedding [1,1,1024] + image latent [1,4,72,128]   ~76 KB
                   + CPU RNG state (5 KB)
sample -> decode   final latents [1,25,4,72,128]                          ~1.8 MB
decode -> video    uint8 frames [25,576,1024,3]                           ~44 MB
video -> storage   H.264 MP4                                              ~1-3 MB
=================  =====================================================  ==============

Reproducing diffusers exactly requires its random draw order: the noise that augments the
conditioning image is drawn first, the initial latents second, both from one generator. The
generator is a CPU generator (device-independent results) whose state after the first draw is
handed from the encode stage to the sampler.
"""

from __future__ import annotations

import inspect
import io
from typing import Callable, Iterator, Protocol

import numpy as np
import PIL.Image
import torch
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
    _resize_with_antialiasing,  # pinned diffusers==0.42.1; reused so the CLIP input matches bit for bit
)
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

from .errors import InvalidInputError, JobCancelledError
from .interpolate import retime
from .params import GenerationParams, OutputFormat
from .payloads import DecodedFrames, EncodedImage, EncodedVideo, SampledLatents, to_host  # noqa: F401 - re-exported
from .segments import stitch_segments
from .video import H264_CODEC_CHOICES, encode_video, resolve_codec

ProgressCallback = Callable[[int, int], None]
"""Called after every sampling step with (steps_done, total_steps)."""

CancelCheck = Callable[[], bool]
"""Called before every sampling step; returning True stops the job with JobCancelledError."""


def _require_resolved(params: GenerationParams) -> None:
    if params.seed is None or params.num_frames is None:
        raise ValueError("params must be resolved first: call GenerationParams.resolved(default_num_frames)")


def _module_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(module.parameters())
    return parameter.device, parameter.dtype


# -- stage 1: image encode --------------------------------------------------------------------


class ImageEncodeStage:
    """CLIP image embedding + VAE latent of the noise-augmented conditioning image.

    Inputs: an RGB ``PIL.Image`` and resolved :class:`GenerationParams` (seed, width, height,
    noise_aug_strength). Output: :class:`EncodedImage`.
    """

    def __init__(self, *, image_encoder, feature_extractor, vae) -> None:
        self.image_encoder = image_encoder
        self.feature_extractor = feature_extractor
        self.vae = vae
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.video_processor = VideoProcessor(do_resize=True, vae_scale_factor=self.vae_scale_factor)

    @torch.inference_mode()
    def __call__(self, image: PIL.Image.Image, params: GenerationParams) -> EncodedImage:
        _require_resolved(params)
        if not isinstance(image, PIL.Image.Image):
            raise InvalidInputError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
        width, height = params.size
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise InvalidInputError(
                f"width and height must be multiples of {self.vae_scale_factor}, got {width}x{height}"
            )
        clip_device, clip_dtype = _module_device_dtype(self.image_encoder)
        vae_device, vae_dtype = _module_device_dtype(self.vae)

        # 1. CLIP embedding: normalise to [-1, 1] before the antialiased resize to 224, as the original code does.
        pixels = self.video_processor.numpy_to_pt(self.video_processor.pil_to_numpy(image))
        pixels = _resize_with_antialiasing(pixels * 2.0 - 1.0, (224, 224))
        pixels = (pixels + 1.0) / 2.0
        clip_input = self.feature_extractor(
            images=pixels, do_normalize=True, do_center_crop=False, do_resize=False, do_rescale=False, return_tensors="pt"
        ).pixel_values
        image_embeddings = self.image_encoder(clip_input.to(clip_device, clip_dtype)).image_embeds.unsqueeze(1)

        # 2. Noise augmentation: the first random draw of the job.
        generator = torch.Generator("cpu").manual_seed(params.seed)
        conditioning = self.video_processor.preprocess(image, height=height, width=width).to(vae_device)
        first_frame = None
        if params.keeps_conditioning_frame:  # the image as the clip will show it (exact for same-size input)
            first_frame = ((conditioning[0].float().cpu() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
            first_frame = first_frame.permute(1, 2, 0).numpy()
        noise = randn_tensor(conditioning.shape, generator=generator, device=vae_device, dtype=conditioning.dtype)
        conditioning = conditioning + params.noise_aug_strength * noise

        # 3. VAE latent of the augmented image (fp16 VAEs with force_upcast encode in fp32, as diffusers does).
        upcast = vae_dtype == torch.float16 and self.vae.config.force_upcast
        encode_dtype = torch.float32 if upcast else vae_dtype
        with _vae_in_dtype(self.vae, encode_dtype):
            image_latents = self.vae.encode(conditioning.to(vae_device, encode_dtype)).latent_dist.mode()

        return EncodedImage(
            image_embeddings=image_embeddings,
            image_latents=image_latents.to(image_embeddings.dtype),
            generator_state=generator.get_state(),
            first_frame=first_frame,
        )


class _vae_in_dtype:
    """Temporarily cast a VAE (diffusers' upcast dance); a no-op when the dtype already matches."""

    def __init__(self, vae, dtype: torch.dtype) -> None:
        self.vae, self.dtype, self.original = vae, dtype, vae.dtype

    def __enter__(self):
        if self.dtype != self.original:
            self.vae.to(dtype=self.dtype)

    def __exit__(self, *exc):
        if self.dtype != self.original:
            self.vae.to(dtype=self.original)


# -- stage 2: U-Net sampling ------------------------------------------------------------------


class SamplingStage:
    """Euler sampling with classifier-free guidance ramped per frame from min to max guidance.

    Inputs: :class:`EncodedImage` and resolved params (num_frames, num_inference_steps, fps,
    motion_bucket_id, noise_aug_strength, min/max_guidance_scale). Output: :class:`SampledLatents`.

    The scheduler is created fresh for every call from the loaded config: Euler schedulers keep
    per-run state (timesteps, step index), so sharing one instance between concurrent requests
    corrupts both (diffusers issues #3672, #7851).
    """

    def __init__(self, *, unet, scheduler) -> None:
        self.unet = unet
        self.default_num_frames = int(unet.config.num_frames)
        self.scheduler_class = type(scheduler)
        self.scheduler_config = scheduler.config

    def new_scheduler(self):
        return self.scheduler_class.from_config(self.scheduler_config)

    @torch.inference_mode()
    def __call__(
        self,
        encoded: EncodedImage,
        params: GenerationParams,
        *,
        on_step: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> SampledLatents:
        _require_resolved(params)
        device, dtype = _module_device_dtype(self.unet)
        num_frames = params.num_frames
        do_cfg = params.max_guidance_scale > 1.0
        scheduler = self.new_scheduler()

        # 1. Conditioning, with zeroed unconditional halves for classifier-free guidance.
        embeddings = encoded.image_embeddings.to(device, dtype)
        image_latents = encoded.image_latents.to(device, dtype)
        if do_cfg:
            embeddings = torch.cat([torch.zeros_like(embeddings), embeddings])
            image_latents = torch.cat([torch.zeros_like(image_latents), image_latents])
        image_latents = image_latents.unsqueeze(1).repeat(1, num_frames, 1, 1, 1)

        # 2. Added time ids: SVD was trained on fps - 1.
        added_time_ids = self._added_time_ids(params, dtype, batch=2 if do_cfg else 1).to(device)

        # 3. Timesteps, then the initial latents: the job's second random draw.
        scheduler.set_timesteps(params.num_inference_steps, device=device)
        timesteps = scheduler.timesteps
        generator = torch.Generator("cpu")
        generator.set_state(encoded.generator_state)
        latent_shape = (1, num_frames, self.unet.config.in_channels // 2, *encoded.image_latents.shape[-2:])
        latents = randn_tensor(latent_shape, generator=generator, device=device, dtype=dtype)
        latents = latents * scheduler.init_noise_sigma

        # 4. Per-frame guidance scale, [1, F, 1, 1, 1].
        guidance = torch.linspace(params.min_guidance_scale, params.max_guidance_scale, num_frames).unsqueeze(0)
        guidance = guidance.to(device, latents.dtype)[..., None, None, None]

        # 5. Denoising loop.
        total = len(timesteps)
        for index, timestep in enumerate(timesteps):
            if should_cancel is not None and should_cancel():
                raise JobCancelledError(f"cancelled before sampling step {index + 1} of {total}")
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            model_input = scheduler.scale_model_input(model_input, timestep)
            model_input = torch.cat([model_input, image_latents], dim=2)
            noise_pred = self.unet(
                model_input, timestep, encoder_hidden_states=embeddings, added_time_ids=added_time_ids, return_dict=False
            )[0]
            if do_cfg:
                noise_uncond, noise_cond = noise_pred.chunk(2)
                noise_pred = noise_uncond + guidance * (noise_cond - noise_uncond)
            latents = scheduler.step(noise_pred, timestep, latents).prev_sample
            if on_step is not None:
                on_step(index + 1, total)
        return SampledLatents(latents=latents, first_frame=encoded.first_frame)

    def total_steps(self, params: GenerationParams) -> int:
        return params.num_inference_steps

    def _added_time_ids(self, params: GenerationParams, dtype: torch.dtype, *, batch: int) -> torch.Tensor:
        values = [params.fps - 1, params.motion_bucket_id, params.noise_aug_strength]
        expected = self.unet.add_embedding.linear_1.in_features
        if self.unet.config.addition_time_embed_dim * len(values) != expected:
            raise ValueError(
                f"the U-Net expects an added time embedding of length {expected}, "
                f"but its config gives {self.unet.config.addition_time_embed_dim * len(values)}"
            )
        return torch.tensor([values], dtype=dtype).repeat(batch, 1)


# -- stage 3: VAE decode ----------------------------------------------------------------------


class DecodeStage:
    """VAE temporal decoder, ``decode_chunk_size`` frames at a time. Output: uint8 frames, the
    first replaced by the conditioning image when the pass must open on it exactly.

    The frames become ``uint8`` on the decoder's device, chunk by chunk, with the float32 math of
    :meth:`decode_float` followed by ``* 255``, round half to even and the cast: the same bytes as
    converting on the host, but a quarter of the bytes cross to it (44 MB for SVD-XT's 25 frames
    at 576x1024, not 177 MB of float32), through pinned memory on CUDA."""

    def __init__(self, *, vae) -> None:
        self.vae = vae
        self._accepts_num_frames = "num_frames" in inspect.signature(vae.forward).parameters
        self.memory_budget_bytes: int | None = None
        """GPU memory one decode may use; set by the serving replica (its GPU share less what it
        holds, over its concurrent requests), else measured once at the first decode."""
        self.default_chunk_size: int | None = None
        """Frames per decoder call for requests that leave ``decode_chunk_size`` out; None sizes
        it from the memory budget. Set by a deployment that wants the same pixels on every GPU
        size (:mod:`pipelines.acceleration.lowvram`)."""

    def chunk_size(self, params: GenerationParams, *, height: int, width: int) -> int:
        """The request's ``decode_chunk_size``, else the stage's ``default_chunk_size``, else the
        most frames the GPU memory budget fits.

        The budget is fixed per replica, never the memory free at the moment: the temporal decoder
        mixes the frames of a chunk, so the chunk size shapes the pixels, and the same request must
        make the same clip on every run."""
        if params.decode_chunk_size is not None:
            return params.decode_chunk_size
        if self.default_chunk_size is not None:
            return self.default_chunk_size
        device, dtype = _module_device_dtype(self.vae)
        if device.type != "cuda":
            return DEFAULT_DECODE_CHUNK
        if self.memory_budget_bytes is None:
            total = torch.cuda.get_device_properties(device).total_memory
            self.memory_budget_bytes = max(0, total - torch.cuda.memory_allocated(device))
        return auto_decode_chunk_size(free_bytes=self.memory_budget_bytes, height=height, width=width,
                                      bytes_per_element=torch.finfo(dtype).bits // 8)

    def _frames_on_device(self, sampled: SampledLatents, params: GenerationParams) -> Iterator[torch.Tensor]:
        """Each decoder chunk's frames on the VAE's device: float32 in [0, 1], [n, 3, H, W]."""
        _require_resolved(params)
        device, dtype = _module_device_dtype(self.vae)
        latents = sampled.latents.to(device, dtype).flatten(0, 1) / self.vae.config.scaling_factor
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        chunk_size = self.chunk_size(params, height=latents.shape[-2] * factor, width=latents.shape[-1] * factor)
        for start in range(0, latents.shape[0], chunk_size):
            chunk = latents[start : start + chunk_size]
            kwargs = {"num_frames": chunk.shape[0]} if self._accepts_num_frames else {}
            frames = self.vae.decode(chunk, **kwargs).sample.float()
            yield (frames / 2 + 0.5).clamp(0, 1)

    @torch.inference_mode()
    def decode_float(self, sampled: SampledLatents, params: GenerationParams) -> np.ndarray:
        """Frames as float32 in [0, 1], [F, H, W, 3]: diffusers' ``output_type="np"`` (the parity
        tests compare this with diffusers)."""
        frames = torch.cat(list(self._frames_on_device(sampled, params)))  # [F, 3, H, W]
        return frames.permute(0, 2, 3, 1).cpu().numpy()

    @torch.inference_mode()
    def decode_uint8(self, sampled: SampledLatents, params: GenerationParams) -> np.ndarray:
        """Frames as uint8, [F, H, W, 3] (C-contiguous), converted on the decoder's device."""
        # Per chunk: only one chunk's float32 frames exist at a time, never all of them.
        chunks = [frames_to_uint8(frames) for frames in self._frames_on_device(sampled, params)]
        return _to_host_array(torch.cat(chunks))

    def __call__(self, sampled: SampledLatents, params: GenerationParams) -> DecodedFrames:
        frames = self.decode_uint8(sampled, params)
        if sampled.first_frame is not None:
            frames[0] = sampled.first_frame
        return DecodedFrames(frames=frames)


def frames_to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """float32 frames in [0, 1], [n, 3, H, W] -> uint8 [n, H, W, 3], on their device: ``* 255``
    then round half to even, as numpy's ``round`` on the host (both IEEE float32, so the same bytes)."""
    return (frames * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def _to_host_array(tensor: torch.Tensor) -> np.ndarray:
    """A device tensor as a writable numpy array. From CUDA through a pinned buffer (torch's
    caching host allocator reuses it), about twice the bandwidth of a pageable copy."""
    if tensor.device.type != "cuda":
        return tensor.cpu().numpy()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return host.numpy()


#: Frames decoded at once when no GPU memory figure applies (diffusers' own example value).
DEFAULT_DECODE_CHUNK = 8
#: Peak decoder activation memory per output pixel and frame, in elements: 1.125 GiB per 576x1024
#: frame in fp16/bf16. Counted on the meta device (pipelines/acceleration/memory_count.py: 2048.1
#: bytes per pixel, at the last up block's temporal ResNet) and in line with the H200 measurement
#: of issue #15 (decode chunk 8 vs 25: 13 vs 32 GiB peak, 1.12 GiB per extra frame). And the share
#: of the budget used.
DECODE_ELEMENTS_PER_PIXEL = 1024
DECODE_MEMORY_SHARE = 0.8


def auto_decode_chunk_size(*, free_bytes: int, height: int, width: int, bytes_per_element: int = 2,
                           most: int = 64) -> int:
    """Frames per decoder call that fit in ``DECODE_MEMORY_SHARE`` of ``free_bytes``: at least 1."""
    per_frame = height * width * DECODE_ELEMENTS_PER_PIXEL * bytes_per_element
    return max(1, min(most, int(free_bytes * DECODE_MEMORY_SHARE // per_frame)))


# -- stage 4: video encode --------------------------------------------------------------------


class VideoEncodeStage:
    """uint8 frames -> MP4 (H.264), WebM (VP9) or GIF at the output frame rate.

    A long clip arrives as one :class:`DecodedFrames` per segment: they are joined first
    (:func:`~pipelines.segments.stitch_segments`). With interpolation (``blend``/``mci``) the
    generated frames are then retimed to span the clip's duration at ``output_fps``
    (:func:`~pipelines.interpolate.retime`); without, they play as they are at ``output_fps``.

    ``h264_codec`` picks the MP4 encoder: ``auto`` (NVENC where this process can use it, else
    libx264), ``libx264`` or ``h264_nvenc``; WebM and GIF always use their CPU encoders.
    ``h264_nvenc`` where NVENC does not work is a ``ValueError`` when the stage is built, not a
    failure of every job; ``auto`` is resolved at the first MP4, once per process
    (:func:`pipelines.video.resolve_codec`), so building the stage needs no ffmpeg.
    """

    def __init__(self, *, h264_codec: str = "auto") -> None:
        if h264_codec not in H264_CODEC_CHOICES:
            raise ValueError(f"h264_codec must be one of {', '.join(H264_CODEC_CHOICES)}, got {h264_codec!r}")
        if h264_codec != "auto":
            resolve_codec(OutputFormat.mp4, h264_codec)
        self.h264_codec = h264_codec

    @property
    def mp4_encoder(self) -> str:
        """The encoder MP4 clips get here: ``libx264`` or ``h264_nvenc``."""
        return resolve_codec(OutputFormat.mp4, self.h264_codec)

    def codec_for(self, output_format: OutputFormat) -> str:
        """What ``encode_video`` is asked for (``auto`` keeps its per-clip fallback to libx264)."""
        return self.h264_codec if output_format is OutputFormat.mp4 else "auto"

    def __call__(self, decoded: DecodedFrames | list[DecodedFrames], params: GenerationParams) -> EncodedVideo:
        frames = join_segments(decoded, params)
        fps = params.resolved_output_fps
        if params.interpolates:
            frames = retime(frames, duration_s=clip_duration_s(params, generated_frames=len(frames)),
                            output_fps=fps, mode=params.resolved_interpolation)
        data = encode_video(frames, fps=fps, output_format=params.output_format,
                            codec=self.codec_for(params.output_format))
        count, height, width, _ = frames.shape
        return EncodedVideo(
            data=data,
            content_type=params.output_format.content_type,
            file_extension=params.output_format.value,
            num_frames=count,
            width=width,
            height=height,
            fps=fps,
            poster=_jpeg(frames[0]),
        )


def join_segments(decoded: DecodedFrames | list[DecodedFrames], params: GenerationParams) -> np.ndarray:
    """One clip's generated frames: a single pass as it is, segments stitched at their seams."""
    if isinstance(decoded, DecodedFrames):
        return decoded.frames
    if len(decoded) == 1:
        return decoded[0].frames
    return stitch_segments([segment.frames for segment in decoded], overlap_frames=params.overlap_frames)


def clip_duration_s(params: GenerationParams, *, generated_frames: int) -> float:
    """What the generated frames span: ``duration_s``, else one frame interval per ``fps``."""
    if params.duration_s is not None:
        return float(params.duration_s)
    return (generated_frames - 1) / params.fps


def _jpeg(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(frame).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class SVDComponents(Protocol):
    """What the stages need from a loaded model (a ``StableVideoDiffusionPipeline`` satisfies it)."""

    image_encoder: torch.nn.Module
    feature_extractor: object
    vae: torch.nn.Module
    unet: torch.nn.Module
    scheduler: object
