"""Generated quantize, fake-quantize and dequantize kernels, and the Python functions that launch them.

One template per job, specialized by a :class:`~qpass.codegen.spec.KernelSpec`:

- ``_amax_kernel``: the amax of each row or of the whole tensor, for scales that span more than one
  program (per tensor, per channel, NVFP4's global scale), by an integer ``atomic_max`` on |x|'s bits;
- ``_quantize_kernel``: block amax fused in, scales, rounding (RNE, away, Philox stochastic), then
  either codes (packed) and scales, or the dequantized values (fake quantization, for training);
- ``_dequantize_kernel``: codes and scales back to values.

Each reads its input through strides as ``[B, R, L]`` with L the quantization axis, so quantizing a
weight or an activation along a non-last axis (the backward GEMMs' operands) reads the tensor in
place instead of a transposed copy. A fused Hadamard rotation multiplies each row's L-blocks by the
block matrix with ``tl.dot`` before the amax, in fp32 (a bf16 or fp16 input's rotated values are
not rounded back to its dtype: qpass.ops rotates ``x.float()``). Results match :mod:`qpass.formats`
bit for bit (the rotation up to fp32 summation order; stochastic rounding in distribution: its
random stream is Philox, not torch's).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qpass.codegen import numerics as nm
from qpass.codegen.spec import KernelSpec, kernel_spec, unsupported
from qpass.codegen.tuning import elementwise_configs, prune_elementwise
from qpass.formats import nvfp4
from qpass.formats.api import resolve_arguments
from qpass.formats.qtensor import QTensor
from qpass.hadamard import hadamard_matrix
from qpass.quantizer import Quantizer
from qpass.rotation import Rotation

BLOCK, TILE = 2, 3  # GRANULARITIES indices
ABSMAX, MX = 0, 1  # SCALINGS indices; 2 is NVFP4
E4M3 = dict(EBITS=4, MBITS=3, EMIN=-6, HAS_INF=False, HAS_NAN=True, IS_INT=False)


@triton.jit
def _load_tile(x_ptr, b, rows, cols, R, L, stride_b, stride_r, stride_l, rotation_ptr,
               HADAMARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """An fp32 ``[BLOCK_R, BLOCK_L]`` tile, zero beyond the tensor, rotated when HADAMARD > 0."""
    mask = (rows[:, None] < R) & (cols[None, :] < L)
    offsets = (
        b.to(tl.int64) * stride_b + rows[:, None].to(tl.int64) * stride_r
        + cols[None, :].to(tl.int64) * stride_l
    )
    x = nm.to_float32(tl.load(x_ptr + offsets, mask=mask, other=0.0))
    if HADAMARD > 0:
        h = tl.arange(0, HADAMARD)
        matrix = tl.load(rotation_ptr + h[:, None] * HADAMARD + h[None, :])
        blocks = tl.reshape(x, (BLOCK_R * BLOCK_L // HADAMARD, HADAMARD))
        x = tl.reshape(tl.dot(blocks, matrix, input_precision="ieee"), (BLOCK_R, BLOCK_L))
    return x


@triton.autotune(configs=elementwise_configs(), key=["R", "L", "GROUP", "GRANULARITY", "HADAMARD"],
                 prune_configs_by={"early_config_prune": prune_elementwise})
@triton.jit
def _amax_kernel(x_ptr, amax_ptr, rotation_ptr, R, L, stride_b, stride_r, stride_l,
                 PER_ROW: tl.constexpr, GROUP: tl.constexpr, GRANULARITY: tl.constexpr,
                 HADAMARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    pid_l, pid_r, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    x = _load_tile(
        x_ptr, b, rows, cols, R, L, stride_b, stride_r, stride_l, rotation_ptr, HADAMARD, BLOCK_R, BLOCK_L
    )
    row_amax = tl.max(nm.abs_bits(x), axis=1)
    if PER_ROW:
        tl.atomic_max(amax_ptr + b * R + rows, row_amax, mask=rows < R)
    else:
        tl.atomic_max(amax_ptr, tl.max(row_amax, axis=0))


@triton.jit
def _group_scales(x, amax_ptr, b, rows, R, EBITS: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr,
                  EMAX: tl.constexpr, MAX_NORMAL: tl.constexpr, HAS_INF: tl.constexpr, HAS_NAN: tl.constexpr,
                  IS_INT: tl.constexpr, SCALING: tl.constexpr, GRANULARITY: tl.constexpr, GROUP: tl.constexpr,
                  SCALE_MODE: tl.constexpr, POW2: tl.constexpr, GROUPS: tl.constexpr, GROUP_LEN: tl.constexpr,
                  BLOCK_R: tl.constexpr):
    """(encode, decode, stored) per group of the tile, each ``[BLOCK_R, GROUPS]`` (GROUPS is 1 when
    the scale spans the row): :func:`qpass.formats.scaling.compute_scales`."""
    if GRANULARITY >= BLOCK:
        group_amax = tl.max(nm.abs_bits(tl.reshape(x, (BLOCK_R, GROUPS, GROUP_LEN))), axis=2)
        if GRANULARITY == TILE:  # the amax of 16 consecutive rows' blocks
            tiles = tl.max(tl.reshape(group_amax, (BLOCK_R // GROUP, GROUP, GROUPS)), axis=1)
            group_amax = tl.reshape(
                tl.broadcast_to(tiles[:, None, :], (BLOCK_R // GROUP, GROUP, GROUPS)), (BLOCK_R, GROUPS)
            )
        group_amax = nm.bits_float(group_amax)
    else:  # per channel: one amax per row; per tensor: the one amax, broadcast over the rows
        index = b * R + rows if GRANULARITY == 1 else tl.zeros_like(rows)
        group_amax = nm.bits_float(tl.load(amax_ptr + index, mask=rows < R, other=0))[:, None]
    if SCALING == ABSMAX:
        encode = nm.absmax_encode(group_amax, MAX_NORMAL, POW2)
        decode = nm.div_rn(nm.filled(encode, 1.0), encode)
        stored = decode
    elif SCALING == MX:
        codes = nm.e8m0_codes(group_amax, EMAX, MBITS, MAX_NORMAL, SCALE_MODE)
        encode = nm.e8m0_value(codes, True)
        decode = nm.e8m0_value(codes, False)
        stored = codes
    else:
        g = nm.nvfp4_global_scale(nm.bits_float(tl.load(amax_ptr + tl.zeros_like(rows))))[:, None]
        s_b = nm.nvfp4_block_scale(group_amax, g)
        encode = nm.nvfp4_element_encode(g, s_b)
        decode = s_b * g
        stored = nm.encode_element(s_b, 4, 3, -6, False, True, False)
    return encode, decode, stored


@triton.jit
def _quantize_tile(
    x, amax_ptr, seed, b, rows, cols, R, LP, EBITS: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr,
    EMAX: tl.constexpr, MAX_NORMAL: tl.constexpr, HAS_INF: tl.constexpr, HAS_NAN: tl.constexpr,
    IS_INT: tl.constexpr, SCALING: tl.constexpr, GRANULARITY: tl.constexpr, GROUP: tl.constexpr,
    SCALE_MODE: tl.constexpr, POW2: tl.constexpr, ROUNDING: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """The fp32 tile ``x`` quantized along its columns: element values ``[BLOCK_R, BLOCK_L]``, and the
    decode and stored scales ``[BLOCK_R, GROUPS]``. Stochastic rounding numbers the elements
    ``(b * R + row) * LP + col``, so every kernel draws the same bits for the same element."""
    GROUP_LEN: tl.constexpr = GROUP if GRANULARITY >= BLOCK else BLOCK_L
    GROUPS: tl.constexpr = BLOCK_L // GROUP_LEN
    encode, decode, stored = _group_scales(
        x, amax_ptr, b, rows, R, EBITS, MBITS, EMIN, EMAX, MAX_NORMAL, HAS_INF, HAS_NAN, IS_INT,
        SCALING, GRANULARITY, GROUP, SCALE_MODE, POW2, GROUPS, GROUP_LEN, BLOCK_R,
    )
    scaled = tl.reshape(
        tl.reshape(x, (BLOCK_R, GROUPS, GROUP_LEN)) * encode[:, :, None], (BLOCK_R, BLOCK_L)
    )
    element_index = (b * R + rows)[:, None] * LP + cols[None, :]
    values = nm.round_to_element(
        scaled, element_index, seed, ROUNDING, MBITS, EMIN, MAX_NORMAL, HAS_INF, IS_INT
    )
    return values, decode, stored


@triton.autotune(configs=elementwise_configs(), key=["R", "L", "GROUP", "GRANULARITY", "HADAMARD"],
                 prune_configs_by={"early_config_prune": prune_elementwise})
@triton.jit
def _quantize_kernel(
    x_ptr, amax_ptr, rotation_ptr, out_ptr, scales_ptr, seed,
    R, L, LP, LOUT, stride_b, stride_r, stride_l, out_stride_b, out_stride_r, out_stride_l,
    WRITE_CODES: tl.constexpr,
    EBITS: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr,
    MAX_NORMAL: tl.constexpr, HAS_INF: tl.constexpr, HAS_NAN: tl.constexpr, IS_INT: tl.constexpr,
    PACKED: tl.constexpr,
    SCALING: tl.constexpr, GRANULARITY: tl.constexpr, GROUP: tl.constexpr, SCALE_MODE: tl.constexpr,
    POW2: tl.constexpr, ROUNDING: tl.constexpr, HADAMARD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Quantize ``[B, R, L]`` along L. WRITE_CODES: codes ``[B*R, LP (/2 packed)]`` and scales to
    ``out_ptr`` and ``scales_ptr``; otherwise the dequantized values (``LOUT`` of them per row)
    through ``out_stride_*``. LP is the padded length (whole groups)."""
    pid_l, pid_r, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    x = _load_tile(
        x_ptr, b, rows, cols, R, L, stride_b, stride_r, stride_l, rotation_ptr, HADAMARD, BLOCK_R, BLOCK_L
    )
    values, decode, stored = _quantize_tile(
        x, amax_ptr, seed, b, rows, cols, R, LP, EBITS, MBITS, EMIN, EMAX, MAX_NORMAL, HAS_INF, HAS_NAN,
        IS_INT, SCALING, GRANULARITY, GROUP, SCALE_MODE, POW2, ROUNDING, BLOCK_R, BLOCK_L,
    )
    GROUP_LEN: tl.constexpr = GROUP if GRANULARITY >= BLOCK else BLOCK_L
    GROUPS: tl.constexpr = BLOCK_L // GROUP_LEN
    in_rows = rows[:, None] < R
    if WRITE_CODES:
        codes = nm.encode_element(values, EBITS, MBITS, EMIN, HAS_INF, HAS_NAN, IS_INT)
        code_row = (b * R + rows[:, None]).to(tl.int64)
        if PACKED:  # element 2i in the low nibble, 2i + 1 in the high one
            low, high = tl.split(tl.reshape(codes, (BLOCK_R, BLOCK_L // 2, 2)))
            byte_cols = pid_l * (BLOCK_L // 2) + tl.arange(0, BLOCK_L // 2)
            tl.store(out_ptr + code_row * (LP // 2) + byte_cols[None, :], (low | (high << 4)).to(tl.uint8),
                     mask=in_rows & (byte_cols[None, :] < LP // 2))
        else:
            tl.store(out_ptr + code_row * LP + cols[None, :], codes.to(tl.uint8),
                     mask=in_rows & (cols[None, :] < LP))
        if GRANULARITY >= BLOCK:
            group_cols = pid_l * GROUPS + tl.arange(0, GROUPS)
            tl.store(scales_ptr + code_row * (LP // GROUP) + group_cols[None, :],
                     stored.to(scales_ptr.dtype.element_ty),
                     mask=in_rows & (group_cols[None, :] < LP // GROUP))
        elif pid_l == 0:  # one fp32 decode scale per row (or tensor), written by the first programs
            if GRANULARITY == 1:
                tl.store(scales_ptr + b * R + rows[:, None], stored, mask=in_rows)
            elif (pid_r == 0) & (b == 0):
                tl.store(scales_ptr + tl.zeros_like(rows)[:, None], stored, mask=rows[:, None] == 0)
    else:
        out = tl.reshape(
            tl.reshape(values, (BLOCK_R, GROUPS, GROUP_LEN)) * decode[:, :, None], (BLOCK_R, BLOCK_L)
        )
        offsets = (
            b.to(tl.int64) * out_stride_b + rows[:, None].to(tl.int64) * out_stride_r
            + cols[None, :].to(tl.int64) * out_stride_l
        )
        tl.store(out_ptr + offsets, nm.cast_rn(out, out_ptr.dtype.element_ty),
                 mask=in_rows & (cols[None, :] < LOUT))


@triton.autotune(configs=elementwise_configs(), key=["R", "L", "GROUP", "GRANULARITY", "HADAMARD"],
                 prune_configs_by={"early_config_prune": prune_elementwise})
@triton.jit
def _dequantize_kernel(
    codes_ptr, scales_ptr, tensor_scale_ptr, out_ptr, R, L, LP, out_stride_b, out_stride_r, out_stride_l,
    EBITS: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, HAS_INF: tl.constexpr,
    HAS_NAN: tl.constexpr, IS_INT: tl.constexpr, PACKED: tl.constexpr, SCALING: tl.constexpr,
    GRANULARITY: tl.constexpr, GROUP: tl.constexpr, HADAMARD: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """:func:`qpass.formats.dequantize`: codes ``[B*R, LP (/2)]`` and scales to ``[B, R, L]`` values."""
    pid_l, pid_r, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    code_row = (b * R + rows[:, None]).to(tl.int64)
    in_rows = rows[:, None] < R
    if PACKED:
        byte_cols = pid_l * (BLOCK_L // 2) + tl.arange(0, BLOCK_L // 2)
        packed = tl.load(codes_ptr + code_row * (LP // 2) + byte_cols[None, :],
                         mask=in_rows & (byte_cols[None, :] < LP // 2), other=0)
        packed = packed.to(tl.int32)
        codes = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_R, BLOCK_L))
    else:
        codes = tl.load(codes_ptr + code_row * LP + cols[None, :],
                        mask=in_rows & (cols[None, :] < LP), other=0).to(tl.int32)
    values = nm.decode_element(codes, EBITS, MBITS, EMIN, HAS_INF, HAS_NAN, IS_INT)
    GROUP_LEN: tl.constexpr = GROUP if GRANULARITY >= BLOCK else BLOCK_L
    GROUPS: tl.constexpr = BLOCK_L // GROUP_LEN
    if GRANULARITY >= BLOCK:
        group_cols = pid_l * GROUPS + tl.arange(0, GROUPS)
        stored = tl.load(scales_ptr + code_row * (LP // GROUP) + group_cols[None, :],
                         mask=in_rows & (group_cols[None, :] < LP // GROUP), other=0)
    elif GRANULARITY == 1:
        stored = tl.load(scales_ptr + b * R + rows[:, None], mask=in_rows, other=1.0)
    else:
        stored = tl.load(scales_ptr + tl.zeros_like(rows)[:, None])
    if SCALING == ABSMAX:
        decode = stored
    elif SCALING == MX:
        decode = nm.e8m0_value(stored.to(tl.int32), False)
    else:
        g = tl.load(tensor_scale_ptr + tl.zeros_like(rows)[:, None])
        decode = nm.decode_element(stored.to(tl.int32), 4, 3, -6, False, True, False) * g
    out = tl.reshape(
        tl.reshape(values, (BLOCK_R, GROUPS, GROUP_LEN)) * decode[:, :, None], (BLOCK_R, BLOCK_L)
    )
    offsets = (
        b.to(tl.int64) * out_stride_b + rows[:, None].to(tl.int64) * out_stride_r
        + cols[None, :].to(tl.int64) * out_stride_l
    )
    tl.store(out_ptr + offsets, nm.cast_rn(out, out_ptr.dtype.element_ty), mask=in_rows & (cols[None, :] < L))


# ---- launchers -----------------------------------------------------------------------------------


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    """``x`` (the quantization axis last) as ``[B, R, L]``, a view whenever the strides allow."""
    if x.ndim < 2:
        return x.reshape(1, 1, -1)
    try:
        return x.view(-1, *x.shape[-2:])
    except RuntimeError:  # leading dims that no single stride spans
        return x.reshape(-1, *x.shape[-2:])


def _grid(x3: torch.Tensor, length: int):
    return lambda meta: (
        triton.cdiv(length, meta["BLOCK_L"]), triton.cdiv(x3.shape[1], meta["BLOCK_R"]), x3.shape[0]
    )


def _rotation_matrix(rotation: Rotation | None, signs: torch.Tensor | None, device) -> torch.Tensor | None:
    """``diag(signs) · H_b`` in fp32, built as :func:`qpass.hadamard.hadamard_transform` builds it."""
    if rotation is None:
        return None
    matrix = hadamard_matrix(rotation.block, torch.float32).to(device)
    signs = rotation.sign_vector(rotation.block) if signs is None else signs
    return matrix if signs is None else signs.to(device=device, dtype=torch.float32)[:, None] * matrix


def _draw_seed(quantizer: Quantizer) -> int:
    """Philox seed for stochastic rounding, from torch's default CPU generator (reproducible under
    ``torch.manual_seed``)."""
    return int(torch.randint(0, 2**31 - 1, ())) if quantizer.rounding == "stochastic" else 0


def _run_quantize(x: torch.Tensor, quantizer: Quantizer, axis: int, rotation: Rotation | None,
                  signs: torch.Tensor | None, seed: int | None, out: torch.Tensor | None):
    """Launch the amax pre-pass (if the scale needs it) and the quantize kernel. ``out`` given: write
    the dequantized values there (its axis last, as ``[B, R, L]``); else return codes and scales."""
    spec = kernel_spec(quantizer.spec, quantizer.rounding, rotation.block if rotation is not None else 0)
    x3 = _as_3d(x.movedim(axis, -1))
    length = x3.shape[-1]
    rotated = rotation.padded(length) if rotation is not None else length
    padded = quantizer.spec.padded_length(rotated)
    matrix = _rotation_matrix(rotation, signs, x.device)
    amax = torch.zeros(
        x3.shape[0] * x3.shape[1] if spec.granularity == "channel" else 1, dtype=torch.int32, device=x.device
    )
    if spec.needs_amax:
        _amax_kernel[_grid(x3, length)](
            x3, amax, matrix, x3.shape[1], length, *x3.stride(), PER_ROW=spec.granularity == "channel",
            GROUP=spec.GROUP, GRANULARITY=spec.GRANULARITY, HADAMARD=spec.HADAMARD,
        )
    seed = _draw_seed(quantizer) if seed is None else seed
    rows = x3.shape[0] * x3.shape[1]
    if out is None:
        codes = torch.empty(rows, padded // 2 if spec.PACKED else padded, dtype=torch.uint8, device=x.device)
        scales = _empty_scales(spec, rows, padded, x.device)
        target, out_strides = codes, (0, 0, 0)
    else:
        target, out_strides = out, out.stride()
        codes = scales = None
    _quantize_kernel[_grid(x3, padded)](
        x3, amax, matrix, target, scales, seed, x3.shape[1], length, padded, rotated, *x3.stride(),
        *out_strides, WRITE_CODES=out is None, **spec.constexprs(),
    )
    return codes, scales, amax, spec


def _check(x: torch.Tensor, quantizer: Quantizer, axis: int, rotation: Rotation | None) -> None:
    """The reference's errors for bad arguments (an empty or integer tensor, an axis out of range),
    then a ValueError naming what the kernels cannot run (float64, a full-size rotation, blocks that
    are not a power of two) before anything is allocated or launched."""
    resolve_arguments(x, quantizer.spec, axis, None, quantizer.rounding, None, None, None)
    reason = unsupported(quantizer, rotation, x.dtype)
    if reason is not None:
        raise ValueError(f"no Triton kernel for {quantizer}: {reason}")


def _empty_scales(spec: KernelSpec, rows: int, padded: int, device) -> torch.Tensor:
    if spec.granularity in ("block", "tile"):
        return torch.empty(
            rows, padded // spec.GROUP, dtype=torch.float32 if spec.scaling == "absmax" else torch.uint8,
            device=device,
        )
    return torch.empty(rows if spec.granularity == "channel" else 1, dtype=torch.float32, device=device)


def quantize(
    x: torch.Tensor, quantizer: Quantizer, axis: int = -1, rotation: Rotation | None = None,
    signs: torch.Tensor | None = None, seed: int | None = None,
) -> QTensor:
    """:func:`qpass.quantize` by the generated kernels: a :class:`QTensor` of the same bits.

    ``rotation`` (a block Hadamard) is applied along ``axis`` first, fused into the kernel; the
    QTensor then describes the rotated tensor. ``seed`` seeds stochastic rounding (default: drawn
    from torch's generator)."""
    _check(x, quantizer, axis, rotation)
    shape = list(x.shape)
    x, axis = _with_axis(x, axis)
    codes, scales, amax, spec = _run_quantize(x, quantizer, axis, rotation, signs, seed, None)
    moved = list(x.movedim(axis, -1).shape)
    if rotation is not None:
        shape[axis] = moved[-1] = rotation.padded(moved[-1])
    codes = codes.reshape(*moved[:-1], codes.shape[-1])
    if spec.granularity in ("block", "tile"):
        scales = scales.reshape(*moved[:-1], scales.shape[-1])
    elif spec.granularity == "channel":
        scales = scales.reshape(*moved[:-1], 1)
    else:
        scales = scales.reshape(())
    tensor_scale = None
    if spec.scaling == "nvfp4":
        tensor_scale = _global_scale(amax)
    return QTensor(codes, scales, quantizer.spec, torch.Size(shape), axis, x.dtype, tensor_scale)


def _global_scale(amax_bits: torch.Tensor) -> torch.Tensor:
    return nvfp4.global_scale(amax_bits.view(torch.float32).reshape(()))


def _output(shape: list[int], dtype: torch.dtype, device, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A contiguous result of ``shape`` and its ``[B, R, L]`` view with ``axis`` last. Where no such
    view exists (an inner axis of a 4-d tensor), the kernel writes a moved copy (``_as_3d``'s
    reshape): returned second, moved back by :func:`_finish`."""
    out = torch.empty(shape, dtype=dtype, device=device)
    return out, _as_3d(out.movedim(axis, -1))


def _finish(out: torch.Tensor, out3: torch.Tensor, axis: int) -> torch.Tensor:
    if out3.untyped_storage().data_ptr() != out.untyped_storage().data_ptr():
        moved_shape = list(out.movedim(axis, -1).shape)
        out.copy_(out3.reshape(moved_shape).movedim(-1, axis))
    return out


def fake_quantize(
    x: torch.Tensor, quantizer: Quantizer, axis: int = -1, rotation: Rotation | None = None,
    signs: torch.Tensor | None = None, seed: int | None = None,
) -> torch.Tensor:
    """:func:`qpass.fake_quantize` (after ``rotation``, fused) in one pass, in ``x``'s dtype."""
    _check(x, quantizer, axis, rotation)
    scalar = x.ndim == 0 and rotation is None  # quantized as one element, returned 0-dim as torch's is
    x, axis = _with_axis(x, axis)
    shape = list(x.shape)
    if rotation is not None:
        shape[axis] = rotation.padded(shape[axis])
    out, out3 = _output(shape, x.dtype, x.device, axis)
    _run_quantize(x, quantizer, axis, rotation, signs, seed, out3)
    out = _finish(out, out3, axis)
    return out.reshape(()) if scalar else out


def _with_axis(x: torch.Tensor, axis: int) -> tuple[torch.Tensor, int]:
    """A 0-dim tensor is quantized as one element; the axis as a non-negative index."""
    return (x.reshape(1) if x.ndim == 0 else x), axis % max(x.ndim, 1)


def dequantize(qt: QTensor) -> torch.Tensor:
    """:func:`qpass.dequantize` by the generated kernel."""
    spec = kernel_spec(qt.format)
    shape = list(qt.shape) or [1]
    out, out3 = _output(shape, qt.dtype, qt.codes.device, qt.axis)
    length = out3.shape[-1]
    padded = qt.format.padded_length(length)
    tensor_scale = (
        qt.tensor_scale if qt.tensor_scale is not None else qt.codes.new_ones((), dtype=torch.float32)
    )
    _dequantize_kernel[_grid(out3, padded)](
        qt.codes, qt.scales, tensor_scale.float(), out3, out3.shape[1], length, padded, *out3.stride(),
        **{name: getattr(spec, name) for name in DEQUANTIZE_CONSTEXPRS},
    )
    return _finish(out, out3, qt.axis).reshape(qt.shape)


DEQUANTIZE_CONSTEXPRS = (
    "EBITS", "MBITS", "EMIN", "HAS_INF", "HAS_NAN", "IS_INT", "PACKED", "SCALING", "GRANULARITY", "GROUP",
    "HADAMARD",
)
