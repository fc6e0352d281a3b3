"""OCP MX block scaling (SPEC sections 2-4): E8M0 scale codes, element codes and dequantized values.

Most expectations are golden numbers worked out by hand from the SPEC formulas and typed in as
literals, with the arithmetic in a comment next to them. The last tests check random tensors against
an independent re-implementation (Python ``math`` for the shared exponent, ml_dtypes for the element
casts and decodes, torch's ``float8_e8m0fnu`` for the scales).

Notation used in the comments: ``e`` is the shared exponent, ``code = e + 127``, elements are
``x * 2^-e`` rounded to the element format (RNE, then saturate to +-max normal).
emax_elem / max normal / mantissa bits per element format:
  fp8_e4m3  8 / 448   = 1.75 * 2^8  / 3       fp6_e3m2  4 / 28  = 1.75 * 2^4 / 2
  fp8_e5m2 15 / 57344 = 1.75 * 2^15 / 2       fp6_e2m3  2 / 7.5 = 1.875 * 2^2 / 3
  fp4_e2m1  2 / 6     = 1.5 * 2^2   / 1       int8      0 / 127/64 (k/64)  / 6
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

import qpass

MODES = ("floor", "ceil", "even", "rceil")
MX_FORMATS = ("mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4", "mxint8")
FP8_FORMATS = ("mxfp8_e4m3", "mxfp8_e5m2")

# Independent per-format parameters, typed in from SPEC section 1.
EMAX = {"mxfp8_e4m3": 8, "mxfp8_e5m2": 15, "mxfp6_e3m2": 4, "mxfp6_e2m3": 2, "mxfp4": 2, "mxint8": 0}
MBITS = {"mxfp8_e4m3": 3, "mxfp8_e5m2": 2, "mxfp6_e3m2": 2, "mxfp6_e2m3": 3, "mxfp4": 1, "mxint8": 6}
MAX_NORMAL = {
    "mxfp8_e4m3": 448.0,
    "mxfp8_e5m2": 57344.0,
    "mxfp6_e3m2": 28.0,
    "mxfp6_e2m3": 7.5,
    "mxfp4": 6.0,
    "mxint8": 127 / 64,
}
ML_DTYPE = {
    "mxfp8_e4m3": ml_dtypes.float8_e4m3fn,
    "mxfp8_e5m2": ml_dtypes.float8_e5m2,
    "mxfp6_e3m2": ml_dtypes.float6_e3m2fn,
    "mxfp6_e2m3": ml_dtypes.float6_e2m3fn,
    "mxfp4": ml_dtypes.float4_e2m1fn,
}

FP32_MAX = float(np.finfo(np.float32).max)  # (2 - 2^-23) * 2^127


# --------------------------------------------------------------------------------------------
# Helpers


def block32(*head: float) -> list[float]:
    """One block of 32: ``head`` followed by (+0) zeros."""
    assert len(head) <= 32
    return list(head) + [0.0] * (32 - len(head))


def f32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def quantize(values, fmt: str, mode: str, **kw) -> qpass.QTensor:
    x = values if isinstance(values, torch.Tensor) else f32(values)
    return qpass.quantize(x, fmt, scale_mode=mode, **kw)


def code_bytes(fmt: str, head: list[int], n_elements: int = 32) -> list[int]:
    """The full code bytes of one block: ``head`` then zero bytes (fp4: two codes per byte)."""
    n_bytes = n_elements // 2 if fmt == "mxfp4" else n_elements
    return list(head) + [0] * (n_bytes - len(head))


def assert_values(actual: torch.Tensor, expected, check_sign: bool = True) -> None:
    """Exact equality (NaN == NaN); with ``check_sign`` also the sign of zeros."""
    expected = expected if isinstance(expected, torch.Tensor) else f32(expected)
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=0, atol=0, equal_nan=True)
    if check_sign:
        ok = ~expected.isnan()
        assert torch.equal(actual[ok].signbit(), expected[ok].signbit()), (actual, expected)


# --------------------------------------------------------------------------------------------
# 1. The E8M0 scale code of a block, per scale mode, from its amax.
#
# Each row: (format, amax, {mode: (scale code, dequantized amax element)}). The block is
# ``[0, 0, 0, -amax, 0, ...]`` so the sign of the amax element is exercised too.

def by_mode(floor, ceil, even, rceil) -> dict:
    return {"floor": floor, "ceil": ceil, "even": even, "rceil": rceil}


SCALE_TABLE = [
    # ---- mxfp8_e4m3 (emax 8, max 448, 3 mantissa bits)
    # 256 = 2^8 exactly: floor 8-8=0; ceil 8-8=0; even 1.000b stays -> 0;
    # rceil d = 256/448 = 0.571 -> ceil(log2) = 0.  All code 127, 256 is exact.
    ("mxfp8_e4m3", 256.0, {m: (127, 256.0) for m in MODES}),
    # 224 = 1.75 * 2^7: floor 7-8 = -1 (126); ceil(log2 224 = 7.81) = 8 -> 0 (127);
    # even 1.110b fits 3 bits -> -1; rceil d = 224/448 = 0.5 = 2^-1 exactly -> -1 (126).
    # 224 * 2^1 = 448 and 224 * 2^0 = 224 are both exact.
    ("mxfp8_e4m3", 224.0, by_mode((126, 224.0), (127, 224.0), (126, 224.0), (126, 224.0))),
    # 448: floor 8-8 = 0 (127); ceil(8.81) = 9 -> 1 (128), 224 exact; even 1.110b -> 0;
    # rceil d = 448/448 = 1 = 2^0 -> 0 (127).
    ("mxfp8_e4m3", 448.0, by_mode((127, 448.0), (128, 448.0), (127, 448.0), (127, 448.0))),
    # 449: floor 0 -> 449 on the step-32 grid of [256,512): 14.03 -> 14 -> 448;
    # ceil 1 -> 224.5 on step 16: 14.03 -> 14 -> 224 -> 448;
    # even: 449/256 = 1.1100000100b, +0.0001b then truncate to 3 bits -> 1.110b -> 0 (127);
    # rceil d = 449/448 > 1 -> e = 1 (128) -> 448.  (rceil differs from floor here.)
    ("mxfp8_e4m3", 449.0, by_mode((127, 448.0), (128, 448.0), (127, 448.0), (128, 448.0))),
    # 496 = 1.9375 * 2^8 = 1.1111b * 2^8: floor 0 -> 496/32 = 15.5 -> RNE 16 -> 512 > 448, saturates to 448;
    # ceil 1 -> 248/16 = 15.5 -> 16 -> 256 -> 512; even: 1.1111b + 0.0001b = 10.000b -> 2^9 -> e 1 -> 512;
    # rceil d = 496/448 = 1.107 -> 1 -> 512.
    ("mxfp8_e4m3", 496.0, by_mode((127, 448.0), (128, 512.0), (128, 512.0), (128, 512.0))),
    # 0.75 = 1.1b * 2^-1: floor -1-8 = -9 (118); ceil(log2 0.75 = -0.42) = 0 -> -8 (119);
    # even -> -9 (118); rceil d = 0.75/448 = 2^-9.22 -> -9 (118).  0.75*2^9 = 384, 0.75*2^8 = 192: exact.
    ("mxfp8_e4m3", 0.75, by_mode((118, 0.75), (119, 0.75), (118, 0.75), (118, 0.75))),
    # ---- mxfp8_e5m2 (emax 15, max 57344, 2 mantissa bits)
    # 60000 in [2^15, 2^16): floor 0 (127) -> step 8192: 7.32 -> 7 -> 57344;
    # ceil 1 (128) -> 30000 on step 4096: 7.32 -> 7 -> 28672 -> 57344;
    # even: 60000/32768 = 1.831 < 1.875 (half way 1.75..2.0) -> 1.75 -> 0 (127);
    # rceil d = 60000/57344 > 1 -> 1 (128).
    ("mxfp8_e5m2", 60000.0, by_mode((127, 57344.0), (128, 57344.0), (127, 57344.0), (128, 57344.0))),
    # 1.0: floor/ceil/even 0-15 = -15 (112); rceil d = 1/57344 = 2^-15.81 -> -15 (112).
    ("mxfp8_e5m2", 1.0, {m: (112, 1.0) for m in MODES}),
    # ---- mxfp6_e3m2 (emax 4, max 28, 2 mantissa bits)
    # 16 = 2^4: all modes e 0 (127); rceil d = 16/28 = 0.57 -> 0.
    ("mxfp6_e3m2", 16.0, {m: (127, 16.0) for m in MODES}),
    # 28 = 1.11b * 2^4: floor 0; ceil(4.81) = 5 -> 1 (128), 14 exact; even 1.11b fits -> 0; rceil d = 1 -> 0.
    ("mxfp6_e3m2", 28.0, by_mode((127, 28.0), (128, 28.0), (127, 28.0), (127, 28.0))),
    # 29 = 1.1101b * 2^4: floor 0 -> 29/4 = 7.25 -> 7 -> 28; ceil 1 -> 14.5/2 = 7.25 -> 7 -> 14 -> 28;
    # even: 1.1101b + 0.001b = 1.1111b -> truncate 1.11b -> 0 (127); rceil d = 29/28 > 1 -> 1 (128).
    ("mxfp6_e3m2", 29.0, by_mode((127, 28.0), (128, 28.0), (127, 28.0), (128, 28.0))),
    # 30 = 1.111b * 2^4: floor 0 -> 30/4 = 7.5 -> RNE 8 -> 32 > 28, saturates to 28;
    # ceil 1 -> 15/2 = 7.5 -> 8 -> 16 -> 32; even 1.111b + 0.001b = 10.000b -> 1 -> 32; rceil 30/28 > 1 -> 32.
    ("mxfp6_e3m2", 30.0, by_mode((127, 28.0), (128, 32.0), (128, 32.0), (128, 32.0))),
    # ---- mxfp6_e2m3 (emax 2, max 7.5, 3 mantissa bits)
    # 7.75 = 1.1111b * 2^2: floor 0 -> step 0.5: 15.5 -> 16 -> 8 > 7.5, saturates to 7.5;
    # ceil 1 -> 3.875 on step 0.25: 15.5 -> 16 -> 4 -> 8; even 1.1111b -> 2.0 -> 1; rceil 7.75/7.5 > 1 -> 1.
    ("mxfp6_e2m3", 7.75, by_mode((127, 7.5), (128, 8.0), (128, 8.0), (128, 8.0))),
    # ---- mxfp4 (emax 2, max 6, 1 mantissa bit; grid 0 .5 1 1.5 2 3 4 6)
    # 4 = 2^2: all e 0 (127); rceil d = 4/6 = 0.67 -> 0.
    ("mxfp4", 4.0, {m: (127, 4.0) for m in MODES}),
    # 6 = 1.1b * 2^2: floor 0; ceil(2.58) = 3 -> 1 (128), 3 exact; even 1.1b fits -> 0;
    # rceil d = 6/6 = 1 -> 0.
    ("mxfp4", 6.0, by_mode((127, 6.0), (128, 6.0), (127, 6.0), (127, 6.0))),
    # 7 = 1.11b * 2^2, the saturating band of floor: floor 0 -> 7 on step 2: 3.5 -> RNE 4 -> 8 > 6 -> 6;
    # ceil 1 -> 3.5 on step 1 -> 4 -> 8 (no saturation); even 1.11b + 0.01b = 10.0b -> 1 -> 8;
    # rceil d = 7/6 > 1 -> 1 -> 8.
    ("mxfp4", 7.0, by_mode((127, 6.0), (128, 8.0), (128, 8.0), (128, 8.0))),
    # 5 = 1.01b * 2^2: floor 0 -> 5/2 = 2.5 -> RNE 2 -> 4; ceil 1 -> 2.5 on step 1 -> 2 -> 4;
    # even 1.01b + 0.01b = 1.10b -> 0 (127) -> 4; rceil d = 5/6 < 1 -> 0 -> 4.
    ("mxfp4", 5.0, by_mode((127, 4.0), (128, 4.0), (127, 4.0), (127, 4.0))),
    # 1: all e = 0-2 = -2 (125); rceil d = 1/6 = 2^-2.58 -> -2.
    ("mxfp4", 1.0, {m: (125, 1.0) for m in MODES}),
    # ---- mxint8 (emax 0, max 127/64, 6 fraction bits; k/64)
    # 1: all e 0 (127); rceil d = 64/127 = 2^-0.99 -> 0.  k = 64.
    ("mxint8", 1.0, {m: (127, 1.0) for m in MODES}),
    # 127/64 = 1.111111b: floor 0; ceil 1 (128) -> 63.5/64 -> RNE 64 -> 1.0 -> 2.0; even fits 6 bits -> 0;
    # rceil d = (127/64)/(127/64) = 1 -> 0.
    ("mxint8", 127 / 64, by_mode((127, 127 / 64), (128, 2.0), (127, 127 / 64), (127, 127 / 64))),
    # 255/128 = 1.1111111b: floor 0 -> k = 127.5 -> RNE 128 -> saturates to 127 -> 127/64;
    # ceil 1 -> k = 63.75 -> 64 -> 2.0; even: 7 fraction bits round up into 2.0 -> 1; rceil 255/254 > 1 -> 1.
    ("mxint8", 255 / 128, by_mode((127, 127 / 64), (128, 2.0), (128, 2.0), (128, 2.0))),
    # 0.5: all e -1 (126); rceil d = 32/127 = 2^-1.99 -> -1.
    ("mxint8", 0.5, {m: (126, 0.5) for m in MODES}),
]


@pytest.mark.parametrize(
    "fmt, amax, mode, code, deq",
    [(fmt, amax, mode, *want[mode]) for fmt, amax, want in SCALE_TABLE for mode in MODES],
)
def test_scale_code_per_mode(fmt, amax, mode, code, deq):
    qt = quantize(block32(0.0, 0.0, 0.0, -amax), fmt, mode)
    assert qt.scales.dtype == torch.uint8
    assert qt.scales.shape == (1,)
    assert qt.scales.tolist() == [code]
    out = qpass.dequantize(qt)
    assert_values(out, block32(0.0, 0.0, 0.0, -deq))


def test_default_scale_mode_is_floor():
    # SPEC 2: floor is the default of the mx* formats; mxfp4 amax 7 tells floor (code 127) from the
    # other modes (128).
    assert qpass.quantize(f32(block32(7.0)), "mxfp4").scales.tolist() == [127]


# --------------------------------------------------------------------------------------------
# 2. Whole golden blocks: scale code, every code byte, every dequantized value.
#
# Rows: (format, mode, block head, scale code, code bytes head, dequantized head); the rest of the
# block is zeros with code 0x00.

GOLDEN_BLOCKS = [
    # mxfp8_e4m3 floor, amax 448 -> e 0 (127), elements are x itself (E4M3 code = s eeee mmm, bias 7):
    #   448 = 1.75*2^8  -> 0 1111 110 = 0x7E
    #   -1             -> 1 0111 000 = 0xB8
    #   0.5            -> 0 0110 000 = 0x30
    #   3 = 1.5*2^1    -> 0 1000 100 = 0x44
    #   0.001          -> subnormal, 0.001 / 2^-9 = 0.512 -> 1 -> 2^-9      = 0x01
    #   -2^-10         -> half the smallest subnormal: tie -> even 0 -> -0   = 0x80
    #   1.5*2^-9       -> 1.5 units: tie -> even 2 -> 2^-8                   = 0x02
    #   17             -> step 2 in [16,32): 8.5 -> 8 -> 16 = 0 1011 000     = 0x58
    #   19             -> 9.5 -> 10 -> 20 = 1.25*2^4 = 0 1011 010             = 0x5A
    (
        "mxfp8_e4m3", "floor",
        [448.0, -1.0, 0.5, 3.0, 0.001, -(2.0**-10), 1.5 * 2.0**-9, 17.0, 19.0],
        127,
        [0x7E, 0xB8, 0x30, 0x44, 0x01, 0x80, 0x02, 0x58, 0x5A],
        [448.0, -1.0, 0.5, 3.0, 2.0**-9, -0.0, 2.0**-8, 16.0, 20.0],
    ),
    # rceil: d = 448/448 = 1 -> e 0, identical to floor.
    (
        "mxfp8_e4m3", "rceil",
        [448.0, -1.0, 0.5, 3.0, 0.001, -(2.0**-10), 1.5 * 2.0**-9, 17.0, 19.0],
        127,
        [0x7E, 0xB8, 0x30, 0x44, 0x01, 0x80, 0x02, 0x58, 0x5A],
        [448.0, -1.0, 0.5, 3.0, 2.0**-9, -0.0, 2.0**-8, 16.0, 20.0],
    ),
    # ceil: ceil(log2 448) = 9 -> e 1 (128), elements x/2:
    #   224 = 1.75*2^7 -> 0 1110 110 = 0x76;  -0.5 -> 1 0110 000 = 0xB0;  0.25 -> 0 0101 000 = 0x28
    #   1.5 -> 0 0111 100 = 0x3C;  0.0005 -> 0.256 units -> 0 (0x00, the 0.001 is lost)
    #   -2^-11 -> -0 (0x80);  0.75*2^-9 -> 0.75 units -> 1 (0x01) -> 2^-9*2 = 2^-8
    #   8.5 -> step 1 in [8,16): tie -> 8 = 0 1010 000 = 0x50 -> 16;  9.5 -> 10 = 0 1010 010 = 0x52 -> 20
    (
        "mxfp8_e4m3", "ceil",
        [448.0, -1.0, 0.5, 3.0, 0.001, -(2.0**-10), 1.5 * 2.0**-9, 17.0, 19.0],
        128,
        [0x76, 0xB0, 0x28, 0x3C, 0x00, 0x80, 0x01, 0x50, 0x52],
        [448.0, -1.0, 0.5, 3.0, 0.0, -0.0, 2.0**-8, 16.0, 20.0],
    ),
    # mxfp8_e4m3 floor, mixed magnitudes: amax 1000, floor(log2 1000 = 9.97) = 9 -> e 1 (128), x/2:
    #   500 -> step 32: 15.6 -> 16 -> 512 > 448, saturates: 0x7E -> 896
    #   0.005 -> 2.56 units of 2^-9 -> 3 = 0x03 -> 3*2^-9*2 = 0.01171875
    #   -1.5 -> 1 0111 100 = 0xBC -> -3;  5e-6 -> far below 2^-10 -> 0x00 (underflows)
    (
        "mxfp8_e4m3", "floor",
        [1000.0, 0.01, -3.0, 1e-5],
        128,
        [0x7E, 0x03, 0xBC, 0x00],
        [896.0, 0.01171875, -3.0, 0.0],
    ),
    # mxfp4 floor, amax 3 = 1.1b*2^1: e = 1-2 = -1 (126), x*2 (E2M1 code = s ee m):
    #   6 -> 0111 = 7;  -2.5 -> step 1: tie -> 2 -> 1100 = 0xC;  1 -> 0010 = 2;  0.2 -> 0.4 units of .5 -> 0
    #   4.4 -> step 2: 2.2 -> 2 -> 4 = 0110 = 6;  -0.25 -> tie -> -0 = 1000 = 8;
    #   1.5 -> 0011 = 3;  2 -> 0100 = 4
    #   bytes (low nibble first): 0xC7, 0x02, 0x86, 0x43
    (
        "mxfp4", "floor",
        [3.0, -1.25, 0.5, 0.1, 2.2, -0.125, 0.75, 1.0],
        126,
        [0xC7, 0x02, 0x86, 0x43],
        [3.0, -1.0, 0.5, 0.0, 2.0, -0.0, 0.75, 1.0],
    ),
    # even: 1.1b fits 1 bit -> as floor.  rceil: d = 3/6 = 0.5 = 2^-1 exactly -> e -1, as floor.
    ("mxfp4", "even", [3.0, -1.25, 0.5, 0.1, 2.2, -0.125, 0.75, 1.0], 126,
     [0xC7, 0x02, 0x86, 0x43], [3.0, -1.0, 0.5, 0.0, 2.0, -0.0, 0.75, 1.0]),
    ("mxfp4", "rceil", [3.0, -1.25, 0.5, 0.1, 2.2, -0.125, 0.75, 1.0], 126,
     [0xC7, 0x02, 0x86, 0x43], [3.0, -1.0, 0.5, 0.0, 2.0, -0.0, 0.75, 1.0]),
    # ceil: ceil(log2 3) = 2 -> e 0 (127), elements x:
    #   3 -> 0101 = 5;  -1.25 -> step .5: 2.5 -> 2 -> -1 = 1010 = 0xA;  0.5 -> 1;  0.1 -> 0
    #   2.2 -> 2 = 4;  -0.125 -> -0 = 8;  0.75 -> 1.5 units: tie -> 2 -> 1.0 = 2;  1 -> 2
    #   bytes: 0xA5, 0x01, 0x84, 0x22
    (
        "mxfp4", "ceil",
        [3.0, -1.25, 0.5, 0.1, 2.2, -0.125, 0.75, 1.0],
        127,
        [0xA5, 0x01, 0x84, 0x22],
        [3.0, -1.0, 0.5, 0.0, 2.0, -0.0, 1.0, 1.0],
    ),
    # mxfp4 saturation band, amax 7: floor e 0 (127): 7 -> 8 -> saturates to 6 (0111 = 7), -7 -> 1111 = 0xF,
    # 1 -> 2: bytes 0xF7, 0x02.
    ("mxfp4", "floor", [7.0, -7.0, 1.0], 127, [0xF7, 0x02], [6.0, -6.0, 1.0]),
    # ceil/even/rceil e 1 (128), x/2: 3.5 -> 4 (0110 = 6), -3.5 -> -4 (0xE), 0.5 -> 1: bytes 0xE6, 0x01.
    ("mxfp4", "ceil", [7.0, -7.0, 1.0], 128, [0xE6, 0x01], [8.0, -8.0, 1.0]),
    ("mxfp4", "even", [7.0, -7.0, 1.0], 128, [0xE6, 0x01], [8.0, -8.0, 1.0]),
    ("mxfp4", "rceil", [7.0, -7.0, 1.0], 128, [0xE6, 0x01], [8.0, -8.0, 1.0]),
    # mxfp4 floor, mixed magnitudes: amax 1000, floor(log2) = 9 -> e 7 (134), x/128:
    #   7.8125 -> step 2: 3.9 -> 4 -> 8 -> saturates 6 (7) -> 768;  0.001 -> 0
    #   0.78 -> 1.56 units of .5 -> 2 -> 1.0 (2) -> 128;  30/128 = 0.23 -> 0.47 units -> 0 (underflows)
    #   40/128 = 0.3125 -> 0.625 units -> 1 -> 0.5 (1) -> 64;  -40 -> 9
    #   bytes: 0x07, 0x02, 0x91
    ("mxfp4", "floor", [1000.0, 0.001, 100.0, 30.0, 40.0, -40.0], 134, [0x07, 0x02, 0x91],
     [768.0, 0.0, 128.0, 0.0, 64.0, -64.0]),
    # mxfp6_e3m2 floor, amax 10: floor(log2 10) = 3 -> e -1 (126), x*2 (code = s eee mm, bias 3):
    #   20 = 1.25*2^4 -> 0 111 01 = 0x1D
    #   -0.6 -> step 0.125 in [0.5,1): 4.8 -> 5 -> 0.625 = 1.25*2^-1 -> 1 010 01 = 0x29 -> -0.3125
    #   2.2 -> step 0.5: 4.4 -> 4 -> 2 -> 0 100 00 = 0x10 -> 1.0
    #   0.04 -> subnormal step 2^-4: 0.64 -> 1 -> 0x01 -> 0.03125
    ("mxfp6_e3m2", "floor", [10.0, -0.3, 1.1, 0.02], 126, [0x1D, 0x29, 0x10, 0x01],
     [10.0, -0.3125, 1.0, 0.03125]),
    # ceil: ceil(log2 10) = 4 -> e 0 (127), elements x:
    #   10 -> step 2: 5 -> 10 = 1.25*2^3 -> 0 110 01 = 0x19
    #   -0.3 -> step 1/16: 4.8 -> 5 -> 0.3125 -> 1 001 01 = 0x25
    #   1.1 -> step .25: 4.4 -> 4 -> 1.0 -> 0 011 00 = 0x0C;  0.02 -> 0.32 units -> 0
    ("mxfp6_e3m2", "ceil", [10.0, -0.3, 1.1, 0.02], 127, [0x19, 0x25, 0x0C, 0x00], [10.0, -0.3125, 1.0, 0.0]),
    # mxint8 floor, amax 3: floor(log2 3) = 1 -> e 1 (128), k = x/2*64 = 32x:
    #   96 (0x60);  -32 (0xE0);  0.32 -> 0;  -80 (256-80 = 0xB0);  22.4 -> 22 (0x16) -> 22/32 = 0.6875;
    #   -0.32 -> 0
    ("mxint8", "floor", [3.0, -1.0, 0.01, -2.5, 0.7, -0.01], 128, [0x60, 0xE0, 0x00, 0xB0, 0x16, 0x00],
     [3.0, -1.0, 0.0, -2.5, 0.6875, 0.0]),
    # rceil: d = 3/(127/64) = 1.51 -> e 1, as floor.
    ("mxint8", "rceil", [3.0, -1.0, 0.01, -2.5, 0.7, -0.01], 128, [0x60, 0xE0, 0x00, 0xB0, 0x16, 0x00],
     [3.0, -1.0, 0.0, -2.5, 0.6875, 0.0]),
    # ceil: ceil(log2 3) = 2 -> e 2 (129), k = 16x: 48 (0x30), -16 (0xF0), 0, -40 (0xD8), 11.2 -> 11 (0x0B), 0
    ("mxint8", "ceil", [3.0, -1.0, 0.01, -2.5, 0.7, -0.01], 129, [0x30, 0xF0, 0x00, 0xD8, 0x0B, 0x00],
     [3.0, -1.0, 0.0, -2.5, 0.6875, 0.0]),
    # mxint8 floor, amax 255/128: k = -127.5 -> RNE -128 -> symmetric saturation to -127 (0x81), never 0x80.
    ("mxint8", "floor", [-255 / 128, 255 / 128], 127, [0x81, 0x7F], [-127 / 64, 127 / 64]),
]


@pytest.mark.parametrize("fmt, mode, head, scale, codes, deq", GOLDEN_BLOCKS)
def test_golden_block(fmt, mode, head, scale, codes, deq):
    qt = quantize(block32(*head), fmt, mode)
    assert qt.scales.dtype == torch.uint8 and qt.scales.tolist() == [scale]
    assert qt.codes.dtype == torch.uint8
    assert qt.codes.tolist() == code_bytes(fmt, codes)
    # int8 has no -0: a negative value that rounds to zero comes back as +0.
    assert_values(qpass.dequantize(qt), block32(*deq), check_sign=fmt != "mxint8")
    fake = qpass.fake_quantize(f32(block32(*head)), fmt, scale_mode=mode)
    assert_values(fake, block32(*deq), check_sign=fmt != "mxint8")


# --------------------------------------------------------------------------------------------
# 3. Special blocks (SPEC section 3).
#
# Every format's amax-1 block [1, -0.5] gets e = -emax (code 127 - emax) in every mode (for rceil,
# d = 1/max_normal with max_normal in (2^emax, 2^(emax+1)) gives ceil(log2 d) = -emax), and its values
# are exact. Likewise the amax-2 block [2, 0.25] gets code 128 - emax, exact values.

EXACT_A = [1.0, -0.5]
EXACT_B = [2.0, 0.25]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", MX_FORMATS)
def test_all_zero_block(fmt, mode):
    x = f32(block32() + block32(*EXACT_A))
    qt = quantize(x, fmt, mode)
    assert qt.scales.tolist() == [0x00, 127 - EMAX[fmt]]
    n_bytes = 16 if fmt == "mxfp4" else 32
    assert qt.codes[:n_bytes].tolist() == [0] * n_bytes
    out = qpass.dequantize(qt)
    assert_values(out, x)  # exact zeros (+0) in block 0, exact values in block 1
    assert_values(qpass.fake_quantize(x, fmt, scale_mode=mode), x)


def test_all_zero_tensor_dequantizes_to_exact_zeros():
    x = torch.zeros(3, 70)
    for fmt in MX_FORMATS:
        qt = qpass.quantize(x, fmt)
        assert qt.scales.tolist() == [[0, 0, 0]] * 3
        assert int(qt.codes.max()) == 0
        assert_values(qpass.dequantize(qt), x)


@pytest.mark.parametrize("special", [math.nan, math.inf, -math.inf], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", MX_FORMATS)
def test_nonfinite_block_is_all_nan_and_isolated(fmt, mode, special):
    nonfinite = block32(*EXACT_A)
    nonfinite[7] = special
    x = f32(block32(*EXACT_A) + nonfinite + block32(*EXACT_B))
    qt = quantize(x, fmt, mode)
    assert qt.scales.tolist() == [127 - EMAX[fmt], 0xFF, 128 - EMAX[fmt]]
    # fp8 elements encode NaN as 0x7F; fp6/fp4/int8 have no NaN code and hold 0 (the scale carries the NaN).
    per_block = 16 if fmt == "mxfp4" else 32
    nan_code = 0x7F if fmt in FP8_FORMATS else 0x00
    assert qt.codes[per_block : 2 * per_block].tolist() == [nan_code] * per_block
    expected = f32(block32(*EXACT_A) + [math.nan] * 32 + block32(*EXACT_B))
    assert_values(qpass.dequantize(qt), expected)
    assert_values(qpass.fake_quantize(x, fmt, scale_mode=mode), expected)


def test_nonfinite_blocks_in_a_matrix_only_poison_their_own_block():
    x = torch.ones(2, 96)
    x[0, 40] = math.nan
    x[1, 95] = math.inf
    out = qpass.fake_quantize(x, "mxfp8_e4m3")
    assert qpass.quantize(x, "mxfp8_e4m3").scales.tolist() == [[119, 0xFF, 119], [119, 119, 0xFF]]
    expected = torch.ones(2, 96)
    expected[0, 32:64] = math.nan
    expected[1, 64:96] = math.nan
    assert_values(out, expected)


# fp32 subnormal amax: 1.5*2^-133 ~ 1.38e-40 (an fp32 subnormal). Every mode's e is far below -127
# (floor -133-emax, ceil -132-emax, even -133-emax, rceil ceil(log2(amax/max)) < -133), so it clamps to
# -127: code 0x00 and the elements are x * 2^127, exactly:
#   1.5*2^-133 -> 1.5*2^-6;  -2^-140 -> -2^-13;  2^-137 -> 2^-10;  1.5*2^-136 -> 1.5*2^-9
SUBNORMAL_BLOCK = [1.5 * 2.0**-133, -(2.0**-140), 2.0**-137, 1.5 * 2.0**-136]
SUBNORMAL_GOLDEN = {
    # E4M3: 1.5*2^-6 is the smallest binade: 0 0001 100 = 0x0C; -2^-13 -> -0 (0x80);
    # 2^-10 is half the smallest subnormal: tie -> 0; 1.5*2^-9 -> tie -> 2 units = 0x02 -> 2^-8 * 2^-127.
    "mxfp8_e4m3": ([0x0C, 0x80, 0x00, 0x02], [1.5 * 2.0**-133, -0.0, 0.0, 2.0**-135]),
    # int8, k = 64 * x * 2^127: 1.5 -> RNE 2 (0x02) -> 2/64 * 2^-127 = 2^-132;
    # -0.0078 -> 0; 0.0625 -> 0; 0.1875 -> 0.
    "mxint8": ([0x02, 0x00, 0x00, 0x00], [2.0**-132, 0.0, 0.0, 0.0]),
    # E2M1: everything is below 0.25 (half of 0.5): all zero; -2^-13 keeps its sign: nibble 8 -> byte 0x80.
    "mxfp4": ([0x80, 0x00], [0.0, -0.0, 0.0, 0.0]),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", sorted(SUBNORMAL_GOLDEN))
def test_fp32_subnormal_amax_clamps_scale_to_2_pow_minus_127(fmt, mode):
    codes, deq = SUBNORMAL_GOLDEN[fmt]
    x = f32(block32(*SUBNORMAL_BLOCK))
    assert x[0].item() == 1.5 * 2.0**-133 and x[0].item() < 2.0**-126  # really an fp32 subnormal
    qt = quantize(x, fmt, mode)
    assert qt.scales.tolist() == [0x00]
    assert qt.codes.tolist() == code_bytes(fmt, codes)
    assert_values(qpass.dequantize(qt), block32(*deq), check_sign=fmt != "mxint8")


@pytest.mark.parametrize("mode", MODES)
def test_fp32_subnormal_elements_are_kept_in_an_unclamped_block(mode):
    # amax 2^-110: e = -110-8 = -118 in floor/ceil/even (a power of two), and rceil
    # ceil(log2(2^-110/448)) = ceil(-118.8) = -118: code 9.  Elements x * 2^118:
    #   2^-110 -> 2^8 = 0 1111 000 = 0x78;  2^-127 (subnormal) -> 2^-9 = 0x01
    #   -3*2^-128 -> -1.5 units of 2^-9 -> tie -> -2 units = 0x82 -> -2^-126
    #   5*2^-130 -> 0.625 units -> 1 -> 2^-127
    x = f32(block32(2.0**-110, 2.0**-127, -3 * 2.0**-128, 5 * 2.0**-130))
    qt = quantize(x, "mxfp8_e4m3", mode)
    assert qt.scales.tolist() == [9]
    assert qt.codes.tolist() == code_bytes("mxfp8_e4m3", [0x78, 0x01, 0x82, 0x01])
    assert_values(qpass.dequantize(qt), block32(2.0**-110, 2.0**-127, -(2.0**-126), 2.0**-127))


# Huge amax near fp32 max.
HUGE_GOLDEN = [
    # mxint8, amax 1.75*2^127: floor 127; ceil 128 -> clamps to 127; even 1.11b fits 6 bits -> 127;
    # rceil d = 1.75*2^127/(127/64) = 0.88*2^127 -> 127.  All code 254.  k = 64*1.75 = 112 (0x70),
    # -> -112 = 0x90;  2^120 * 2^-127 = 2^-7 -> k = 0.5 -> tie -> 0;  1.0 -> 0.
    *[("mxint8", m, [-1.75 * 2.0**127, 2.0**120, 1.0], 254, [0x90, 0x00, 0x00], [-1.75 * 2.0**127, 0.0, 0.0])
      for m in MODES],
    # mxint8, amax = fp32 max = (2 - 2^-23)*2^127: floor 127; ceil 128 -> 127; even: the mantissa rounds
    # up to 2.0 -> 2^128 -> 128 -> clamps to 127; rceil d = 1.7e38 > 2^127 -> 128 -> 127.  All code 254.
    # k = 64*(2 - 2^-23) = 127.99999 -> 128 -> saturates to 127 (0x7F) -> 127/64 * 2^127 = 127 * 2^121.
    *[("mxint8", m, [FP32_MAX], 254, [0x7F], [127 * 2.0**121]) for m in MODES],
    # mxfp8_e4m3, amax = fp32 max: floor 127-8 = 119 (246), element (2-2^-23)*2^8 = 511.99997 -> 512
    # -> saturates to 448 (0x7E).
    ("mxfp8_e4m3", "floor", [FP32_MAX], 246, [0x7E], [448 * 2.0**119]),
    # mxfp4 floor: 127-2 = 125 (252); element (2-2^-23)*4 = 7.99999 -> 8 -> saturates to 6 (0111)
    # -> 1.5*2^127;
    # -2^126 * 2^-125 = -2 (1100): byte 0xC7.
    ("mxfp4", "floor", [FP32_MAX, -(2.0**126)], 252, [0xC7], [1.5 * 2.0**127, -(2.0**126)]),
]


@pytest.mark.parametrize("fmt, mode, head, scale, codes, deq", HUGE_GOLDEN)
def test_huge_amax_near_fp32_max(fmt, mode, head, scale, codes, deq):
    qt = quantize(block32(*head), fmt, mode)
    assert qt.scales.tolist() == [scale]
    assert qt.codes.tolist() == code_bytes(fmt, codes)
    assert_values(qpass.dequantize(qt), block32(*deq), check_sign=fmt != "mxint8")


@pytest.mark.parametrize(
    "mode, code",
    # mxfp8_e4m3, amax fp32 max: ceil 128-8 = 120; even: mantissa rounds to 2.0 -> 2^128 -> 120;
    # rceil: d = FP32_MAX/448 = 2^119.19 -> 120.  (The element 255.99998 rounds to 256 = 0x78; 256 * 2^120
    # is 2^128, which overflows fp32 on the way back, so only codes are checked here.)
    [("floor", 246), ("ceil", 247), ("even", 247), ("rceil", 247)],
)
def test_huge_amax_scale_codes_mxfp8(mode, code):
    qt = quantize(block32(FP32_MAX), "mxfp8_e4m3", mode)
    assert qt.scales.tolist() == [code]
    assert qt.codes[0].item() == (0x7E if mode == "floor" else 0x78)


# --------------------------------------------------------------------------------------------
# 4. Padding, shapes and layout (SPEC sections 3 and 4).


def test_padding_k_not_a_multiple_of_32_mxfp4():
    # Row 0: block 0 is 32 ones: e = 0-2 = -2 (125), 1*4 = 4 = 0110 -> bytes 0x66.
    #        block 1 holds 8 values and 24 padding zeros: amax 3 -> e -1 (126), x*2:
    #        0.5 -> 1; -6 -> 0xF; 1 -> 2; 0, 0, 0, 0; 3 -> 0101 = 5  => bytes 0xF1, 0x02, 0x00, 0x50.
    # Row 1: the negatives (zeros stay +0): -4 = 1110 -> 0xEE;  -0.5 -> 9, 6 -> 7, -1 -> 0xA, -3 -> 0xD
    #        => 0x79, 0x0A, 0x00, 0xD0.
    tail = [0.25, -3.0, 0.5, 0.0, 0.0, 0.0, 0.0, 1.5]
    x = f32([[1.0] * 32 + tail, [-1.0] * 32 + [-v if v else 0.0 for v in tail]])
    qt = qpass.quantize(x, "mxfp4")
    assert qt.scales.dtype == torch.uint8 and qt.scales.shape == (2, 2)
    assert qt.scales.tolist() == [[125, 126], [125, 126]]
    assert qt.codes.shape == (2, 32)  # K_pad = 64 codes, two per byte
    assert qt.codes.tolist() == [
        [0x66] * 16 + [0xF1, 0x02, 0x00, 0x50] + [0] * 12,
        [0xEE] * 16 + [0x79, 0x0A, 0x00, 0xD0] + [0] * 12,
    ]
    assert qt.shape == x.shape
    assert_values(qpass.dequantize(qt), x)  # every value is on the grid


@pytest.mark.parametrize("fmt", MX_FORMATS)
def test_padding_never_changes_unpadded_values(fmt):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 45, generator=gen) * 10
    padded = torch.cat([x, torch.zeros(3, 19)], dim=1)  # explicit zeros to 64
    qt, qt_padded = qpass.quantize(x, fmt), qpass.quantize(padded, fmt)
    assert torch.equal(qt.scales, qt_padded.scales)
    assert torch.equal(qt.codes, qt_padded.codes)
    assert_values(qpass.dequantize(qt), qpass.dequantize(qt_padded)[:, :45])
    # The partial block on its own (padded from 13 to 32) gives the same tail.
    tail = qpass.quantize(x[:, 32:].contiguous(), fmt)
    assert torch.equal(tail.scales[:, 0], qt.scales[:, 1])
    assert_values(qpass.dequantize(tail), qpass.dequantize(qt)[:, 32:])


@pytest.mark.parametrize(
    "shape, axis, scale_shape",
    [
        ((5,), -1, (1,)),
        ((1,), 0, (1,)),
        ((3, 64), -1, (3, 2)),
        ((3, 65), 1, (3, 3)),
        ((2, 3, 70), -1, (2, 3, 3)),
        ((40, 3), 0, (3, 2)),
        ((2, 33, 4), 1, (2, 4, 2)),
    ],
)
@pytest.mark.parametrize("fmt", ["mxfp8_e4m3", "mxfp6_e3m2", "mxfp4", "mxint8"])
def test_layout_shapes(fmt, shape, axis, scale_shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    qt = qpass.quantize(x, fmt, axis=axis)
    assert qt.scales.dtype == torch.uint8
    assert qt.scales.shape == scale_shape  # [..., ceil(K/32)], quantization axis last
    k_pad = scale_shape[-1] * 32
    assert qt.codes.dtype == torch.uint8
    assert qt.codes.shape == (*scale_shape[:-1], k_pad // 2 if fmt == "mxfp4" else k_pad)
    assert qt.shape == x.shape and qt.axis == axis % len(shape) and qt.dtype == torch.float32
    out = qpass.dequantize(qt)
    assert out.shape == x.shape and out.dtype == x.dtype
    # Quantizing along `axis` is quantizing the moved-last tensor along -1.
    moved = qpass.quantize(x.movedim(axis, -1).contiguous(), fmt)
    assert torch.equal(moved.codes, qt.codes) and torch.equal(moved.scales, qt.scales)
    assert_values(out, qpass.dequantize(moved).movedim(-1, axis))


def test_bf16_input_round_trips_dtype():
    x = (torch.randn(4, 40, generator=torch.Generator().manual_seed(3)) * 3).to(torch.bfloat16)
    qt = qpass.quantize(x, "mxfp8_e4m3")
    out = qpass.dequantize(qt)
    assert out.dtype == torch.bfloat16 and qt.dtype == torch.bfloat16
    # bf16 upcasts exactly, so the codes are those of the fp32 copy.
    ref = qpass.quantize(x.float(), "mxfp8_e4m3")
    assert torch.equal(qt.codes, ref.codes) and torch.equal(qt.scales, ref.scales)
    assert torch.equal(qpass.fake_quantize(x, "mxfp8_e4m3"), out)


def test_bits_per_element():
    # 8-bit elements + one 8-bit E8M0 scale per 32; fp4: 4 + 8/32.
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(4))
    assert qpass.quantize(x, "mxfp8_e4m3").bits_per_element() == 8 + 8 / 32
    assert qpass.quantize(x, "mxfp6_e3m2").bits_per_element() == 6 + 8 / 32
    assert qpass.quantize(x, "mxfp4").bits_per_element() == 4 + 8 / 32


# --------------------------------------------------------------------------------------------
# 5. Random blocks against an independent implementation.


def ref_exponent(amax: float, fmt: str, mode: str) -> int:
    """SPEC section 2 with Python floats: the clamped shared exponent for a finite amax > 0."""
    mant, exp = math.frexp(amax)  # amax = mant * 2^exp, mant in [0.5, 1)
    emax = EMAX[fmt]
    if mode == "floor":
        e = (exp - 1) - emax
    elif mode == "ceil":
        e = exp - (mant == 0.5) - emax
    elif mode == "even":
        # Round the significand 2*mant in [1, 2) to MBITS fraction bits, half up; 2.0 carries.
        rounded = math.floor(2 * mant * 2 ** MBITS[fmt] + 0.5) / 2 ** MBITS[fmt]
        e = (exp - 1 + (rounded == 2.0)) - emax
    else:
        d = float(np.float32(amax) / np.float32(MAX_NORMAL[fmt]))  # one fp32 division
        d_mant, d_exp = math.frexp(d)
        e = d_exp - (d_mant == 0.5)
    return max(-127, min(127, e))


def ref_elements(scaled: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """RNE + satfinite with ml_dtypes (or numpy for int8): (element values, element codes)."""
    if fmt == "mxint8":
        k = np.clip(np.round(scaled * 64), -127, 127)  # np.round is half to even
        return (k / 64).astype(np.float32), k.astype(np.int8).view(np.uint8)
    # Clamping to +-max first and then casting RNE is satfinite (ml_dtypes' fp8 casts do not saturate).
    limit = MAX_NORMAL[fmt]
    cast = np.clip(scaled, -limit, limit).astype(np.float32).astype(ML_DTYPE[fmt])
    return cast.astype(np.float32), cast.view(np.uint8)


def random_blocks(gen: torch.Generator) -> torch.Tensor:
    # Rows of 3 blocks (K = 80, the last one padded) at magnitudes from 2^-30 to 2^30, some
    # blocks with a tiny tail that underflows, so every mode's rounding paths get used.
    x = torch.randn(6, 80, generator=gen, dtype=torch.float64)
    x *= 2.0 ** torch.randint(-30, 30, (6, 1), generator=gen)
    x[:, 40:48] *= 1e-3
    x[1, :] = torch.tensor([7.0, 6.5, 449.0, 29.0, 1.99, 0.75, 496.0, 3.0] * 10)  # near binade edges
    return x.float()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", MX_FORMATS)
def test_random_blocks_match_independent_reference(fmt, mode):
    x = random_blocks(torch.Generator().manual_seed(10 * MX_FORMATS.index(fmt) + MODES.index(mode)))
    qt = quantize(x, fmt, mode)
    xp = np.concatenate([x.numpy(), np.zeros((6, 16), np.float32)], axis=1).reshape(6, 3, 32)

    exps = np.array([[ref_exponent(float(np.abs(b).max()), fmt, mode) for b in row] for row in xp])
    assert qt.scales.tolist() == (exps + 127).tolist()
    scaled = xp * np.ldexp(np.float32(1), -exps)[..., None]  # exact power-of-two scaling
    values, codes = ref_elements(scaled.astype(np.float32), fmt)
    codes = codes.reshape(6, 96)
    if fmt == "mxfp4":
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    assert qt.codes.numpy().tolist() == codes.tolist()
    expected = torch.from_numpy((values * np.ldexp(np.float32(1), exps)[..., None]).reshape(6, 96)[:, :80])
    assert_values(qpass.dequantize(qt), expected, check_sign=fmt != "mxint8")
    assert_values(qpass.fake_quantize(x, fmt, scale_mode=mode), expected, check_sign=fmt != "mxint8")


@pytest.mark.parametrize("fmt", MX_FORMATS)
def test_dequantize_matches_independent_decoder(fmt):
    # Decode the stored bytes without qpass: E8M0 via torch.float8_e8m0fnu, elements via ml_dtypes.
    x = random_blocks(torch.Generator().manual_seed(5))
    qt = qpass.quantize(x, fmt, scale_mode="rceil")
    scales = qt.scales.view(torch.float8_e8m0fnu).float().numpy()  # 2^(code-127)
    codes = qt.codes.numpy()
    if fmt == "mxfp4":
        codes = np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(6, 96)
    if fmt == "mxint8":
        elements = codes.view(np.int8).astype(np.float32) / 64
    else:
        elements = codes.view(ML_DTYPE[fmt]).astype(np.float32)
    expected = (elements.reshape(6, 3, 32) * scales[..., None]).reshape(6, 96)[:, :80]
    assert_values(qpass.dequantize(qt), torch.from_numpy(expected))
