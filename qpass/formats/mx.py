"""OCP MX block scales: one shared power of two per block, stored as E8M0 (SPEC section 2).

The block exponent ``e`` comes from the block's amax by one of four rules; the elements are the
block divided by ``2^e`` (an exact scaling) and rounded. Code ``e + 127`` is stored; 0xFF marks a
block that held NaN or Inf, and an all-zero block gets code 0x00.
"""

from __future__ import annotations

import torch

from qpass.formats.bits import (
    F32_MANTISSA_BITS,
    FP32_MIN_SUBNORMAL,
    ceil_log2,
    exponent_and_mantissa,
    floor_log2,
    pow2,
)
from qpass.formats.element import ElementFormat

E8M0_BIAS = 127
E8M0_NAN = 0xFF
E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127


def _floor_log2_rounded(amax: torch.Tensor, mbits: int) -> torch.Tensor:
    """floor(log2(amax)) after rounding amax's significand to ``mbits`` mantissa bits, ties up.

    Rounding works on the normalized significand (subnormals included), and a carry out of the
    mantissa moves amax into the next binade, past fp32's largest one if need be.
    """
    exponent, mantissa = exponent_and_mantissa(amax)
    carry = (mantissa + (1 << (F32_MANTISSA_BITS - mbits - 1))) >> F32_MANTISSA_BITS
    return exponent + carry


def shared_exponent(amax: torch.Tensor, element: ElementFormat, scale_mode: str) -> torch.Tensor:
    """The unclamped block exponent ``e`` (int32) for finite amax > 0."""
    if scale_mode == "floor":
        return floor_log2(amax) - element.emax
    if scale_mode == "ceil":
        return ceil_log2(amax) - element.emax
    if scale_mode == "even":
        return _floor_log2_rounded(amax, element.mbits) - element.emax
    if scale_mode == "rceil":
        d = amax / element.max_normal
        # d underflows to 0 only for amax near fp32's smallest subnormal; any e <= -127 clamps alike.
        return ceil_log2(torch.where(d > 0, d, FP32_MIN_SUBNORMAL))
    raise ValueError(f"unknown scale_mode {scale_mode!r}")


def e8m0_codes(amax: torch.Tensor, element: ElementFormat, scale_mode: str) -> torch.Tensor:
    """E8M0 scale codes (uint8) for each block amax."""
    positive = amax > 0  # False for zero and NaN blocks
    safe_amax = torch.where(positive & amax.isfinite(), amax, 1.0)
    exponent = shared_exponent(safe_amax, element, scale_mode).clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)
    codes = torch.where(positive, exponent + E8M0_BIAS, 0)
    return torch.where(amax.isfinite(), codes, E8M0_NAN).to(torch.uint8)


def e8m0_decode(codes: torch.Tensor) -> torch.Tensor:
    """The fp32 scale ``2^(code - 127)`` of each E8M0 code; NaN for 0xFF."""
    return _pow2_or_nan(codes.to(torch.int32) - E8M0_BIAS, codes)


def e8m0_encode(codes: torch.Tensor) -> torch.Tensor:
    """The exact reciprocal ``2^(127 - code)`` that takes a block to element units; NaN for 0xFF."""
    return _pow2_or_nan(E8M0_BIAS - codes.to(torch.int32), codes)


def _pow2_or_nan(exponent: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return torch.where(codes == E8M0_NAN, torch.nan, pow2(exponent))
