"""NVFP4's two-level scales: an fp32 per-tensor scale and E4M3 scales per block of 16 (SPEC 2).

Each step is one fp32 operation in the SPEC's order, so results match NVIDIA's recipe bit for bit:
``g = amax_tensor / 2688``; ``s_b = e4m3(clamp((block_amax / 6) / g, 2^-6, 448))``; elements
``e2m1(x * ((1 / g) / s_b))``; dequantized ``q * (s_b * g)``.

Granularity ``("tile", 16)`` (Transformer Engine's weight recipe) takes ``block_amax`` over a 16x16
tile of the tensor's last two dims instead of a 1x16 block, so a weight quantized along K (forward)
and along N (dgrad) gets the same values. Everything else is unchanged, storage included: the
scales keep the 1x16 layout ``[..., rows, ceil(K/16)]``, each tile's E4M3 scale repeated on its 16
rows, so dequantization does not need to know about tiles.
"""

from __future__ import annotations

import torch

from qpass.formats.bits import FP32_MAX, FP32_MIN_SUBNORMAL
from qpass.formats.element import FP4_E2M1, FP8_E4M3
from qpass.formats.rounding import round_to_element

GLOBAL_DIVISOR = FP8_E4M3.max_normal * FP4_E2M1.max_normal  # 2688


def global_scale(tensor_amax: torch.Tensor) -> torch.Tensor:
    """``g``: 1.0 for an all-zero tensor, NaN when the tensor holds NaN or Inf."""
    # An amax below ~3.8e-42 would make g underflow to 0 and its zero blocks 0 / 0 = NaN: keep g
    # at fp32's smallest subnormal instead (the tensor is then all zeros after quantization).
    g = torch.where(tensor_amax == 0, 1.0, (tensor_amax / GLOBAL_DIVISOR).clamp(min=FP32_MIN_SUBNORMAL))
    return torch.where(tensor_amax.isfinite(), g, torch.nan)


def tile_amax(block_amax: torch.Tensor, rows: int) -> torch.Tensor:
    """Each 1x16 block's amax replaced by the amax of its tile: the max over ``rows`` consecutive
    rows (dim -3 of ``[..., R, G, 1]``, the other of the last two dims, whichever the axis)."""
    count = block_amax.shape[-3]
    # Zero rows complete the last tile; like the zero padding along the axis, they change no amax.
    padded = torch.nn.functional.pad(block_amax, (0, 0, 0, 0, 0, -count % rows))
    tiles = padded.unflatten(-3, (-1, rows)).amax(dim=-3)  # NaN propagates
    return tiles.repeat_interleave(rows, dim=-3)[..., :count, :, :]


def block_scales(block_amax: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``s_b`` per block, as exact E4M3 values in fp32 (never below E4M3's smallest normal)."""
    ratio = (block_amax / FP4_E2M1.max_normal) / g
    return round_to_element(ratio.clamp(FP8_E4M3.min_normal, FP8_E4M3.max_normal), FP8_E4M3)


def element_encode(g: torch.Tensor, s_b: torch.Tensor) -> torch.Tensor:
    """The per-block factor ``(1 / g) / s_b`` that takes x to E2M1 units."""
    # The factor overflows only for a tensor amax below ~1e-35 (g near or in fp32's subnormals).
    # Clamping it to the largest finite fp32 keeps that tensor's zeros at zero instead of
    # 0 * inf = NaN, and changes no case where the SPEC formula is finite.
    return ((1.0 / g) / s_b).clamp(max=FP32_MAX)
