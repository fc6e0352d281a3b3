"""Absmax scales for tensor, channel and non-MX block granularity (SPEC section 2).

``encode = max_normal / amax`` maps a group's largest magnitude onto the element's max normal;
``decode = 1 / encode`` is what is stored and multiplied back. An all-zero group gets 1.0 and a
group holding NaN or Inf gets NaN, so it dequantizes to NaN (SPEC section 3).
"""

from __future__ import annotations

import torch

from qpass.formats.bits import FP32_MAX, FP32_TINY, floor_log2, pow2


def group_amax(groups: torch.Tensor, granularity: str) -> torch.Tensor:
    """amax per group: one 0-dim value for ``tensor``, ``[..., G, 1]`` otherwise (NaN propagates)."""
    magnitude = groups.abs()
    return magnitude.amax() if granularity == "tensor" else magnitude.amax(dim=-1, keepdim=True)


def absmax_encode(
    amax: torch.Tensor, max_normal: float, pow2_scale: bool = False, margin: int = 0
) -> torch.Tensor:
    """The encode scale for each amax; ``margin`` divides it by ``2^margin`` (delayed scaling)."""
    # One fp32 division, as the SPEC says: torch evaluates `scalar / tensor` as a reciprocal
    # times the scalar, which rounds twice and is off by an ulp for about a quarter of amaxes.
    encode = torch.full_like(amax, max_normal) / amax
    if margin:
        encode = encode * 2.0**-margin
    # A tiny (e.g. fp32 subnormal) amax overflows the quotient; the largest finite scale is the
    # closest the fp32 scale can get, and keeps 0 * encode == 0 for the group's zeros. At the
    # other end a large margin must not underflow the scale to 0 (decode would be Inf).
    encode = encode.clamp(FP32_TINY, FP32_MAX)
    if pow2_scale:
        encode = pow2(floor_log2(encode))
    encode = torch.where(amax == 0, 1.0, encode)
    return torch.where(amax.isfinite(), encode, torch.nan)
