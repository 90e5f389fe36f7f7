"""Reference figures: SVD-XT's shape, the FLOP anchors of the MFU figures, GPU peaks, and the
published timings printed for comparison (none of them measured here)."""

from __future__ import annotations

# -- reference figures ---------------------------------------------------------------------------

#: SVD-XT's shape: 25 frames at 576x1024, i.e. latents 25 x 4 x 72 x 128.
REF_FRAMES, REF_HEIGHT, REF_WIDTH = 25, 576, 1024
#: FLOPs of one classifier-free-guided U-Net step (batch 2) at 25x72x128 latents (FlopCounterMode).
UNET_TFLOP_PER_GUIDED_STEP = 159.9
#: FLOPs of the temporal VAE decoder for 25 frames at 576x1024 (FlopCounterMode: 173.57).
DECODE_TFLOP_REF = 173.6

#: Dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOP/s, matched against the device name.
PEAK_TFLOPS = (
    (r"H100.*PCIE", "H100 PCIe", 756.0),
    (r"H100.*NVL", None, None),  # a different part: ask for --peak-tflops rather than guess
    (r"H100", "H100 SXM", 989.0),
    (r"H200", "H200", 989.0),
    (r"A100", "A100", 312.0),
    (r"\bL4\b", "L4", 121.0),
)

#: Published figures for comparison. Not measured by this script.
PUBLISHED_ANCHORS = (
    {
        "what": "Stability AI TensorRT SVD-XT 1.1, 25 frames, 25 steps, H100 80GB PCIe",
        "seconds_per_video": 22.6,
        "stages": {"unet_x25": 19.1, "vae_decode": 3.4, "clip": 0.09, "vae_encode": 0.05},
        "source": "https://huggingface.co/stabilityai/stable-video-diffusion-img2vid-xt-1-1-tensorrt",
    },
    {
        "what": "Stability AI TensorRT SVD-XT 1.1, 25 frames, 25 steps, A100 80GB SXM",
        "seconds_per_video": 32.2,
        "stages": {"unet_x25": 27.5, "vae_decode": 4.5},
        "source": "https://huggingface.co/stabilityai/stable-video-diffusion-img2vid-xt-1-1-tensorrt",
    },
    {
        "what": "eager PyTorch (diffusers) SVD-XT, 25 frames, 25 steps, A100",
        "seconds_per_video": 51.0,
        "stages": {},
        "source": "figure quoted in issue #2 (approximate; not re-checked here)",
    },
)
