"""Opt-in, APPROXIMATE float8 linears for the U-Net (``StageAcceleration.fp8``).

Each selected ``nn.Linear`` becomes a :class:`Float8Linear`: weights quantised once to e4m3 with
one scale per output channel, activations quantised per call with one scale per row (dynamic
"rowwise" scaling), multiplied by ``torch._scaled_mm`` on FP8 tensor cores with float32
accumulation, output in the activation dtype. Convolutions stay in bf16 (torch has no scaled FP8
convolution). Selected: the linears inside the U-Net's transformer blocks (attention
projections and feed-forwards), the large matmuls; the time-embedding linears run on 2 rows, where
quantising costs more than it saves. Quality against bf16 on the same seed is measured by
``benchmarks/bench_pipeline.py --fp8`` (PSNR/SSIM of decoded frames) and recorded in
docs/benchmarks.md.
"""

from __future__ import annotations

import torch

#: Largest finite e4m3 value.
E4M3_MAX = 448.0
#: ``torch._scaled_mm`` needs both matrix dimensions of the weight divisible by 16.
ALIGNMENT = 16
#: Module-name parts that mark the linears worth quantising.
SELECTED_PARENTS = ("transformer_blocks", "temporal_transformer_blocks")


class Float8Linear(torch.nn.Module):
    """A linear layer with e4m3 weights (per-output-channel scales) and dynamic per-row scaled
    e4m3 activations."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = (weight.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp(min=1e-12)  # [out, 1]
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_fp8", (weight / scale).to(torch.float8_e4m3fn))  # [out, in], row-major
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, out]
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.out_dtype = linear.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leading = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        row_scale = (rows.abs().amax(dim=1, keepdim=True).float() / E4M3_MAX).clamp(min=1e-12)  # [M, 1]
        rows_fp8 = (rows.float() / row_scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(rows_fp8, self.weight_fp8.t(), scale_a=row_scale, scale_b=self.weight_scale,
                               out_dtype=self.out_dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*leading, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3 rowwise"


def fp8_supported(device: torch.device) -> bool:
    """FP8 matmuls run on CUDA compute capability 8.9+ (Ada, Hopper, Blackwell) and on CPUs."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return device.type == "cpu"


def quantize_linears_fp8(network: torch.nn.Module) -> int:
    """Replace the selected linears of ``network`` in place; returns how many were replaced."""
    device = next(network.parameters()).device
    if not fp8_supported(device):
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        raise ValueError(f"fp8 needs a GPU with FP8 tensor cores (compute capability 8.9+: L4, L40, H100, "
                         f"H200) or a CPU; this replica runs on {name}")
    replaced = 0
    for parent_name, parent in list(network.named_modules()):
        if not any(part in parent_name.split(".") for part in SELECTED_PARENTS):
            continue
        for child_name, child in list(parent.named_children()):
            if (isinstance(child, torch.nn.Linear) and child.in_features % ALIGNMENT == 0
                    and child.out_features % ALIGNMENT == 0):
                setattr(parent, child_name, Float8Linear(child))
                replaced += 1
    if not replaced:
        raise ValueError(f"{type(network).__name__} has no linears under {', '.join(SELECTED_PARENTS)} to quantise")
    return replaced
