"""What crosses the stage boundaries: one small dataclass per boundary (pipelines/stages.py).

Sizes for SVD-XT at 576x1024, 25 frames, fp16 are in pipelines/stages.py and docs/pipeline.md.
Each payload but the last has ``nbytes()``; :func:`to_host` moves its tensors to the CPU (what
leaves a GPU replica).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class EncodedImage:
    """Output of the image encode stage, input of the sampler."""

    image_embeddings: torch.Tensor
    """Conditional CLIP image embedding, [1, 1, D] (D = 1024 for SVD)."""
    image_latents: torch.Tensor
    """VAE latent (distribution mode) of the noise-augmented conditioning image, [1, 4, H/8, W/8]."""
    generator_state: torch.Tensor
    """CPU generator state after the image-noise draw; the sampler continues from it."""
    first_frame: np.ndarray | None = None
    """The conditioning image as uint8 [H, W, 3] at the clip's size, when the pass must open on it
    exactly (``params.keeps_conditioning_frame``); the decoder puts it in place of frame 0."""

    def nbytes(self) -> int:
        extra = 0 if self.first_frame is None else int(self.first_frame.nbytes)
        return extra + sum(t.numel() * t.element_size()
                           for t in (self.image_embeddings, self.image_latents, self.generator_state))


@dataclass
class SampledLatents:
    """Output of the sampler, input of the decoder: the denoised latents, [1, F, 4, H/8, W/8]."""

    latents: torch.Tensor
    first_frame: np.ndarray | None = None
    """Passed through from :class:`EncodedImage` for the decoder."""

    def nbytes(self) -> int:
        extra = 0 if self.first_frame is None else int(self.first_frame.nbytes)
        return extra + self.latents.numel() * self.latents.element_size()


@dataclass
class DecodedFrames:
    """Output of the decoder, input of the video encoder: uint8 RGB frames, [F, H, W, 3]."""

    frames: np.ndarray

    def nbytes(self) -> int:
        return int(self.frames.nbytes)


@dataclass
class EncodedVideo:
    """Output of the video encode stage."""

    data: bytes
    content_type: str
    file_extension: str
    num_frames: int
    width: int
    height: int
    fps: int
    poster: bytes = b""
    """The first frame as a JPEG (the clip's thumbnail), made from the frames, not from the lossy clip."""


def to_host(payload):
    """A stage payload with every tensor field moved to the CPU: what leaves a GPU replica."""
    if not dataclasses.is_dataclass(payload):
        return payload
    moved = {f.name: getattr(payload, f.name).cpu() for f in dataclasses.fields(payload)
             if isinstance(getattr(payload, f.name), torch.Tensor)}
    return dataclasses.replace(payload, **moved) if moved else payload
