"""Exact fp32 bit arithmetic: powers of two and integer log2.

Every scale in qpass is a power of two or an fp32 quotient, and every rounding decision is made on
exact quantities. Building powers of two from bit patterns (rather than ``torch.exp2``) keeps that
exact on every backend, fp32 subnormals included.
"""

from __future__ import annotations

import torch

F32_MANTISSA_BITS = 23
F32_EXP_BIAS = 127
F32_EXP_MASK = 0x7F800000
F32_MIN_NORMAL_EXP = -126
F32_MIN_SUBNORMAL_EXP = -149
FP32_MAX = torch.finfo(torch.float32).max
FP32_TINY = torch.finfo(torch.float32).tiny  # smallest normal
FP32_MIN_SUBNORMAL = 2.0**F32_MIN_SUBNORMAL_EXP


def pow2(exponent: torch.Tensor) -> torch.Tensor:
    """``2.0 ** exponent`` as fp32, exactly, for integer exponents in [-149, 127]."""
    e = exponent.to(torch.int32)
    normal_bits = (e + F32_EXP_BIAS) << F32_MANTISSA_BITS
    # Below 2^-126 the power of two is a subnormal: a single mantissa bit.
    subnormal_bits = torch.ones_like(e) << (e - F32_MIN_SUBNORMAL_EXP).clamp(0, 22)
    return torch.where(e >= F32_MIN_NORMAL_EXP, normal_bits, subnormal_bits).view(torch.float32)


def exponent_and_mantissa(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For finite x > 0: ``floor(log2(x))`` and the 23 mantissa bits of x normalized to [1, 2).

    fp32 subnormals are first scaled by 2^64 (exact) so that they too have an exponent field. Pure
    bit arithmetic rather than ``torch.frexp``, which Inductor miscompiles in some fused kernels.
    """
    subnormal = x < FP32_TINY
    bits = torch.where(subnormal, x * 2.0**64, x).view(torch.int32)
    exponent = ((bits >> F32_MANTISSA_BITS) & 0xFF) - F32_EXP_BIAS - subnormal.to(torch.int32) * 64
    return exponent, bits & ((1 << F32_MANTISSA_BITS) - 1)


def floor_log2(x: torch.Tensor) -> torch.Tensor:
    """``floor(log2(x))`` as int32 for finite x > 0, fp32 subnormals included."""
    return exponent_and_mantissa(x)[0]


def ceil_log2(x: torch.Tensor) -> torch.Tensor:
    """``ceil(log2(x))`` as int32 for finite x > 0: the floor, plus one unless x is a power of two."""
    exponent, mantissa = exponent_and_mantissa(x)
    return exponent + (mantissa != 0).to(torch.int32)

