"""Element formats: the small floating-point (and MX int8) number systems qpass stores values in.

An element format is a sign bit, ``ebits`` exponent bits and ``mbits`` mantissa bits with the OCP
encodings of SPEC section 1. This module knows the formats' parameters and maps between exact
element values (held in fp32) and their codes; rounding arbitrary fp32 values onto a format's grid
lives in :mod:`qpass.formats.rounding`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from qpass.formats.bits import F32_MANTISSA_BITS, exponent_and_mantissa


@dataclass(frozen=True)
class ElementFormat:
    """One element format. ``int8`` (MX) is modelled as a format with a fixed step of 2^-6."""

    name: str
    ebits: int
    mbits: int
    bias: int
    max_normal: float
    has_inf: bool = False
    has_nan: bool = False
    is_int: bool = False

    @property
    def bits(self) -> int:
        # int8 has one integer bit in front of its six fraction bits (k/64, |k| <= 127).
        return 8 if self.is_int else 1 + self.ebits + self.mbits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal value; for int8 the exponent of its one fixed binade."""
        return 0 if self.is_int else 1 - self.bias

    @property
    def emax(self) -> int:
        """``emax_elem`` of the MX scale rule: the exponent of the largest normal binade."""
        return 0 if self.is_int else math.floor(math.log2(self.max_normal))

    @property
    def min_normal(self) -> float:
        return 2.0**self.emin

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.mbits)

    @property
    def nan_code(self) -> int | None:
        """The canonical NaN code (positive sign, all ones), or None if the format has no NaN."""
        return (1 << (self.bits - 1)) - 1 if self.has_nan else None


FP8_E4M3 = ElementFormat("fp8_e4m3", ebits=4, mbits=3, bias=7, max_normal=448.0, has_nan=True)
FP8_E5M2 = ElementFormat("fp8_e5m2", 5, 2, 15, 57344.0, has_inf=True, has_nan=True)
FP6_E3M2 = ElementFormat("fp6_e3m2", 3, 2, 3, 28.0)
FP6_E2M3 = ElementFormat("fp6_e2m3", 2, 3, 1, 7.5)
FP4_E2M1 = ElementFormat("fp4_e2m1", 2, 1, 1, 6.0)
# Two's complement int8 with an implicit 2^-6: k/64 for k in [-127, 127].
INT8 = ElementFormat("int8", ebits=0, mbits=6, bias=0, max_normal=127 / 64, is_int=True)

ELEMENT_FORMATS: dict[str, ElementFormat] = {
    f.name: f for f in (FP8_E4M3, FP8_E5M2, FP6_E3M2, FP6_E2M3, FP4_E2M1, INT8)
}


def _code_value(fmt: ElementFormat, code: int) -> float:
    """The value of one code, straight from the OCP bit-field definition."""
    if fmt.is_int:
        return (code - 256 if code >= 128 else code) / 64
    sign = -1.0 if code >> (fmt.ebits + fmt.mbits) else 1.0
    exp_field = (code >> fmt.mbits) & ((1 << fmt.ebits) - 1)
    mantissa = code & ((1 << fmt.mbits) - 1)
    if exp_field == (1 << fmt.ebits) - 1 and (fmt.has_inf or fmt.has_nan):
        if fmt.has_inf:  # E5M2: IEEE-style specials in the top binade
            return sign * float("inf") if mantissa == 0 else float("nan")
        if mantissa == (1 << fmt.mbits) - 1:  # E4M3FN: only S.1111.111 is NaN
            return float("nan")
    if exp_field == 0:
        return sign * mantissa * 2.0 ** (1 - fmt.bias - fmt.mbits)
    return sign * (1 + mantissa / 2**fmt.mbits) * 2.0 ** (exp_field - fmt.bias)


@functools.lru_cache(maxsize=None)
def _code_table(fmt: ElementFormat, device: torch.device) -> torch.Tensor:
    values = [_code_value(fmt, c) for c in range(1 << fmt.bits)]
    return torch.tensor(values, dtype=torch.float32, device=device)


def code_table(fmt: ElementFormat, device: torch.device | str = "cpu") -> torch.Tensor:
    """fp32 value of every code of ``fmt``, indexed by code (2**bits entries), cached per device."""
    return _code_table(fmt, torch.device(device))


# The element formats that are torch dtypes. On-grid values cast to them exactly, and torch's cast
# is several times faster than the bit arithmetic of encode, which stays the definition: the two
# agree on every code and special (tests/formats/test_element.py).
TORCH_FLOAT8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def decode(codes: torch.Tensor, fmt: ElementFormat) -> torch.Tensor:
    """Element codes (uint8, one per element) to their fp32 values."""
    dtype = TORCH_FLOAT8.get(fmt.name)
    if dtype is not None:
        return codes.view(dtype).float()
    return code_table(fmt, codes.device)[codes.long()]


def encode(values: torch.Tensor, fmt: ElementFormat) -> torch.Tensor:
    """Exact element values (fp32, already on the grid) to uint8 codes (:func:`encode_by_bits`)."""
    dtype = TORCH_FLOAT8.get(fmt.name)
    if dtype is not None:  # torch keeps NaN's sign and saturates Inf in E4M3; the format does neither
        special = values.isnan() if fmt.has_inf else ~values.isfinite()
        return torch.where(special, fmt.nan_code, values.to(dtype).view(torch.uint8))
    return encode_by_bits(values, fmt)


def encode_by_bits(values: torch.Tensor, fmt: ElementFormat) -> torch.Tensor:
    """The definition of a code: sign, biased exponent and mantissa from the value's fp32 bits.

    NaN and Inf encode to the format's own specials; a format without them encodes a non-finite
    element as +0, because its scaling group's scale carries the NaN (SPEC section 3).
    """
    if fmt.is_int:
        k = torch.nan_to_num(values * 64, nan=0.0, posinf=0.0, neginf=0.0).to(torch.int32)
        return (k & 0xFF).to(torch.uint8)
    sign = (values.view(torch.int32) >> 31) & 1
    magnitude = values.abs()
    exponent, mantissa = exponent_and_mantissa(magnitude)  # used where magnitude is normal
    normal_code = ((exponent + fmt.bias) << fmt.mbits) | (mantissa >> (F32_MANTISSA_BITS - fmt.mbits))
    subnormal_code = (magnitude / fmt.min_subnormal).to(torch.int32)  # exact: a multiple of the step
    code = torch.where(magnitude < fmt.min_normal, subnormal_code, normal_code)
    code = code | (sign << (fmt.ebits + fmt.mbits))
    if fmt.has_inf:
        inf_code = ((1 << fmt.ebits) - 1) << fmt.mbits
        code = torch.where(values.isinf(), inf_code | (sign << (fmt.ebits + fmt.mbits)), code)
    special = fmt.nan_code or 0
    code = torch.where(values.isnan(), special, code)
    if not fmt.has_inf:
        code = torch.where(values.isinf(), special, code)
    return code.to(torch.uint8)
