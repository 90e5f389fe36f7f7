"""Peak memory of a model call, counted rather than measured: the bytes of every tensor the call
creates, live at once, at their worst moment.

:class:`LiveTensorBytes` is a ``TorchDispatchMode``: every ATen op's outputs pass through it. A
storage first seen there is added to the live total (its ``nbytes``); a weak reference on each
tensor that uses it takes it off when the last one dies. Storages that existed before (weights,
the call's inputs) are passed in as ``ignore`` and never counted. On the ``meta`` device nothing
is allocated and nothing computed, so the full-size SVD-XT architecture
(:func:`svd_architecture`) is counted at 576x1024 in about a second on a CPU.

What the count is, and what it is not:

* It is what eager PyTorch keeps alive, op by op, under ``torch.inference_mode()`` (no autograd
  graph): the same set of tensors CUDA's caching allocator holds, because the caching allocator
  frees a block when its last tensor dies, as here.
* It leaves out what the allocator adds (blocks rounded up to 512 bytes, 2 MiB segments,
  fragmentation), library workspaces (cuDNN convolution and cuBLAS workspaces: tens to hundreds
  of MiB) and the CUDA context (300-500 MiB, outside ``max_memory_allocated`` anyway).
* ``scaled_dot_product_attention`` is counted as one op (its output): what the fused kernels
  (flash, cuDNN, memory-efficient) hold. The math fallback, which materialises the score matrix,
  is not what a CUDA GPU runs for fp16/bf16.

On the H200 the issue measured decode chunk 8 vs 25 at 13 vs 32 GiB peak: 1.12 GiB for each
extra frame. The count gives 1.125 GiB per frame (2048 bytes per output pixel in bf16), so the
count and the allocator agree where it matters.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages created while it is active: ``current`` and ``peak``."""

    def __init__(self, *, ignore: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self._ignored = {_storage_key(tensor) for tensor in ignore}
        self._live: dict[int, list[int]] = {}  # storage -> [nbytes, tensors using it]
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self._live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            key = _storage_key(tensor)
            if key in self._ignored:
                continue
            entry = self._live.get(key)
            if entry is None:
                entry = self._live[key] = [tensor.untyped_storage().nbytes(), 0]
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(tensor, self._release, key)
        return out


def module_tensors(*modules: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of the modules (what a count must not take for activations)."""
    return [tensor for module in modules for tensor in (*module.parameters(), *module.buffers())]


def module_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the modules' parameters and buffers (shared ones once)."""
    seen: dict[int, int] = {}
    for tensor in module_tensors(*modules):
        seen[_storage_key(tensor)] = tensor.untyped_storage().nbytes()
    return sum(seen.values())


def count_peak_bytes(call: Callable[[], Any], *, ignore: Iterable[torch.Tensor] = ()) -> int:
    """The most bytes of tensors created by ``call()`` that were alive at once (its result
    included while it lasts; it is dropped before returning)."""
    with torch.inference_mode(), LiveTensorBytes(ignore=ignore) as counter:
        result = call()
        del result
    return counter.peak


# -- the full-size architectures, on any device (``meta``: nothing allocated) --------------------

#: The models the low-VRAM table covers: SVD-XT (25 frames) and SVD (14 frames) share one
#: architecture; only the U-Net's default frame count differs.
SVD_MODELS = {"svd-xt": 25, "svd": 14}


def svd_architecture(model: str, *, device: str | torch.device = "meta",
                     dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.nn.Module]:
    """``unet``, ``vae`` and ``image_encoder`` of ``model`` (a :data:`SVD_MODELS` key) with
    random weights: the configs of stabilityai's SVD / SVD-XT checkpoints."""
    if model not in SVD_MODELS:
        raise ValueError(f"unknown model {model!r}: choose one of {', '.join(SVD_MODELS)}")
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    def finish(module: torch.nn.Module) -> torch.nn.Module:
        # .to(device) too: a few parameters are made with the legacy constructor, which ignores
        # the default device.
        return module.to(device=device, dtype=dtype).eval().requires_grad_(False)

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "modules to keep in float32: []" on every cast
    try:
        with torch.device(device):
            unet = finish(UNetSpatioTemporalConditionModel(num_frames=SVD_MODELS[model]))
            vae = finish(AutoencoderKLTemporalDecoder(
                in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                sample_size=768, scaling_factor=0.18215, force_upcast=True,
            ))
            image_encoder = finish(CLIPVisionModelWithProjection(CLIPVisionConfig(  # ViT-H/14
                hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu", attn_implementation="sdpa",
            )))
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return {"unet": unet, "vae": vae, "image_encoder": image_encoder}
