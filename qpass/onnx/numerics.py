"""qpass's numerics in ONNX standard operators: what an exported graph computes, bit for bit.

Each function mirrors its :mod:`qpass.formats` (or :mod:`qpass.hadamard`) counterpart step by step,
with the same fp32 operations in the same order, so that ONNX Runtime and ``onnx.reference`` give
the reference's bits. Where the reference reads exponent bits, these functions cannot: ONNX Runtime's
CPU provider has no ``BitCast``. Powers of two come from a table instead (exact, fp32 subnormals
included), and ``floor(log2 x)`` from ``Log``, corrected against that table, which makes it exact
whatever the accuracy of the runtime's ``Log``. Rounding is ``Round`` (half to even) on values
scaled by a power of two, as in :mod:`qpass.formats.rounding`.

Two forms of a quantize-dequantize, one per dialect of :func:`qpass.export_onnx`:

- :func:`fake_quantize` (``portable``): the element values are rounded by arithmetic, then scaled
  back; only operators that ONNX Runtime's CPU provider runs.
- :func:`quantize_dequantize` (``qdq``): ``QuantizeLinear`` to the element type and
  ``DequantizeLinear`` back, with the scales computed in the graph (FP6 has no ONNX type below
  opset 28, so its elements take the portable form).

Weights are stored quantized: :func:`dequantize_stored` expands their codes by table lookups
(``portable``) or by ``DequantizeLinear`` (``qdq``). The functions are traced by torch.onnx's
exporter: their tensors are symbolic values of static rank, with a quantization axis of static length.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import onnx_ir as ir
import torch
from onnxscript import opset21 as op
from onnxscript import opset23

from qpass.formats import FormatSpec
from qpass.formats.element import FP4_E2M1, FP8_E4M3, ElementFormat, code_table
from qpass.formats.mx import E8M0_BIAS, E8M0_MAX_EXP, E8M0_MIN_EXP, e8m0_decode
from qpass.formats.nvfp4 import FOUR_OVER_SIX, MAP_TO_4, global_divisor
from qpass.hadamard import _inverse_sqrt, _require_decomposition, hadamard_matrix
from qpass.quantizer import Quantizer
from qpass.rotation import Rotation

FLOAT = ir.DataType.FLOAT
# Gather indices: half the bytes of int64, which weight expansion writes per element
INT32 = ir.DataType.INT32
F32_MIN_EXP, F32_MAX_EXP = -149, 128  # the table's range: fp32's smallest subnormal up to 2^128 = inf
F32_TINY = float(np.finfo(np.float32).tiny)
F32_MAX = float(np.finfo(np.float32).max)
F32_MIN_SUBNORMAL = 2.0**F32_MIN_EXP

# The ONNX element types that QuantizeLinear / DequantizeLinear take (FP6 needs opset 28).
QDQ_TYPES = {
    "fp8_e4m3": ir.DataType.FLOAT8E4M3FN,
    "fp8_e5m2": ir.DataType.FLOAT8E5M2,
    "fp4_e2m1": ir.DataType.FLOAT4E2M1,
    "int8": ir.DataType.INT8,
}


class UnsupportedExport(ValueError):
    """A quantization that an ONNX graph cannot express exactly."""


# ---- constants and exact powers of two -----------------------------------------------------------


def constant(values, dtype=np.float32):
    array = np.asarray(values, dtype=dtype)
    # Scalars and vectors as typed attributes: a tensor attribute costs the exporter milliseconds each
    # (protocol checks), and a graph has hundreds of constants.
    if array.ndim <= 1 and array.dtype in (np.float32, np.int64):
        kind = "float" if array.dtype == np.float32 else "int"
        if array.ndim == 0:
            return op.Constant(**{f"value_{kind}": array.item()})
        return op.Constant(**{f"value_{kind}s": array.tolist()})
    return op.Constant(value=ir.tensor(array))


def ints(values) -> ir.Value:
    return constant(list(values), np.int64)


def _pow2_table() -> np.ndarray:
    with np.errstate(over="ignore"):  # 2^128 is inf, on purpose: floor_log2's upper bound
        return np.ldexp(np.float64(1), np.arange(F32_MIN_EXP, F32_MAX_EXP + 1)).astype(np.float32)


def pow2(exponent):
    """``2^e`` (fp32, exact) for integer-valued fp32 ``e`` in [-149, 128]."""
    index = op.Cast(op.Sub(exponent, constant(F32_MIN_EXP)), to=INT32)
    return op.Gather(constant(_pow2_table()), index)


def is_finite(x):
    return op.Not(op.Or(op.IsNaN(x), op.IsInf(x)))


def floor_log2(x):
    """``floor(log2 x)`` as integer-valued fp32 for finite x > 0 (fp32 subnormals included); 0
    elsewhere. ``Log`` is within one of it; comparing with the exact powers either side fixes that."""
    x = op.Where(op.And(is_finite(x), op.Greater(x, constant(0.0))), x, constant(1.0))
    guess = op.Clip(
        op.Floor(op.Mul(op.Log(x), constant(1 / math.log(2)))),
        constant(F32_MIN_EXP),
        constant(F32_MAX_EXP - 1),
    )
    guess = op.Sub(guess, op.Cast(op.Less(x, pow2(guess)), to=FLOAT))
    return op.Add(guess, op.Cast(op.GreaterOrEqual(x, pow2(op.Add(guess, constant(1.0)))), to=FLOAT))


def keep_nan(x, result):
    """``result`` where ``x`` is a number, NaN where it is NaN (Clip/Min/Max may drop a NaN)."""
    return op.Where(op.IsNaN(x), x, result)


# ---- rounding onto an element grid (qpass.formats.rounding) --------------------------------------


def round_to_element(x, fmt: ElementFormat, rounding: str = "rne"):
    """fp32 ``x`` rounded to ``fmt``'s grid: NaN stays NaN, Inf stays Inf where the format has one
    (NaN where not), finite values beyond max normal saturate."""
    finite = is_finite(x)
    magnitude = op.Where(finite, op.Max(op.Abs(x), constant(fmt.min_normal)), constant(fmt.min_normal))
    exponent = op.Min(floor_log2(magnitude), constant(126.0))
    scaled = op.Mul(x, pow2(op.Sub(constant(float(fmt.mbits)), exponent)))  # exact: a power of two
    if rounding == "rne":
        integral = op.Round(scaled)  # half to even
    elif rounding == "away":
        whole = op.Floor(op.Abs(scaled))
        integral = op.Add(
            whole, op.Cast(op.GreaterOrEqual(op.Sub(op.Abs(scaled), whole), constant(0.5)), to=FLOAT)
        )
        # -0 too: 1 / -0 = -inf
        negative = op.Cast(op.Less(op.Div(constant(1.0), x), constant(0.0)), to=FLOAT)
        # the sign, -0 too
        integral = op.Mul(integral, op.Sub(constant(1.0), op.Mul(negative, constant(2.0))))
    else:
        raise UnsupportedExport(f"{rounding} rounding has no ONNX form: it draws random numbers at run time")
    values = op.Mul(integral, pow2(op.Sub(exponent, constant(float(fmt.mbits)))))
    values = op.Clip(values, constant(-fmt.max_normal), constant(fmt.max_normal))
    if fmt.is_int:  # two's complement has no -0 (an Add of 0 would be optimized away)
        values = op.Where(op.Equal(values, constant(0.0)), constant(0.0), values)
    special = x if fmt.has_inf else op.Where(op.IsNaN(x), x, constant(math.nan))
    # The values in Where's second slot: ONNX Runtime's Where turns a -0 picked from the first into +0.
    return op.Where(op.Not(finite), special, values)


# ---- scaling groups (qpass.formats.grouping) -----------------------------------------------------


class Layout(NamedTuple):
    rank: int
    axis: int
    length: int
    padded: int


def _moved_last(rank: int, axis: int) -> list[int]:
    return [i for i in range(rank) if i != axis] + [axis]


def axis_length(x, axis: int) -> tuple[int, int, int]:
    """(rank, non-negative axis, static length) of ``x`` along ``axis``."""
    rank = len(x.shape)
    axis %= rank
    length = x.shape[axis]
    if not isinstance(length, int):
        raise UnsupportedExport(
            f"the quantization axis must have a static length, got {length} (shape {x.shape})"
        )
    return rank, axis, length


def move_last(x, rank: int, axis: int, length: int, padded: int):
    """``x`` with ``axis`` last, zero-padded to ``padded``."""
    if axis != rank - 1:
        x = op.Transpose(x, perm=_moved_last(rank, axis))
    if padded > length:
        x = op.Pad(x, ints([0] * (2 * rank - 1) + [padded - length]))
    return x


def move_back(x, layout: Layout):
    """Inverse of :func:`move_last` for ``x`` of shape ``[..., padded]``."""
    if layout.padded > layout.length:
        x = op.Slice(x, ints([0]), ints([layout.length]), ints([-1]))
    if layout.axis != layout.rank - 1:
        x = op.Transpose(x, perm=[int(i) for i in np.argsort(_moved_last(layout.rank, layout.axis))])
    return x


def to_groups(x, axis: int, spec: FormatSpec):
    """``x`` in fp32 as ``[..., G, group_size]`` groups along ``axis``, and how to undo it."""
    rank, axis, length = axis_length(x, axis)  # of x itself: the exporter knows no shape after a Cast
    layout = Layout(rank, axis, length, spec.padded_length(length))
    x = move_last(_as_float(x), rank, axis, length, layout.padded)
    size = spec.group_size(length)
    return op.Reshape(x, ints([0] * (rank - 1) + [layout.padded // size, size])), layout


def from_groups(groups, layout: Layout):
    return move_back(op.Reshape(groups, ints([0] * (layout.rank - 1) + [layout.padded])), layout)


# ---- scales (qpass.formats.scaling, absmax, mx, nvfp4) -------------------------------------------


class Scales(NamedTuple):
    encode: ir.Value  # takes a group to element units
    decode: ir.Value  # takes elements back
    block: ir.Value | None = None  # NVFP4: s_b, exact E4M3 values
    tensor: ir.Value | None = None  # NVFP4: g


def group_amax(groups, granularity: str):
    """amax per group (``[..., G, 1]``; one scalar for ``tensor``); NaN where a group holds NaN."""
    keep = {} if granularity == "tensor" else {"axes": ints([-1])}
    keepdims = 0 if granularity == "tensor" else 1
    amax = op.ReduceMax(op.Abs(groups), **keep, keepdims=keepdims)
    has_nan = op.ReduceMax(op.Cast(op.IsNaN(groups), to=FLOAT), **keep, keepdims=keepdims)
    return op.Where(op.Greater(has_nan, constant(0.0)), constant(math.nan), amax)


def _non_finite_to_nan(amax, scale):
    return op.Where(is_finite(amax), scale, constant(math.nan))


def absmax_scales(amax, fmt: ElementFormat, pow2_scale: bool) -> Scales:
    encode = op.Div(constant(fmt.max_normal), amax)  # one fp32 division, as the reference
    encode = op.Clip(encode, constant(F32_TINY), constant(F32_MAX))
    if pow2_scale:
        encode = pow2(floor_log2(encode))
    encode = _non_finite_to_nan(amax, op.Where(op.Equal(amax, constant(0.0)), constant(1.0), encode))
    # Reciprocal, not Div(1, x): ONNX Runtime fuses Div(1, x) · y into y / x, which rounds differently.
    return Scales(encode, op.Reciprocal(encode))


def _shared_exponent(amax, fmt: ElementFormat, scale_mode: str):
    """The MX block exponent for finite amax > 0 (qpass.formats.mx.shared_exponent)."""
    if scale_mode == "rceil":
        d = op.Div(amax, constant(fmt.max_normal))
        amax, offset = op.Where(op.Greater(d, constant(0.0)), d, constant(F32_MIN_SUBNORMAL)), 0
    else:
        offset = fmt.emax
    exponent = floor_log2(amax)
    if scale_mode in ("ceil", "rceil"):  # + 1 unless a power of two
        exponent = op.Add(exponent, op.Cast(op.Greater(amax, pow2(exponent)), to=FLOAT))
    elif scale_mode == "even":  # the significand rounded to mbits, ties up, may carry into 2
        significand = op.Div(amax, pow2(exponent))  # exact, in [1, 2)
        carry = op.GreaterOrEqual(significand, constant(2.0 - 2.0 ** -(fmt.mbits + 1)))
        exponent = op.Add(exponent, op.Cast(carry, to=FLOAT))
    return op.Sub(exponent, constant(float(offset)))


def mx_scales(amax, fmt: ElementFormat, scale_mode: str) -> Scales:
    positive = op.Greater(amax, constant(0.0))  # False for zero and NaN blocks
    safe = op.Where(op.And(positive, is_finite(amax)), amax, constant(1.0))
    exponent = op.Clip(
        _shared_exponent(safe, fmt, scale_mode), constant(float(E8M0_MIN_EXP)), constant(float(E8M0_MAX_EXP))
    )
    exponent = op.Where(positive, exponent, constant(float(-E8M0_BIAS)))  # code 0 for a zero block
    return Scales(_non_finite_to_nan(amax, pow2(op.Neg(exponent))), _non_finite_to_nan(amax, pow2(exponent)))


def _e4m3_scale(ratio):
    """``e4m3_rne(clamp(ratio, 2^-6, 448))``, NaN kept."""
    ratio = keep_nan(ratio, op.Clip(ratio, constant(FP8_E4M3.min_normal), constant(FP8_E4M3.max_normal)))
    return round_to_element(ratio, FP8_E4M3)


def _nvfp4_encode(g, s_b):
    encode = op.Div(op.Reciprocal(g), s_b)
    return keep_nan(encode, op.Min(encode, constant(F32_MAX)))


def _pairwise_sum(x, size: int):
    """``[..., size]`` to ``[..., 1]`` (size a power of two): adjacent pairs, then pairs of those
    (qpass.formats.nvfp4's order)."""
    while size > 1:
        even, odd = (op.Slice(x, ints([start]), ints([size]), ints([-1]), ints([2])) for start in (0, 1))
        x, size = op.Add(even, odd), size // 2
    return x


def _squared_error(groups, g, s_b, size: int):
    """The squared error of each NVFP4 block ``[..., G, size]`` quantized with ``s_b`` (4over6's
    candidates: rounded to nearest even, dequantized ``q · (s_b · g)``), ``[..., G, 1]``."""
    values = round_to_element(op.Mul(groups, _nvfp4_encode(g, s_b)), FP4_E2M1)
    diff = op.Sub(op.Mul(values, op.Mul(s_b, g)), groups)
    return _pairwise_sum(op.Mul(diff, diff), size)


def nvfp4_scales(groups, spec: FormatSpec) -> Scales:
    if spec.granularity == "tile":
        raise UnsupportedExport("nvfp4 16x16 tiles of an activation (the tile spans rows of a dynamic dim)")
    tensor_amax = group_amax(groups, "tensor")
    divisor = constant(global_divisor(spec.scale_mode))
    g = op.Clip(op.Div(tensor_amax, divisor), constant(F32_MIN_SUBNORMAL), constant(F32_MAX))
    g = _non_finite_to_nan(tensor_amax, op.Where(op.Equal(tensor_amax, constant(0.0)), constant(1.0), g))
    ratio = op.Div(op.Div(group_amax(groups, "block"), constant(spec.element.max_normal)), g)
    s_b = _e4m3_scale(ratio)
    if spec.scale_mode == FOUR_OVER_SIX:  # the map-to-4 candidate where it errs less (ties: map-to-6)
        map_to_4 = _e4m3_scale(op.Mul(ratio, constant(MAP_TO_4)))
        error_6, error_4 = (_squared_error(groups, g, s, spec.block_size) for s in (s_b, map_to_4))
        s_b = op.Where(op.Less(error_4, error_6), map_to_4, s_b)
    return Scales(_nvfp4_encode(g, s_b), op.Mul(s_b, g), s_b, g)


def group_scales(groups, spec: FormatSpec) -> Scales:
    if spec.scaling == "absmax":
        return absmax_scales(group_amax(groups, spec.granularity), spec.element, spec.pow2)
    if spec.scaling == "mx":
        return mx_scales(group_amax(groups, "block"), spec.element, spec.scale_mode)
    return nvfp4_scales(groups, spec)


# ---- quantize-dequantize of activations ----------------------------------------------------------


def _as_float(x):
    return x if x.dtype == FLOAT else op.Cast(x, to=FLOAT)


def _like(out, x):
    return out if x.dtype == FLOAT else op.Cast(out, to=x.dtype)


def fake_quantize(x, quantizer: Quantizer, axis: int):
    """``quantizer(x, axis)`` in arithmetic: round the scaled groups, scale them back (portable)."""
    spec = quantizer.spec
    groups, layout = to_groups(x, axis, spec)
    scales = group_scales(groups, spec)
    values = round_to_element(op.Mul(groups, scales.encode), spec.element, quantizer.rounding)
    return _like(from_groups(op.Mul(values, scales.decode), layout), x)


def quantize_dequantize(x, quantizer: Quantizer, axis: int):
    """``quantizer(x, axis)`` as QuantizeLinear / DequantizeLinear pairs, scales computed in the graph.

    The scaled groups ``x · encode`` are quantized at scale 1 (the reference multiplies by
    ``encode``; QuantizeLinear's ``x / scale`` would round differently) and dequantized by
    ``decode``. NVFP4's ``decode`` is itself a DequantizeLinear of its E4M3 block scales by ``g``."""
    spec = quantizer.spec
    element = spec.element
    if element.name not in QDQ_TYPES:
        return fake_quantize(x, quantizer, axis)
    groups, layout = to_groups(x, axis, spec)
    scales = group_scales(groups, spec)
    scaled = op.Mul(groups, scales.encode)
    if quantizer.rounding != "rne":  # QuantizeLinear rounds half to even: give it values on the grid
        scaled = round_to_element(scaled, element, quantizer.rounding)
    decode = scales.decode
    if element.is_int:  # codes k for the values k / 64, never -128
        step = constant(2.0**-element.mbits)
        clipped = op.Clip(scaled, constant(-element.max_normal), constant(element.max_normal))
        codes = op.QuantizeLinear(clipped, step, output_dtype=QDQ_TYPES[element.name])
        decode = op.Mul(decode, step)
    else:
        codes = op.QuantizeLinear(scaled, constant(1.0), output_dtype=QDQ_TYPES[element.name], saturate=1)
    if scales.block is not None:  # NVFP4: the block scales are E4M3 values, dequantized by g
        block_codes = op.QuantizeLinear(
            scales.block, constant(1.0), output_dtype=QDQ_TYPES[FP8_E4M3.name], saturate=1
        )
        decode = op.DequantizeLinear(block_codes, scales.tensor)
    if spec.granularity == "tensor":
        out = op.DequantizeLinear(codes, decode)
    else:  # one scale per [..., G, 1] group
        out = op.DequantizeLinear(codes, decode, axis=-1, block_size=spec.group_size(layout.length))
    return _like(from_groups(out, layout), x)


# ---- stored weights ------------------------------------------------------------------------------


def _element_table(element: ElementFormat) -> np.ndarray:
    """The value of every code byte: fp4 bytes hold two codes, low nibble first, so fp4's table is
    ``[256, 2]`` and one Gather unpacks and decodes."""
    values = code_table(element).numpy()
    if element.bits != 4:
        return values
    byte = np.arange(256)
    return np.stack([values[byte & 0xF], values[byte >> 4]], axis=-1)


def _lookup(table: np.ndarray, codes):
    return op.Gather(constant(table), op.Cast(codes, to=INT32))


def _fp6_values(packed, moved: list[int], element: ElementFormat):
    """Values of fp6 codes packed four to three bytes (qpass.formats.packing.pack_fp6): each code is
    a Gather of one byte's bits, or of the sum of two bytes' parts, then a Gather of its value."""
    byte = np.arange(256)
    values = code_table(element).numpy()
    triples = op.Reshape(packed, ints(moved[:-1] + [-1, 3]))
    b0, b1, b2 = (op.Cast(op.Gather(triples, constant(i, np.int64), axis=-1), to=INT32) for i in range(3))

    def part(table, b):
        return op.Gather(constant(table, np.int32), b)

    codes = [
        part(byte & 0x3F, b0),
        op.Add(part(byte >> 6, b0), part((byte & 0xF) << 2, b1)),
        op.Add(part(byte >> 4, b1), part((byte & 0x3) << 4, b2)),
        part(byte >> 2, b2),
    ]
    quads = op.Concat(*(op.Unsqueeze(op.Gather(constant(values), c), ints([-1])) for c in codes), axis=-1)
    unpacked = op.Reshape(quads, ints(moved[:-1] + [-1]))
    return op.Slice(unpacked, ints([0]), ints([moved[-1]]), ints([-1]))


def _e8m0_table() -> np.ndarray:
    return e8m0_decode(torch.arange(256, dtype=torch.uint8)).numpy()


def _decode_table(spec: FormatSpec) -> np.ndarray:
    return _e8m0_table() if spec.scaling == "mx" else code_table(FP8_E4M3).numpy()


def _stored_scale(spec: FormatSpec, scales, tensor_scale, dialect: str):
    """The fp32 decode factor per group: a scalar for a per-tensor scale, else ``[..., G]``."""
    if spec.scaling == "absmax":
        return scales  # fp32: a scalar, [..., 1] per channel or [..., G] per block
    if dialect == "portable":
        decode = _lookup(_decode_table(spec), scales)
        return decode if spec.scaling == "mx" else op.Mul(decode, tensor_scale)
    if spec.scaling == "mx":
        return op.Cast(scales, to=FLOAT)  # FLOAT8E8M0 codes (opset 24)
    return op.DequantizeLinear(scales, tensor_scale)  # NVFP4: two chained DequantizeLinear, s_b · g


def dequantize_stored(
    codes, scales, tensor_scale, quantizer: Quantizer, shape: list[int], axis: int, dtype, dialect: str
):
    """A weight stored as codes and scales (a :class:`~qpass.formats.QTensor`'s layout: the axis
    last and zero-padded), back to ``shape``: by table lookups (``portable``; one Gather unpacks
    and decodes two fp4 codes), or by DequantizeLinear of the typed codes (``qdq``)."""
    spec = quantizer.spec
    element = spec.element
    rank, axis = len(shape), axis % max(len(shape), 1)
    length = shape[axis] if shape else 1
    layout = Layout(max(rank, 1), axis, length, spec.padded_length(length))
    size = spec.group_size(length)
    moved = [d for i, d in enumerate(shape) if i != axis] + [layout.padded]
    if dialect == "qdq" and element.name in QDQ_TYPES:
        if spec.scaling == "mx" and not element.is_int:
            # FLOAT8E8M0 scales (opset 24); output_dtype, since fp32 is no longer the scale's type
            out = opset23.DequantizeLinear(codes, scales, axis=-1, block_size=size, output_dtype=FLOAT)
        else:
            decode = _stored_scale(spec, scales, tensor_scale, dialect)
            if element.is_int:  # int8 codes k are the values k / 64
                decode = op.Mul(decode, constant(2.0**-element.mbits))
            out = op.DequantizeLinear(codes, decode) if spec.granularity == "tensor" else \
                op.DequantizeLinear(codes, decode, axis=-1, block_size=size)
    else:
        values = (
            _fp6_values(codes, moved, element) if element.bits == 6
            else _lookup(_element_table(element), codes)
        )
        groups = op.Reshape(values, ints(moved[:-1] + [layout.padded // size, size]))
        decode = _stored_scale(spec, scales, tensor_scale, "portable")
        decode = decode if spec.granularity == "tensor" else op.Unsqueeze(decode, ints([-1]))
        out = op.Reshape(op.Mul(groups, decode), ints(moved))
    out = move_back(out, layout)
    out = op.Reshape(out, ints(shape)) if rank == 0 else out
    return out if dtype == FLOAT else op.Cast(out, to=dtype)


# ---- Hadamard rotations (qpass.hadamard) ---------------------------------------------------------


def _walsh_hadamard(y, lead: int, length: int, m: int):
    """``H_{2^a}`` along axis -2 of ``[..., length, m]`` (``lead`` leading dims): qpass.hadamard's
    butterflies, in the same order (index ``j`` with ``j + h``, ``h`` = 1, 2, 4, ...)."""
    lead = [0] * lead
    h = 1
    while h < length:
        pairs = op.Reshape(y, ints(lead + [length // (2 * h), 2, h, m]))
        top, bottom = (op.Gather(pairs, constant(i, np.int64), axis=-3) for i in (0, 1))
        out = op.Concat(
            op.Unsqueeze(op.Add(top, bottom), ints([-3])),
            op.Unsqueeze(op.Sub(top, bottom), ints([-3])),
            axis=-3,
        )
        y, h = op.Reshape(out, ints(lead + [length, m])), 2 * h
    return y


def rotate(x, rotation: Rotation, axis: int, inverse: bool):
    """``qpass::rotate``: ``x · R`` along ``axis`` (``x · Rᵀ`` for ``inverse``), zero-padded to whole
    blocks. Power-of-two blocks and sizes are exact (sums and differences); a full-size rotation
    with a Paley factor multiplies by it, in the runtime's summation order."""
    if rotation.resample:
        raise UnsupportedExport(f"{rotation}: fresh random signs at every call")
    rank, axis, length = axis_length(x, axis)
    n = rotation.padded(length)
    y = move_last(_as_float(x), rank, axis, length, n)
    block = rotation.block or n
    a, m = (block.bit_length() - 1, 1) if rotation.block else _require_decomposition(n)
    signs = rotation.sign_vector(length)
    blocks = op.Reshape(y, ints([0] * (rank - 1) + [n // block, block]))
    if signs is not None and not inverse:
        blocks = op.Mul(blocks, constant(signs.numpy()))
    z = op.Reshape(blocks, ints([0] * rank + [2**a, m]))
    if m > 1:
        factor = hadamard_matrix(m, torch.float32)
        z = op.MatMul(z, constant((factor.T if inverse else factor).numpy()))
    z = op.Mul(_walsh_hadamard(z, rank, 2**a, m), constant(_inverse_sqrt(2**a, torch.float32)))
    z = op.Reshape(z, ints([0] * (rank - 1) + [n // block, block]))
    if signs is not None and inverse:
        z = op.Mul(z, constant(signs.numpy()))
    out = move_back(op.Reshape(z, ints([0] * (rank - 1) + [n])), Layout(rank, axis, n, n))
    return _like(out, x)
