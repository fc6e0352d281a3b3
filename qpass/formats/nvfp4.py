"""NVFP4's two-level scales: an fp32 per-tensor scale and E4M3 scales per block of 16 (SPEC 2).

Each step is one fp32 operation in the SPEC's order, so results match NVIDIA's recipe bit for bit:
``g = amax_tensor / 2688``; ``s_b = e4m3(clamp((block_amax / 6) / g, 2^-6, 448))``; elements
``e2m1(x * ((1 / g) / s_b))``; dequantized ``q * (s_b * g)``.

Granularity ``("tile", 16)`` (Transformer Engine's weight recipe) takes ``block_amax`` over a 16x16
tile of the tensor's last two dims instead of a 1x16 block, so a weight quantized along K (forward)
and along N (dgrad) gets the same values. Everything else is unchanged, storage included: the
scales keep the 1x16 layout ``[..., rows, ceil(K/16)]``, each tile's E4M3 scale repeated on its 16
rows, so dequantization does not need to know about tiles.

``scale_mode="4over6"`` ("Four Over Six", arXiv 2512.02010; Transformer Engine's and ModelOpt's NVFP4
4over6) gives each block (or tile) two candidate scales, the standard one that maps its amax to 6
and ``s4 = e4m3(clamp(((block_amax / 6) / g) * 1.5, 2^-6, 448))``, which maps it to 4 (the 6
candidate's ratio expanded by 1.5, as the reference implementations compute it), and keeps the
one whose dequantized block has the smaller squared error against x (ties: the 6 candidate). As in
those implementations, ``g = amax_tensor / 1536`` (E4M3's 256, not 448, times 6), so that the
tensor-amax block's map-to-4 scale (384) still fits E4M3. The candidates are rounded to nearest
even; the stored layout is the standard one. The error is summed in a fixed order, so every
implementation (kernels, ONNX) picks the same candidate: a 1x16 block's 16 squared errors by
adjacent pairs (``((e0 + e1) + (e2 + e3)) + ...``), a 16x16 tile's 256 as a quadtree of 2x2
squares, each summed ``(diagonal) + (anti-diagonal)``, which does not change when the tile is
transposed, so a tile gets the same scale whichever of its two dims is quantized.
"""

from __future__ import annotations

import torch

from qpass.formats.bits import FP32_MAX, FP32_MIN_SUBNORMAL
from qpass.formats.element import FP4_E2M1, FP8_E4M3
from qpass.formats.rounding import round_to_element

GLOBAL_DIVISOR = FP8_E4M3.max_normal * FP4_E2M1.max_normal  # 2688
FOUR_OVER_SIX = "4over6"
FOUR_OVER_SIX_E4M3_MAX = 256.0  # the E4M3 bound of 4over6's global scale
FOUR_OVER_SIX_DIVISOR = FOUR_OVER_SIX_E4M3_MAX * FP4_E2M1.max_normal  # 1536
MAP_TO_4 = 1.5  # 6 / 4: the map-to-4 candidate's ratio is the map-to-6 one times this


def global_divisor(scale_mode: str | None = None) -> float:
    """What ``g`` divides the tensor amax by: 2688, or 1536 for 4over6."""
    return FOUR_OVER_SIX_DIVISOR if scale_mode == FOUR_OVER_SIX else GLOBAL_DIVISOR


def global_scale(tensor_amax: torch.Tensor, scale_mode: str | None = None) -> torch.Tensor:
    """``g``: 1.0 for an all-zero tensor, NaN when the tensor holds NaN or Inf."""
    # An amax below ~3.8e-42 would make g underflow to 0 and its zero blocks 0 / 0 = NaN: keep g
    # at fp32's smallest subnormal instead (the tensor is then all zeros after quantization).
    g = (tensor_amax / global_divisor(scale_mode)).clamp(min=FP32_MIN_SUBNORMAL)
    g = torch.where(tensor_amax == 0, 1.0, g)
    return torch.where(tensor_amax.isfinite(), g, torch.nan)


def tile_amax(block_amax: torch.Tensor, rows: int) -> torch.Tensor:
    """Each 1x16 block's amax replaced by the amax of its tile: the max over ``rows`` consecutive
    rows (dim -3 of ``[..., R, G, 1]``, the other of the last two dims, whichever the axis)."""
    count = block_amax.shape[-3]
    # Zero rows complete the last tile; like the zero padding along the axis, they change no amax.
    padded = torch.nn.functional.pad(block_amax, (0, 0, 0, 0, 0, -count % rows))
    tiles = padded.unflatten(-3, (-1, rows)).amax(dim=-3)  # NaN propagates
    return tiles.repeat_interleave(rows, dim=-3)[..., :count, :, :]


def _e4m3_scale(ratio: torch.Tensor) -> torch.Tensor:
    return round_to_element(ratio.clamp(FP8_E4M3.min_normal, FP8_E4M3.max_normal), FP8_E4M3)


def block_scales(block_amax: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``s_b`` per block, as exact E4M3 values in fp32 (never below E4M3's smallest normal)."""
    return _e4m3_scale((block_amax / FP4_E2M1.max_normal) / g)


def four_over_six_scales(
    groups: torch.Tensor, block_amax: torch.Tensor, g: torch.Tensor, tile_rows: int | None = None
) -> torch.Tensor:
    """4over6's ``s_b`` per block of ``groups`` ``[..., G, 16]`` (``block_amax`` ``[..., G, 1]``),
    or per tile (``tile_rows`` 16: groups ``[..., R, G, 16]``, block_amax already the tile's)."""
    ratio = (block_amax / FP4_E2M1.max_normal) / g
    map_to_6, map_to_4 = _e4m3_scale(ratio), _e4m3_scale(ratio * MAP_TO_4)
    error_6, error_4 = (_squared_error(groups, g, s_b, tile_rows) for s_b in (map_to_6, map_to_4))
    return torch.where(error_4 < error_6, map_to_4, map_to_6)  # NaN compares False: the 6 candidate


def _squared_error(groups: torch.Tensor, g: torch.Tensor, s_b: torch.Tensor, tile_rows: int | None):
    """The squared error of each block (or tile) quantized with ``s_b`` (rounded to nearest even,
    dequantized as :func:`qpass.dequantize` does), ``[..., G, 1]``, summed in the fixed orders of the
    module docstring; a tile's is repeated on each of its rows."""
    values = round_to_element(groups * element_encode(g, s_b), FP4_E2M1)
    diff = values * (s_b * g) - groups
    squares = diff * diff
    if tile_rows is None:
        return _pairwise_sum(squares)
    count = squares.shape[-3]
    # Zero rows complete the last tile (their squared errors are 0: they change no sum).
    squares = torch.nn.functional.pad(squares, (0, 0, 0, 0, 0, -count % tile_rows))
    tiles = _quadtree_sum(squares.unflatten(-3, (-1, tile_rows)))  # [..., T, 1, G, 1]
    return tiles.repeat_interleave(tile_rows, dim=-3).flatten(-4, -3)[..., :count, :, :]


def _pairwise_sum(squares: torch.Tensor) -> torch.Tensor:
    """``[..., B]`` (B a power of two) to ``[..., 1]``: adjacent pairs, then pairs of those."""
    while squares.shape[-1] > 1:
        pairs = squares.unflatten(-1, (-1, 2))
        squares = pairs[..., 0] + pairs[..., 1]
    return squares


def _quadtree_sum(squares: torch.Tensor) -> torch.Tensor:
    """``[..., r, G, c]`` (r = c, a power of two: a tile's rows and columns) to ``[..., 1, G, 1]``:
    each 2x2 square summed ``(top left + bottom right) + (top right + bottom left)``, then the
    squares of those, which gives the same bits for the transposed tile."""
    while squares.shape[-1] > 1:
        quads = squares.unflatten(-1, (-1, 2)).unflatten(-4, (-1, 2))  # [..., r/2, 2, G, c/2, 2]
        top_left, top_right = quads.select(-4, 0).unbind(-1)
        bottom_left, bottom_right = quads.select(-4, 1).unbind(-1)
        squares = (top_left + bottom_right) + (top_right + bottom_left)
    return squares


def element_encode(g: torch.Tensor, s_b: torch.Tensor) -> torch.Tensor:
    """The per-block factor ``(1 / g) / s_b`` that takes x to E2M1 units."""
    # The factor overflows only for a tensor amax below ~1e-35 (g near or in fp32's subnormals).
    # Clamping it to the largest finite fp32 keeps that tensor's zeros at zero instead of
    # 0 * inf = NaN, and changes no case where the SPEC formula is finite.
    return ((1.0 / g) / s_b).clamp(max=FP32_MAX)
