"""The formats' numerics as Triton device functions: the kernels' building blocks.

Each function mirrors one step of :mod:`qpass.formats` and does it with integer and bit arithmetic
(or fp32 operations that are exact), so a kernel's codes and scales are the reference's bits on a
GPU and under ``TRITON_INTERPRET=1`` alike: the interpreter's own float casts do not round as torch
does, and a GPU's default fp32 division is not correctly rounded (``div_rn`` is).

An element format arrives as constexprs (:class:`qpass.codegen.spec.KernelSpec` spells them out):
``MBITS`` mantissa bits, ``EMIN`` the exponent of its smallest normal binade, ``EBITS``,
``MAX_NORMAL``, ``HAS_INF``, ``HAS_NAN`` and ``IS_INT`` (MX int8).
"""

from __future__ import annotations

import triton
import triton.language as tl

# tl.constexpr objects, not annotated ints: Triton's compiler reads no other globals (the interpreter
# does, which is how plain ints went unnoticed).
F32_EXP_MASK = tl.constexpr(0x7F800000)
F32_ABS_MASK = tl.constexpr(0x7FFFFFFF)
F32_INF_BITS = tl.constexpr(0x7F800000)
F32_TINY = tl.constexpr(1.1754943508222875e-38)  # 2^-126, fp32's smallest normal
F32_MAX = tl.constexpr(3.4028234663852886e38)
F32_MIN_SUBNORMAL = tl.constexpr(1.401298464324817e-45)  # 2^-149
TWO_POW_64 = tl.constexpr(18446744073709551616.0)
ROUNDING_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23

# Rounding modes, as the constexpr ints the kernels branch on.
RNE = tl.constexpr(0)
STOCHASTIC = tl.constexpr(1)
AWAY = tl.constexpr(2)


@triton.jit
def float_bits(x):
    return x.to(tl.int32, bitcast=True)


@triton.jit
def bits_float(bits):
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def is_nan(x):
    return (float_bits(x) & F32_ABS_MASK) > F32_INF_BITS


@triton.jit
def is_inf(x):
    return (float_bits(x) & F32_ABS_MASK) == F32_INF_BITS


@triton.jit
def is_finite(x):
    return (float_bits(x) & F32_ABS_MASK) < F32_INF_BITS


@triton.jit
def abs_bits(x):
    """|x| as int32 bits. Their integer order is |x|'s order with NaN above Inf, so an integer max
    is an amax that propagates NaN on every backend (float max does not promise to)."""
    return float_bits(x) & F32_ABS_MASK


@triton.jit
def pow2(e):
    """``2.0 ** e`` exactly, for int32 e in [-149, 127] (fp32 subnormals below 2^-126)."""
    normal = (e + 127) << 23
    subnormal = 1 << tl.minimum(tl.maximum(e + 149, 0), 22)
    return bits_float(tl.where(e >= -126, normal, subnormal))


@triton.jit
def exponent_and_mantissa(x):
    """floor(log2 x) and x's 23 mantissa bits for finite x > 0, fp32 subnormals included."""
    subnormal = x < F32_TINY
    bits = float_bits(tl.where(subnormal, x * TWO_POW_64, x))
    exponent = ((bits >> 23) & 0xFF) - 127 - subnormal.to(tl.int32) * 64
    return exponent, bits & 0x7FFFFF


@triton.jit
def floor_log2(x):
    exponent, _ = exponent_and_mantissa(x)
    return exponent


@triton.jit
def ceil_log2(x):
    exponent, mantissa = exponent_and_mantissa(x)
    return exponent + (mantissa != 0).to(tl.int32)


@triton.jit
def sign_of(x, magnitude):
    """``magnitude`` (non-negative or NaN) with the sign bit of ``x``: torch's ``copysign``."""
    return bits_float(float_bits(magnitude) | (float_bits(x) & -2147483648))


@triton.jit
def nearest_integer(x):
    """x rounded to an integer, half to even, for |x| < 2^22: adding and subtracting 1.5 * 2^23
    lands on fp32's integer spacing, so the additions' own rounding does it (exact on every
    backend, with no float-to-int cast involved)."""
    return (x + ROUNDING_MAGIC) - ROUNDING_MAGIC


@triton.jit
def floor(x):
    """floor(x) for |x| < 2^22."""
    nearest = nearest_integer(x)
    return nearest - (nearest > x).to(tl.float32)


@triton.jit
def div_rn(a, b):
    """The correctly rounded fp32 quotient of two tensors (a GPU's ``/`` is approximate)."""
    return tl.math.div_rn(a, b)


@triton.jit
def to_float32(x):
    """``x`` (fp32, bf16 or fp16) as fp32, exactly. bfloat16 is widened on the bits: the
    interpreter's bf16-to-fp32 cast renormalizes subnormals into wrong values."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def cast_rn(x, DTYPE: tl.constexpr):
    """fp32 ``x`` as ``DTYPE`` (a store's element type), rounded to nearest even as torch's ``.to``.
    bfloat16 is rounded on the bits: the interpreter's fp32-to-bf16 cast truncates."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16  # carries into the exponent as RNE does
        rounded = tl.where(is_nan(x), 0x7FC0, rounded)  # torch's NaN (a carry could turn one into Inf)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def filled(like, value):
    """A tensor shaped like ``like`` holding ``value`` (to divide a constant by a tensor)."""
    return tl.zeros_like(like) + value


@triton.jit
def round_to_element(
    x, offsets, seed, ROUNDING: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr,
    MAX_NORMAL: tl.constexpr, HAS_INF: tl.constexpr, IS_INT: tl.constexpr,
):
    """:func:`qpass.formats.rounding.round_to_element`, step for step.

    Stochastic rounding draws ``tl.rand(seed, offsets)`` (Philox): the same seed and element
    offsets give the same result whatever the block sizes, but not torch's random stream.
    """
    exponent_bits = tl.minimum(
        tl.maximum(float_bits(x) & F32_EXP_MASK, (EMIN + 127) << 23), (127 + 126) << 23
    )
    # 2^(254 + MBITS - E): the constant split in two so that neither overflows an int32 literal.
    inverse_step = bits_float(((127 + MBITS) << 23) - exponent_bits + (127 << 23))
    step = bits_float(exponent_bits - (MBITS << 23))
    scaled = inverse_step * x  # exact; |scaled| < 2^(MBITS + 2) for every finite x
    if ROUNDING == STOCHASTIC:
        whole = floor(scaled)
        integral = whole + (tl.rand(seed, offsets) < scaled - whole).to(tl.float32)  # the fraction is exact
    else:
        magnitude = tl.abs(scaled)
        integral = nearest_integer(magnitude)
        if ROUNDING == AWAY:
            whole = integral - (integral > magnitude).to(tl.float32)
            integral = whole + (magnitude - whole >= 0.5).to(tl.float32)
    values = sign_of(scaled, tl.abs(step * integral))  # rne keeps -0 as torch.round does
    values = tl.where(values > MAX_NORMAL, MAX_NORMAL, values)  # comparisons keep NaN
    values = tl.where(values < -MAX_NORMAL, -MAX_NORMAL, values)
    if IS_INT:
        values = values + 0.0  # two's complement has no -0
    if HAS_INF:
        values = tl.where(is_inf(x), x, values)
    else:
        values = tl.where(is_inf(x), float("nan"), values)
    return values


@triton.jit
def encode_element(
    values, EBITS: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, HAS_INF: tl.constexpr,
    HAS_NAN: tl.constexpr, IS_INT: tl.constexpr,
):
    """:func:`qpass.formats.element.encode`: exact element values to int32 codes (low bits)."""
    nan = is_nan(values)
    inf = is_inf(values)
    if IS_INT:
        k = tl.where(nan | inf, 0.0, values * 64.0).to(tl.int32)
        return k & 0xFF
    sign = (float_bits(values) >> 31) & 1
    magnitude = tl.where(nan | inf, 0.0, tl.abs(values))
    exponent, mantissa = exponent_and_mantissa(tl.where(magnitude > 0, magnitude, 1.0))
    normal_code = ((exponent + (1 - EMIN)) << MBITS) | (mantissa >> (23 - MBITS))
    subnormal_code = (
        (magnitude * pow2(tl.full(magnitude.shape, MBITS - EMIN, tl.int32))).to(tl.int32)  # exact
    )
    min_normal = pow2(tl.full(magnitude.shape, EMIN, tl.int32))
    code = tl.where(magnitude < min_normal, subnormal_code, normal_code)
    code = code | (sign << (EBITS + MBITS))
    special = 0  # a format without NaN stores +0: its group's scale carries the NaN
    if HAS_NAN:
        special = (1 << (EBITS + MBITS)) - 1  # S.111..1 with S = 0
    if HAS_INF:
        code = tl.where(inf, (((1 << EBITS) - 1) << MBITS) | (sign << (EBITS + MBITS)), code)
    else:
        code = tl.where(inf, special, code)
    return tl.where(nan, special, code)


@triton.jit
def decode_element(
    code, EBITS: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, HAS_INF: tl.constexpr,
    HAS_NAN: tl.constexpr, IS_INT: tl.constexpr,
):
    """:func:`qpass.formats.element.decode`: int32 codes to their fp32 values."""
    if IS_INT:
        return (((code & 0xFF) ^ 0x80) - 0x80).to(tl.float32) * 0.015625  # k / 64
    sign = (code >> (EBITS + MBITS)) & 1
    exponent_field = (code >> MBITS) & ((1 << EBITS) - 1)
    mantissa = code & ((1 << MBITS) - 1)
    normal = bits_float(((exponent_field - (1 - EMIN) + 127) << 23) | (mantissa << (23 - MBITS)))
    subnormal = mantissa.to(tl.float32) * pow2(tl.full(code.shape, EMIN - MBITS, tl.int32))
    magnitude = tl.where(exponent_field == 0, subnormal, normal)
    top = exponent_field == (1 << EBITS) - 1
    if HAS_INF:  # E5M2: IEEE-style specials in the top binade
        magnitude = tl.where(top, tl.where(mantissa == 0, float("inf"), float("nan")), magnitude)
    elif HAS_NAN:  # E4M3FN: only S.1111.111
        magnitude = tl.where(top & (mantissa == (1 << MBITS) - 1), float("nan"), magnitude)
    return tl.where(sign == 1, -magnitude, magnitude)


@triton.jit
def absmax_encode(amax, MAX_NORMAL: tl.constexpr, POW2: tl.constexpr):
    """:func:`qpass.formats.absmax.absmax_encode` (no margin: delayed scaling stays in torch)."""
    encode = div_rn(filled(amax, MAX_NORMAL), amax)
    encode = tl.where(encode < F32_TINY, F32_TINY, encode)
    encode = tl.where(encode > F32_MAX, F32_MAX, encode)
    if POW2:
        encode = pow2(floor_log2(encode))
    encode = tl.where(amax == 0, 1.0, encode)
    return tl.where(is_finite(amax), encode, float("nan"))


@triton.jit
def mx_exponent(
    amax, EMAX: tl.constexpr, MBITS: tl.constexpr, MAX_NORMAL: tl.constexpr, SCALE_MODE: tl.constexpr,
):
    """:func:`qpass.formats.mx.shared_exponent` for finite amax > 0. SCALE_MODE: 0 floor, 1 ceil,
    2 even, 3 rceil."""
    if SCALE_MODE == 0:
        e = floor_log2(amax) - EMAX
    elif SCALE_MODE == 1:
        e = ceil_log2(amax) - EMAX
    elif SCALE_MODE == 2:
        exponent, mantissa = exponent_and_mantissa(amax)
        e = exponent + ((mantissa + (1 << (23 - MBITS - 1))) >> 23) - EMAX
    else:
        d = div_rn(amax, filled(amax, MAX_NORMAL))
        e = ceil_log2(tl.where(d > 0, d, F32_MIN_SUBNORMAL))
    return e


@triton.jit
def e8m0_codes(
    amax, EMAX: tl.constexpr, MBITS: tl.constexpr, MAX_NORMAL: tl.constexpr, SCALE_MODE: tl.constexpr,
):
    """:func:`qpass.formats.mx.e8m0_codes` as int32: 0xFF for a non-finite block, 0 for zeros."""
    positive = amax > 0
    finite = is_finite(amax)
    e = mx_exponent(tl.where(positive & finite, amax, 1.0), EMAX, MBITS, MAX_NORMAL, SCALE_MODE)
    e = tl.minimum(tl.maximum(e, -127), 127)
    codes = tl.where(positive, e + 127, 0)
    return tl.where(finite, codes, 0xFF)


@triton.jit
def e8m0_value(codes, RECIPROCAL: tl.constexpr):
    """``2^(code - 127)`` (``2^(127 - code)`` for RECIPROCAL); NaN for 0xFF."""
    if RECIPROCAL:
        value = pow2(127 - codes)
    else:
        value = pow2(codes - 127)
    return tl.where(codes == 0xFF, float("nan"), value)


@triton.jit
def nvfp4_global_scale(tensor_amax):
    """:func:`qpass.formats.nvfp4.global_scale`."""
    g = div_rn(tensor_amax, filled(tensor_amax, 2688.0))
    g = tl.where(tensor_amax == 0, 1.0, tl.where(g < F32_MIN_SUBNORMAL, F32_MIN_SUBNORMAL, g))
    return tl.where(is_finite(tensor_amax), g, float("nan"))


@triton.jit
def nvfp4_block_scale(block_amax, g):
    """:func:`qpass.formats.nvfp4.block_scales`: ``s_b``, an exact E4M3 value in fp32."""
    ratio = div_rn(div_rn(block_amax, filled(block_amax, 6.0)), g + tl.zeros_like(block_amax))
    ratio = tl.where(ratio < 0.015625, 0.015625, ratio)
    ratio = tl.where(ratio > 448.0, 448.0, ratio)
    return round_to_element(ratio, 0, 0, RNE, 3, -6, 448.0, False, False)


@triton.jit
def nvfp4_element_encode(g, s_b):
    """:func:`qpass.formats.nvfp4.element_encode`: ``(1 / g) / s_b``, at most fp32's max."""
    encode = div_rn(div_rn(filled(g, 1.0), g) + tl.zeros_like(s_b), s_b)
    return tl.where(encode > F32_MAX, F32_MAX, encode)
