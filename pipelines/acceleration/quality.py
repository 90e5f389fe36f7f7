"""How far an approximate mode (FP8) moves the frames: PSNR and SSIM against a reference clip.

SSIM is the standard single-scale form (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5,
K1 0.01, K2 0.03) on the luma of uint8 frames, averaged over frames; PSNR is over all pixels and
channels. Both in numpy/torch so the GPU machine needs nothing beyond what it has.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def psnr(reference: np.ndarray, frames: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of uint8 ``frames`` against ``reference`` (inf if equal)."""
    _same_shape(reference, frames)
    mse = float(np.mean((reference.astype(np.float64) - frames.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim(reference: np.ndarray, frames: np.ndarray) -> float:
    """Mean SSIM of the luma of [F, H, W, 3] uint8 frames against ``reference`` (1.0 if equal)."""
    _same_shape(reference, frames)
    x, y = (_luma(torch.from_numpy(np.ascontiguousarray(a))) for a in (reference, frames))
    window = _gaussian_window(11, 1.5)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_x, mu_y = F.conv2d(x, window), F.conv2d(y, window)
    sxx = F.conv2d(x * x, window) - mu_x**2
    syy = F.conv2d(y * y, window) - mu_y**2
    sxy = F.conv2d(x * y, window) - mu_x * mu_y
    value = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return float(value.mean())


def _same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"need two [F, H, W, 3] clips of one shape, got {a.shape} and {b.shape}")


def _luma(frames: torch.Tensor) -> torch.Tensor:
    rgb = frames.double()
    return (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]).unsqueeze(1)  # [F, 1, H, W]


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]
