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
FOUR_OVER_SIX = tl.constexpr(4)  # nvfp4's SCALE_MODE for 4over6 (qpass.codegen.spec.SCALE_MODES)


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
def mul_unfused(a, b):
    """``a * b`` rounded to fp32 (but for its sign where it is 0), never fused with an add or
    subtract of it: a GPU compiler contracts ``a * b - c`` into one fma by default (one rounding
    where the reference, two torch ops, rounds twice). ``fma(a, b, +0)`` is that rounded product
    (``-0 + 0 = +0``, so no compiler may rewrite it as a plain multiply without a no-signed-zeros
    flag), and an fma is not contracted further. libdevice's ``mul_rn`` would flush subnormals."""
    return tl.fma(a, b, tl.zeros_like(a))


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
def nvfp4_global_scale(tensor_amax, SCALE_MODE: tl.constexpr):
    """:func:`qpass.formats.nvfp4.global_scale`: ``amax / 2688``, or ``/ 1536`` for 4over6."""
    DIVISOR: tl.constexpr = 1536.0 if SCALE_MODE == FOUR_OVER_SIX else 2688.0
    g = div_rn(tensor_amax, filled(tensor_amax, DIVISOR))
    g = tl.where(tensor_amax == 0, 1.0, tl.where(g < F32_MIN_SUBNORMAL, F32_MIN_SUBNORMAL, g))
    return tl.where(is_finite(tensor_amax), g, float("nan"))


@triton.jit
def _nvfp4_ratio(block_amax, g):
    """``(block_amax / 6) / g``: the block scale before its clamp and rounding."""
    return div_rn(div_rn(block_amax, filled(block_amax, 6.0)), g + tl.zeros_like(block_amax))


@triton.jit
def _e4m3_scale(ratio):
    """``e4m3_rne(clamp(ratio, 2^-6, 448))`` as an exact E4M3 value in fp32."""
    ratio = tl.where(ratio < 0.015625, 0.015625, ratio)
    ratio = tl.where(ratio > 448.0, 448.0, ratio)
    return round_to_element(ratio, 0, 0, RNE, 3, -6, 448.0, False, False)


@triton.jit
def nvfp4_block_scale(block_amax, g):
    """:func:`qpass.formats.nvfp4.block_scales`: ``s_b``, an exact E4M3 value in fp32."""
    return _e4m3_scale(_nvfp4_ratio(block_amax, g))


@triton.jit
def _pair_sums(v, ROWS: tl.constexpr, GROUPS: tl.constexpr, COLS: tl.constexpr):
    """``[ROWS, GROUPS, COLS]`` to ``[ROWS, GROUPS, COLS / 2]``: columns 2j and 2j + 1 summed."""
    left, right = tl.split(tl.reshape(v, (ROWS, GROUPS, COLS // 2, 2)))
    return left + right


@triton.jit
def _quad_sums(v, ROWS: tl.constexpr, GROUPS: tl.constexpr, COLS: tl.constexpr):
    """``[ROWS, GROUPS, COLS]`` to ``[ROWS / 2, GROUPS, COLS / 2]``: each 2x2 square of rows 2i,
    2i + 1 and columns 2j, 2j + 1 summed ``(top left + bottom right) + (top right + bottom left)``."""
    left, right = tl.split(tl.reshape(v, (ROWS, GROUPS, COLS // 2, 2)))
    # Rows 2i and 2i + 1 apart, moved last to split them (a shape must be literal constexprs).
    top_left, bottom_left = tl.split(
        tl.permute(tl.reshape(left, (ROWS // 2, 2, GROUPS, COLS // 2)), (0, 2, 3, 1))
    )
    top_right, bottom_right = tl.split(
        tl.permute(tl.reshape(right, (ROWS // 2, 2, GROUPS, COLS // 2)), (0, 2, 3, 1))
    )
    return (top_left + bottom_right) + (top_right + bottom_left)


@triton.jit
def _nvfp4_squared_error(blocks, g, s_b, ROWS: tl.constexpr, GROUPS: tl.constexpr, TILES: tl.constexpr):
    """The squared error of each 16-element block of ``blocks`` ``[ROWS, GROUPS, 16]`` quantized
    with ``s_b`` ``[ROWS, GROUPS]`` (RNE, dequantized ``q * (s_b * g)``), ``[ROWS, GROUPS]``, summed
    in :mod:`qpass.formats.nvfp4`'s orders: adjacent pairs; for TILES, the quadtree of each 16x16
    tile (16 consecutive rows), repeated on its rows."""
    encode = nvfp4_element_encode(g, s_b)
    decode = s_b * g
    values = round_to_element(blocks * encode[:, :, None], 0, 0, RNE, 1, 0, 6.0, False, False)
    diff = mul_unfused(values, tl.broadcast_to(decode[:, :, None], (ROWS, GROUPS, 16))) - blocks
    squares = mul_unfused(diff, diff)
    if TILES:
        squares = _quad_sums(squares, ROWS, GROUPS, 16)
        squares = _quad_sums(squares, ROWS // 2, GROUPS, 8)
        squares = _quad_sums(squares, ROWS // 4, GROUPS, 4)
        squares = _quad_sums(squares, ROWS // 8, GROUPS, 2)
        tiles = tl.reshape(squares, (ROWS // 16, GROUPS))
        error = tl.reshape(tl.broadcast_to(tiles[:, None, :], (ROWS // 16, 16, GROUPS)), (ROWS, GROUPS))
    else:
        squares = _pair_sums(squares, ROWS, GROUPS, 16)
        squares = _pair_sums(squares, ROWS, GROUPS, 8)
        squares = _pair_sums(squares, ROWS, GROUPS, 4)
        squares = _pair_sums(squares, ROWS, GROUPS, 2)
        error = tl.reshape(squares, (ROWS, GROUPS))
    return error


@triton.jit
def nvfp4_four_over_six_scale(x, block_amax, g, ROWS: tl.constexpr, GROUPS: tl.constexpr,
                              TILES: tl.constexpr):
    """:func:`qpass.formats.nvfp4.four_over_six_scales`: the map-to-6 or the map-to-4 ``s_b`` of each
    block of ``x`` ``[ROWS, GROUPS * 16]`` (``block_amax`` ``[ROWS, GROUPS]``: for TILES, each 16x16
    tile's, on its 16 rows), whichever gives the smaller squared error (ties: map-to-6)."""
    ratio = _nvfp4_ratio(block_amax, g)
    map_to_6 = _e4m3_scale(ratio)
    map_to_4 = _e4m3_scale(ratio * 1.5)
    blocks = tl.reshape(x, (ROWS, GROUPS, 16))
    error_6 = _nvfp4_squared_error(blocks, g, map_to_6, ROWS, GROUPS, TILES)
    error_4 = _nvfp4_squared_error(blocks, g, map_to_4, ROWS, GROUPS, TILES)
    return tl.where(error_4 < error_6, map_to_4, map_to_6)


@triton.jit
def nvfp4_element_encode(g, s_b):
    """:func:`qpass.formats.nvfp4.element_encode`: ``(1 / g) / s_b``, at most fp32's max."""
    encode = div_rn(div_rn(filled(g, 1.0), g) + tl.zeros_like(s_b), s_b)
    return tl.where(encode > F32_MAX, F32_MAX, encode)
