"""Scaled-GEMM operands by a Triton kernel: :func:`qpass.gemm_operand.quantize_for_gemm`'s codes and
scales, bit for bit, written straight from a bf16, fp16 or fp32 input.

With ``transposed=True`` the same pass also writes the operand of the other orientation: a weight or
activation ``x [R, L]`` is the forward GEMM's operand quantized along L and, transposed, a backward
GEMM's operand quantized along R and laid out ``[L, R]`` (SPEC section 6: dgrad's ``B`` as
``[K, N]``, wgrad's ``Aᵀ``). Each program loads one ``[BLOCK_R, BLOCK_L]`` tile once and quantizes
it along its columns and, transposed, along its rows. Per-tensor scales are the same in both
orientations, so the transposed codes are the first ones transposed; per-row and per-block scales
are each orientation's own (per-row amaxes of both orientations come from one pre-pass, block
amaxes from the tile itself, which spans whole blocks both ways).

Formats: absmax scaling per tensor, per channel (row) or in power-of-two blocks, for every element
format (fp8 codes come back in their torch float8 dtype, the others as uint8, fp4 packed); every MX
format and scale mode; NVFP4 in 1x16 blocks, with either block-scale rule. Rounding is RNE.
Anything else raises a NotImplementedError that names it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qpass.codegen import numerics as nm
from qpass.codegen.spec import KERNEL_DTYPES, KernelSpec, kernel_spec
from qpass.formats import FormatSpec, nvfp4
from qpass.formats.api import resolve_arguments
from qpass.formats.swizzle import swizzle_scales
from qpass.gemm_operand import TORCH_DTYPES, GemmOperand
from qpass.quantizer import Quantizer

# spec.GRANULARITIES and spec.SCALINGS indices, as tl.constexpr objects: the kernels read them, and
# Triton's compiler reads no other globals (plain ints pass in the interpreter, fail on a GPU).
TENSOR, CHANNEL, BLOCK = (tl.constexpr(i) for i in range(3))
ABSMAX, MX, NVFP4 = (tl.constexpr(i) for i in range(3))
TILE = 64  # the tiles' side, widened to a block that is wider (host only: a launch argument)
CONSTEXPRS = (
    "EBITS", "MBITS", "EMIN", "EMAX", "MAX_NORMAL", "HAS_INF", "HAS_NAN", "IS_INT", "PACKED", "SCALING",
    "GRANULARITY", "GROUP", "SCALE_MODE", "POW2",
)


@triton.jit
def _load_tile(x_ptr, b, rows, cols, R, L, stride_b, stride_r, stride_l):
    """x's fp32 ``[rows, cols]`` tile of matrix ``b``, zero beyond it (the padding of both orientations)."""
    offsets = (
        b.to(tl.int64) * stride_b + rows[:, None].to(tl.int64) * stride_r
        + cols[None, :].to(tl.int64) * stride_l
    )
    mask = (rows[:, None] < R) & (cols[None, :] < L)
    return nm.to_float32(tl.load(x_ptr + offsets, mask=mask, other=0.0))


@triton.jit
def _amax_kernel(x_ptr, tensor_amax_ptr, row_amax_ptr, col_amax_ptr, R, L, stride_b, stride_r, stride_l,
                 TENSOR_AMAX: tl.constexpr, ROW_AMAX: tl.constexpr, COL_AMAX: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """The amaxes of scales that span more than one tile, as |x|'s int32 bits: an integer max orders
    them as floats with NaN above Inf, so NaN propagates."""
    pid_l, pid_r, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    magnitude = nm.abs_bits(_load_tile(x_ptr, b, rows, cols, R, L, stride_b, stride_r, stride_l))
    if TENSOR_AMAX:
        tl.atomic_max(tensor_amax_ptr, tl.max(tl.max(magnitude, axis=1), axis=0))
    if ROW_AMAX:
        tl.atomic_max(row_amax_ptr + b * R + rows, tl.max(magnitude, axis=1), mask=rows < R)
    if COL_AMAX:
        tl.atomic_max(col_amax_ptr + b * L + cols, tl.max(magnitude, axis=0), mask=cols < L)


@triton.jit
def _quantize_rows(
    x, amax, tensor_amax, EBITS: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr,
    MAX_NORMAL: tl.constexpr, HAS_INF: tl.constexpr, HAS_NAN: tl.constexpr, IS_INT: tl.constexpr,
    SCALING: tl.constexpr, GRANULARITY: tl.constexpr, GROUP: tl.constexpr, SCALE_MODE: tl.constexpr,
    POW2: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
):
    """The fp32 tile ``x [ROWS, COLS]`` quantized along its columns (:func:`qpass.formats.quantize`):
    int32 element codes and the stored scales ``[ROWS, COLS / GROUP]`` (``[ROWS, 1]`` when the scale
    spans the row). ``amax`` ``[ROWS, 1]``: each row's (channel) or the tensor's amax, as fp32."""
    GROUPS: tl.constexpr = COLS // GROUP if GRANULARITY == BLOCK else 1
    if GRANULARITY == BLOCK:
        amax = nm.bits_float(tl.max(nm.abs_bits(tl.reshape(x, (ROWS, GROUPS, COLS // GROUPS))), axis=2))
    if SCALING == ABSMAX:
        encode = nm.absmax_encode(amax, MAX_NORMAL, POW2)
        stored = nm.div_rn(nm.filled(encode, 1.0), encode)  # the fp32 decode scale
    elif SCALING == MX:
        stored = nm.e8m0_codes(amax, EMAX, MBITS, MAX_NORMAL, SCALE_MODE)
        encode = nm.e8m0_value(stored, True)
    else:
        g = nm.nvfp4_global_scale(nm.filled(amax, tensor_amax), SCALE_MODE)
        if SCALE_MODE == nm.FOUR_OVER_SIX:
            s_b = nm.nvfp4_four_over_six_scale(x, amax, g, ROWS, GROUPS, False)
        else:
            s_b = nm.nvfp4_block_scale(amax, g)
        encode = nm.nvfp4_element_encode(g, s_b)
        stored = nm.encode_element(s_b, 4, 3, -6, False, True, False)  # E4M3 bits
    scaled = tl.reshape(tl.reshape(x, (ROWS, GROUPS, COLS // GROUPS)) * encode[:, :, None], (ROWS, COLS))
    values = nm.round_to_element(scaled, 0, 0, nm.RNE, MBITS, EMIN, MAX_NORMAL, HAS_INF, IS_INT)
    return nm.encode_element(values, EBITS, MBITS, EMIN, HAS_INF, HAS_NAN, IS_INT), stored


@triton.jit
def _store_codes(codes_ptr, codes, b, rows, k0, R, KP, PACKED: tl.constexpr, ROWS: tl.constexpr,
                 COLS: tl.constexpr):
    """Codes ``[ROWS, COLS]`` at rows ``rows``, columns from ``k0``, of the operand ``[B * R, KP]``
    (fp4: ``KP / 2`` bytes a row, element 2i in the low nibble and 2i + 1 in the high one)."""
    row = (b * R + rows[:, None]).to(tl.int64)
    if PACKED:
        low, high = tl.split(tl.reshape(codes, (ROWS, COLS // 2, 2)))
        columns = k0 // 2 + tl.arange(0, COLS // 2)
        tl.store(codes_ptr + row * (KP // 2) + columns[None, :], (low | (high << 4)).to(tl.uint8),
                 mask=(rows[:, None] < R) & (columns[None, :] < KP // 2))
    else:
        columns = k0 + tl.arange(0, COLS)
        tl.store(codes_ptr + row * KP + columns[None, :], codes.to(tl.uint8),
                 mask=(rows[:, None] < R) & (columns[None, :] < KP))


@triton.jit
def _store_scales(scales_ptr, stored, b, rows, k0, R, KP, GRANULARITY: tl.constexpr, GROUP: tl.constexpr,
                  COLS: tl.constexpr):
    """Block scales ``[B * R, KP / GROUP]`` or per-row ones ``[B * R]``, the latter (like a
    per-tensor scale, which the first program writes) by the programs of the first K tile."""
    if GRANULARITY == BLOCK:
        groups = k0 // GROUP + tl.arange(0, COLS // GROUP)
        tl.store(scales_ptr + (b * R + rows[:, None]).to(tl.int64) * (KP // GROUP) + groups[None, :],
                 stored.to(scales_ptr.dtype.element_ty),
                 mask=(rows[:, None] < R) & (groups[None, :] < KP // GROUP))
    elif k0 == 0:
        if GRANULARITY == CHANNEL:
            tl.store(scales_ptr + b * R + rows[:, None], stored, mask=rows[:, None] < R)
        else:
            tl.store(scales_ptr + tl.zeros_like(rows)[:, None], stored, mask=b * R + rows[:, None] == 0)


@triton.jit
def _gemm_operand_kernel(
    x_ptr, tensor_amax_ptr, row_amax_ptr, col_amax_ptr, codes_ptr, scales_ptr, codes_t_ptr, scales_t_ptr,
    R, L, RP, LP, stride_b, stride_r, stride_l, TRANSPOSED: tl.constexpr,
    EBITS: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr,
    MAX_NORMAL: tl.constexpr, HAS_INF: tl.constexpr, HAS_NAN: tl.constexpr, IS_INT: tl.constexpr,
    PACKED: tl.constexpr, SCALING: tl.constexpr, GRANULARITY: tl.constexpr, GROUP: tl.constexpr,
    SCALE_MODE: tl.constexpr, POW2: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """``x [B, R, L]`` quantized along L into codes ``[B * R, LP]`` and scales; TRANSPOSED: also along
    R into ``[B * L, RP]`` (LP, RP: the padded lengths). The grid covers the padding, so the
    programs at the edge write the padding's zero codes."""
    pid_l, pid_r, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    x = _load_tile(x_ptr, b, rows, cols, R, L, stride_b, stride_r, stride_l)
    tensor_amax = nm.bits_float(tl.load(tensor_amax_ptr))
    if GRANULARITY == CHANNEL:
        amax = nm.bits_float(tl.load(row_amax_ptr + b * R + rows, mask=rows < R, other=0))[:, None]
    else:  # per tensor (blocks take theirs from the tile, NVFP4's g from tensor_amax)
        amax = tl.zeros((BLOCK_R, 1), tl.float32) + tensor_amax
    codes, stored = _quantize_rows(
        x, amax, tensor_amax, EBITS, MBITS, EMIN, EMAX, MAX_NORMAL, HAS_INF, HAS_NAN, IS_INT,
        SCALING, GRANULARITY, GROUP, SCALE_MODE, POW2, BLOCK_R, BLOCK_L,
    )
    _store_codes(codes_ptr, codes, b, rows, pid_l * BLOCK_L, R, LP, PACKED, BLOCK_R, BLOCK_L)
    _store_scales(scales_ptr, stored, b, rows, pid_l * BLOCK_L, R, LP, GRANULARITY, GROUP, BLOCK_L)
    if TRANSPOSED:
        if GRANULARITY == TENSOR:  # one scale: the same codes (the wrapper shares the scale)
            codes_t = tl.trans(codes)
        else:
            if GRANULARITY == CHANNEL:
                amax_t = nm.bits_float(tl.load(col_amax_ptr + b * L + cols, mask=cols < L, other=0))[:, None]
            else:
                amax_t = tl.zeros((BLOCK_L, 1), tl.float32) + tensor_amax
            codes_t, stored_t = _quantize_rows(
                tl.trans(x), amax_t, tensor_amax, EBITS, MBITS, EMIN, EMAX, MAX_NORMAL, HAS_INF, HAS_NAN,
                IS_INT, SCALING, GRANULARITY, GROUP, SCALE_MODE, POW2, BLOCK_L, BLOCK_R,
            )
            _store_scales(
                scales_t_ptr, stored_t, b, cols, pid_r * BLOCK_R, L, RP, GRANULARITY, GROUP, BLOCK_R
            )
        _store_codes(codes_t_ptr, codes_t, b, cols, pid_r * BLOCK_R, L, RP, PACKED, BLOCK_L, BLOCK_R)


# ---- launcher ------------------------------------------------------------------------------------


def _unsupported(quantizer: Quantizer, dtype: torch.dtype) -> str | None:
    spec = quantizer.spec
    if quantizer.rounding != "rne":
        return f"rounding={quantizer.rounding!r} (the kernel rounds to nearest even)"
    if dtype not in KERNEL_DTYPES:
        return f"{dtype} inputs (it reads {', '.join(str(d) for d in KERNEL_DTYPES)})"
    if spec.granularity == "tile":
        return "16x16 tiles (NVFP4's 1x16 blocks are supported)"
    if spec.blocked and spec.block_size & (spec.block_size - 1):
        return f"blocks of {spec.block_size} (power-of-two blocks are supported)"
    return None


def _check(x: torch.Tensor, quantizer: Quantizer, axis: int, transposed: bool, swizzle: bool) -> int:
    """The reference's errors for bad arguments, then what this kernel does not do; the axis, >= 0."""
    _, axis = resolve_arguments(x, quantizer.spec, axis, None, quantizer.rounding, None, None, None)
    reason = _unsupported(quantizer, x.dtype)
    if reason is not None:
        raise NotImplementedError(f"no quantize_for_gemm kernel for {quantizer}: {reason}")
    if transposed and not (x.ndim >= 2 and axis >= x.ndim - 2):
        raise ValueError(
            f"transposed=True quantizes along both of the last two dims: needs a tensor of at least 2 dims "
            f"and axis -1 or -2; got shape {tuple(x.shape)}, axis {axis}"
        )
    if swizzle and quantizer.spec.scaling == "absmax" and quantizer.spec.blocked:
        raise ValueError(f"swizzle=True: {quantizer}'s fp32 block scales have no swizzled layout")
    return axis


def _empty_operand(spec: KernelSpec, format_spec: FormatSpec, n: int, length: int, device):
    """Codes and scales for ``n`` rows of ``length`` quantized along them, laid out as the kernel
    writes them (``[n, ...]``), and the padded length."""
    padded = format_spec.padded_length(length)
    codes = torch.empty(n, padded // 2 if spec.PACKED else padded, dtype=torch.uint8, device=device)
    if spec.GRANULARITY == BLOCK:
        dtype = torch.float32 if spec.SCALING == ABSMAX else torch.uint8
        scales = torch.empty(n, padded // spec.GROUP, dtype=dtype, device=device)
    else:
        scales = torch.empty(n if spec.GRANULARITY == CHANNEL else 1, dtype=torch.float32, device=device)
    return codes, scales, padded


def _operand(codes, scales, g, quantizer: Quantizer, spec: KernelSpec, shape: list[int], swizzle: bool):
    """The kernel's buffers as the reference's GemmOperand of a tensor shaped ``shape`` (axis last)."""
    codes = codes.reshape(*shape[:-1], codes.shape[-1])
    dtype = TORCH_DTYPES.get(quantizer.spec.element.name)
    if dtype is not None:
        codes = codes.view(dtype)
    if spec.GRANULARITY == BLOCK:
        scales = scales.reshape(*shape[:-1], scales.shape[-1])
        if swizzle:
            scales = swizzle_scales(scales)
    else:
        scales = scales.reshape(*shape[:-1], 1) if spec.GRANULARITY == CHANNEL else scales.reshape(())
    return GemmOperand(codes, scales, g, quantizer, shape[-1])


def quantize_for_gemm(
    x: torch.Tensor, quantizer: Quantizer, axis: int, transposed: bool = False, swizzle: bool = False,
) -> GemmOperand | tuple[GemmOperand, GemmOperand]:
    """:func:`qpass.gemm_operand.quantize_for_gemm` (no rotation, no delayed scaling) by the kernel.

    ``transposed=True`` (``axis`` one of the last two dims): also ``x`` quantized along the other of
    them, in the same pass; returns ``(along axis, along the other)``. ``swizzle=True``: MX and
    NVFP4 block scales in the 32_4_4 layout of :func:`qpass.formats.swizzle.swizzle_scales`
    (``[..., n]``; such an operand is for the block-scaled GEMMs, its ``dequantize`` no longer
    applies); per-tensor and per-row scales have one layout and are returned as they are."""
    axis = _check(x, quantizer, axis, transposed, swizzle)
    spec = kernel_spec(quantizer.spec)
    moved = x.detach().movedim(axis, -1)
    rows, length = (moved.shape[-2] if moved.ndim >= 2 else 1), moved.shape[-1]
    x3 = moved.reshape(-1, rows, length)  # a view whenever the strides allow: no copy, no upcast
    batch, device = x3.shape[0], x.device
    codes, scales, padded = _empty_operand(spec, quantizer.spec, batch * rows, length, device)
    codes_t, scales_t, padded_t = codes, scales, rows  # not written unless transposed
    if transposed:
        codes_t, scales_t, padded_t = _empty_operand(spec, quantizer.spec, batch * length, rows, device)
    amaxes = [torch.zeros(n, dtype=torch.int32, device=device) for n in (1, batch * rows, batch * length)]
    flags = dict(
        TENSOR_AMAX=bool(spec.GRANULARITY == TENSOR or spec.SCALING == NVFP4),  # bools, not constexprs
        ROW_AMAX=bool(spec.GRANULARITY == CHANNEL), COL_AMAX=bool(spec.GRANULARITY == CHANNEL and transposed),
    )
    block = max(TILE, spec.GROUP)
    grid = (triton.cdiv(length, block), triton.cdiv(rows, block), batch)
    if any(flags.values()):
        _amax_kernel[grid](x3, *amaxes, rows, length, *x3.stride(), **flags, BLOCK_R=block, BLOCK_L=block)
    _gemm_operand_kernel[grid](
        x3, *amaxes, codes, scales, codes_t, scales_t, rows, length, padded_t, padded, *x3.stride(),
        TRANSPOSED=transposed, **{name: getattr(spec, name) for name in CONSTEXPRS},
        BLOCK_R=block, BLOCK_L=block,
    )
    g = (nvfp4.global_scale(amaxes[0].view(torch.float32).reshape(()), quantizer.spec.scale_mode)
         if spec.SCALING == NVFP4 else None)
    operand = _operand(codes, scales, g, quantizer, spec, list(moved.shape), swizzle)
    if not transposed:
        return operand
    if spec.GRANULARITY == TENSOR:
        scales_t = scales  # one scale for both orientations
    shape_t = [*moved.shape[:-2], length, rows]
    return operand, _operand(codes_t, scales_t, g, quantizer, spec, shape_t, swizzle)
