"""Generated quantize, fake-quantize and dequantize kernels, and the Python functions that launch them.

One template per job, specialized by a :class:`~qpass.codegen.spec.KernelSpec`:

- ``_amax_kernel``: the amax of each row or of the whole tensor, for scales that span more than one
  program (per tensor, per channel, NVFP4's global scale), by an integer ``atomic_max`` on |x|'s bits;
- ``_quantize_kernel``: block amax fused in, scales, rounding (RNE, away, Philox stochastic), then
  either codes (packed) and scales, or the dequantized values (fake quantization, for training);
- ``_dequantize_kernel``: codes and scales back to values.

Each reads its input through strides as ``[B, R, L]`` with L the quantization axis, so quantizing a
weight or an activation along a non-last axis (the backward GEMMs' operands) reads the tensor in
place instead of a transposed copy. A fused Hadamard rotation transforms each row's L-blocks in
registers before the amax, with the reference's butterfly (``qpass.hadamard.hadamard_transform``:
the same fp32 sums and differences in the same order, then the one multiply by 1/sqrt(b)), so its
bits are the reference's on a GPU as in the interpreter. It runs in fp32: a bf16 or fp16 input's
rotated values are not rounded back to its dtype (qpass.ops rotates ``x.float()``). Results match
:mod:`qpass.formats` bit for bit (stochastic rounding in distribution: its random stream is
Philox, not torch's).

Each launcher checks its arguments, then calls a ``qpass_codegen::`` op (``torch.library.triton_op``,
its kernels behind ``wrap_triton``, so that torch.compile sees and can inline them) that allocates
the results and launches the kernels on the input's device.
"""

from __future__ import annotations

import contextlib
import functools
import math
import struct

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from qpass.codegen import numerics as nm
from qpass.codegen.spec import KernelSpec, kernel_spec, unsupported
from qpass.codegen.tuning import elementwise_configs, prune_elementwise, size_bucket
from qpass.formats import nvfp4
from qpass.formats.api import resolve_arguments
from qpass.formats.qtensor import QTensor
from qpass.quantizer import Quantizer
from qpass.rotation import Rotation

BLOCK, TILE = tl.constexpr(2), tl.constexpr(3)  # GRANULARITIES indices (constexprs: globals a kernel reads)
ABSMAX, MX = tl.constexpr(0), tl.constexpr(1)  # SCALINGS indices; 2 is NVFP4


@triton.jit
def _program_tile(LENGTH, R, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """This program's (column tile, row tile, batch entry) of ``[B, R, LENGTH]``. The grid is one
    axis (:func:`_grid`): a GPU caps a grid's second and third at 65535 programs, too few for the
    row tiles of a tall tensor or the entries of a large batch."""
    pid = tl.program_id(0)
    tiles_l = tl.cdiv(LENGTH, BLOCK_L)
    tiles_r = tl.cdiv(R, BLOCK_R)
    return pid % tiles_l, (pid // tiles_l) % tiles_r, pid // (tiles_l * tiles_r)


@triton.jit
def _hadamard_blocks(x, signs_ptr, scale, HADAMARD: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_L: tl.constexpr):
    """``x · diag(signs) H_b / sqrt(b)`` on every HADAMARD-point block of the tile's rows, step for
    step as :func:`qpass.hadamard.hadamard_transform`: the signs, then butterflies pairing elements
    1, 2, 4, ... apart (sum in the first's place, difference in the second's), then one multiply by
    ``scale`` (1/sqrt(b) in fp32). Each step is one correctly rounded fp32 operation, so the bits
    are the reference's on every backend; a ``tl.dot`` by the matrix would sum in its own order."""
    signs = tl.load(signs_ptr + tl.arange(0, HADAMARD))
    x = tl.reshape(tl.reshape(x, (BLOCK_R * BLOCK_L // HADAMARD, HADAMARD)) * signs[None, :],
                   (BLOCK_R * BLOCK_L,))
    for step in tl.static_range(7):  # pairs 2^step = 1 to 64 apart: blocks of up to 128 points
        if (1 << step) < HADAMARD:
            pairs = tl.reshape(x, (BLOCK_R * BLOCK_L // (2 << step), 2, 1 << step))
            top, bottom = tl.split(tl.permute(pairs, (0, 2, 1)))
            x = tl.reshape(tl.permute(tl.join(top + bottom, top - bottom), (0, 2, 1)), (BLOCK_R * BLOCK_L,))
    return tl.reshape(x * scale, (BLOCK_R, BLOCK_L))


@triton.jit
def _load_tile(x_ptr, b, rows, cols, R, L, stride_b, stride_r, stride_l, signs_ptr, rotation_scale,
               HADAMARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """An fp32 ``[BLOCK_R, BLOCK_L]`` tile, zero beyond the tensor, rotated when HADAMARD > 0."""
    mask = (rows[:, None] < R) & (cols[None, :] < L)
    offsets = (
        b.to(tl.int64) * stride_b + rows[:, None].to(tl.int64) * stride_r
        + cols[None, :].to(tl.int64) * stride_l
    )
    x = nm.to_float32(tl.load(x_ptr + offsets, mask=mask, other=0.0))
    if HADAMARD > 0:
        x = _hadamard_blocks(x, signs_ptr, rotation_scale, HADAMARD, BLOCK_R, BLOCK_L)
    return x


@triton.jit
def _load_seed(seed_ptr, ROUNDING: tl.constexpr):
    """The stochastic-rounding seed, read on the device where it was drawn (no host sync, and a CUDA
    graph replays a fresh draw rather than a frozen constant); 0 for the other roundings."""
    if ROUNDING == nm.STOCHASTIC:
        seed = tl.load(seed_ptr)
    else:
        seed = 0
    return seed


# Tuned on the sizes' buckets (R_BUCKET, L_BUCKET: tuning.size_bucket), not on R and L themselves:
# those change with every token count. The buckets are passed only for the key, never specialized on.
TUNING_KEY = ["R_BUCKET", "L_BUCKET", "GROUP", "GRANULARITY", "HADAMARD"]
BUCKETS = ["R_BUCKET", "L_BUCKET"]


@triton.autotune(configs=elementwise_configs(), key=TUNING_KEY,
                 prune_configs_by={"early_config_prune": prune_elementwise})
@triton.jit(do_not_specialize=BUCKETS)
def _amax_kernel(x_ptr, amax_ptr, signs_ptr, rotation_scale, R, L, R_BUCKET, L_BUCKET, stride_b, stride_r,
                 stride_l, PER_ROW: tl.constexpr, GROUP: tl.constexpr, GRANULARITY: tl.constexpr,
                 HADAMARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    pid_l, pid_r, b = _program_tile(L, R, BLOCK_R, BLOCK_L)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    x = _load_tile(
        x_ptr, b, rows, cols, R, L, stride_b, stride_r, stride_l, signs_ptr, rotation_scale, HADAMARD,
        BLOCK_R, BLOCK_L,
    )
    row_amax = tl.max(nm.abs_bits(x), axis=1)
    if PER_ROW:
        tl.atomic_max(amax_ptr + b.to(tl.int64) * R + rows, row_amax, mask=rows < R)
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
        index = b.to(tl.int64) * R + rows if GRANULARITY == 1 else tl.zeros_like(rows)
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
        g = nm.nvfp4_global_scale(nm.bits_float(tl.load(amax_ptr + tl.zeros_like(rows))), SCALE_MODE)[:, None]
        if SCALE_MODE == nm.FOUR_OVER_SIX:
            TILES: tl.constexpr = GRANULARITY == TILE
            s_b = nm.nvfp4_four_over_six_scale(x, group_amax, g, BLOCK_R, GROUPS, TILES)
        else:
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
    ``(b * R + row) * LP + col``, so every kernel draws the same bits for the same element; in
    int64, since a tensor may hold more than 2^31 elements."""
    GROUP_LEN: tl.constexpr = GROUP if GRANULARITY >= BLOCK else BLOCK_L
    GROUPS: tl.constexpr = BLOCK_L // GROUP_LEN
    encode, decode, stored = _group_scales(
        x, amax_ptr, b, rows, R, EBITS, MBITS, EMIN, EMAX, MAX_NORMAL, HAS_INF, HAS_NAN, IS_INT,
        SCALING, GRANULARITY, GROUP, SCALE_MODE, POW2, GROUPS, GROUP_LEN, BLOCK_R,
    )
    scaled = tl.reshape(
        tl.reshape(x, (BLOCK_R, GROUPS, GROUP_LEN)) * encode[:, :, None], (BLOCK_R, BLOCK_L)
    )
    element_index = (b.to(tl.int64) * R + rows)[:, None] * LP + cols[None, :]
    values = nm.round_to_element(
        scaled, element_index, seed, ROUNDING, MBITS, EMIN, MAX_NORMAL, HAS_INF, IS_INT
    )
    return values, decode, stored


@triton.autotune(configs=elementwise_configs(), key=TUNING_KEY,
                 prune_configs_by={"early_config_prune": prune_elementwise})
@triton.jit(do_not_specialize=BUCKETS)
def _quantize_kernel(
    x_ptr, amax_ptr, signs_ptr, rotation_scale, out_ptr, scales_ptr, seed_ptr,
    R, L, LP, LOUT, R_BUCKET, L_BUCKET, stride_b, stride_r, stride_l, out_stride_b, out_stride_r,
    out_stride_l,
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
    pid_l, pid_r, b = _program_tile(LP, R, BLOCK_R, BLOCK_L)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    x = _load_tile(
        x_ptr, b, rows, cols, R, L, stride_b, stride_r, stride_l, signs_ptr, rotation_scale, HADAMARD,
        BLOCK_R, BLOCK_L,
    )
    if HADAMARD > 0:  # past the rotated length, the padding to whole groups is +0 (signs make -0s)
        x = tl.where(cols[None, :] < LOUT, x, 0.0)
    values, decode, stored = _quantize_tile(
        x, amax_ptr, _load_seed(seed_ptr, ROUNDING), b, rows, cols, R, LP, EBITS, MBITS, EMIN, EMAX,
        MAX_NORMAL, HAS_INF, HAS_NAN, IS_INT, SCALING, GRANULARITY, GROUP, SCALE_MODE, POW2, ROUNDING,
        BLOCK_R, BLOCK_L,
    )
    GROUP_LEN: tl.constexpr = GROUP if GRANULARITY >= BLOCK else BLOCK_L
    GROUPS: tl.constexpr = BLOCK_L // GROUP_LEN
    in_rows = rows[:, None] < R
    if WRITE_CODES:
        codes = nm.encode_element(values, EBITS, MBITS, EMIN, HAS_INF, HAS_NAN, IS_INT)
        code_row = b.to(tl.int64) * R + rows[:, None]
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
                tl.store(scales_ptr + code_row, stored, mask=in_rows)
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


@triton.autotune(configs=elementwise_configs(), key=TUNING_KEY,
                 prune_configs_by={"early_config_prune": prune_elementwise})
@triton.jit(do_not_specialize=BUCKETS)
def _dequantize_kernel(
    codes_ptr, scales_ptr, tensor_scale_ptr, out_ptr, R, L, LP, R_BUCKET, L_BUCKET, out_stride_b,
    out_stride_r, out_stride_l,
    EBITS: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, HAS_INF: tl.constexpr,
    HAS_NAN: tl.constexpr, IS_INT: tl.constexpr, PACKED: tl.constexpr, SCALING: tl.constexpr,
    GRANULARITY: tl.constexpr, GROUP: tl.constexpr, HADAMARD: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """:func:`qpass.formats.dequantize`: codes ``[B*R, LP (/2)]`` and scales to ``[B, R, L]`` values."""
    pid_l, pid_r, b = _program_tile(LP, R, BLOCK_R, BLOCK_L)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    code_row = b.to(tl.int64) * R + rows[:, None]
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
        stored = tl.load(scales_ptr + code_row, mask=in_rows, other=1.0)
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


def _view_3d(x: Tensor) -> Tensor | None:
    """``x`` (the quantization axis last) as a ``[B, R, L]`` view, or None where no single stride
    spans its leading dims."""
    if x.ndim < 2:
        return x.reshape(1, 1, -1)
    try:
        return x.view(-1, *x.shape[-2:])
    except RuntimeError:
        return None


def _as_3d(x: Tensor) -> Tensor:
    """``x`` (the quantization axis last) as ``[B, R, L]``, a view whenever the strides allow."""
    view = _view_3d(x)
    return view if view is not None else x.reshape(-1, *x.shape[-2:])


def _grid(x3: Tensor, length: int):
    """One program per ``[BLOCK_R, BLOCK_L]`` tile of ``[B, R, length]``, all on the grid's first axis
    (up to 2^31 - 1 programs; :func:`_program_tile` finds each one's tile)."""
    batches, rows = x3.shape[0], x3.shape[1]
    return lambda meta: (
        triton.cdiv(length, meta["BLOCK_L"]) * triton.cdiv(rows, meta["BLOCK_R"]) * batches,
    )


def on_device(device: torch.device):
    """Launch on ``device``: Triton launches on the current CUDA device, whatever the tensors'."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@functools.lru_cache(maxsize=64)
def _fixed_signs(rotation: Rotation, device: torch.device) -> Tensor:
    # Kept per device so that a launch does not copy the signs from the host (a sync) every call.
    signs = rotation.sign_vector(rotation.block)
    return (torch.ones(rotation.block) if signs is None else signs).to(device)


def _rotation_signs(rotation: Rotation | None, signs: Tensor | None, device: torch.device) -> Tensor | None:
    """The fp32 sign vector the kernels multiply each block by: this call's ``signs`` (a resampled
    rotation's; copied only if they are not already on ``device``), or the rotation's own (ones
    for none; a multiply by 1 is exact)."""
    if rotation is None:
        return None
    if signs is not None:
        return signs.to(device=device, dtype=torch.float32)
    return _fixed_signs(rotation, device)


@functools.cache
def _rotation_scale(block: int) -> float:
    """``1 / sqrt(block)`` rounded to fp32, as :func:`qpass.hadamard.hadamard_transform` multiplies
    by it (struct, not a tensor: the ops' bodies also run on fake tensors)."""
    return struct.unpack("f", struct.pack("f", 1 / math.sqrt(block)))[0] if block else 1.0


def draw_seed(rounding: str, seed: int | None, device: torch.device) -> Tensor | None:
    """The Philox seed of stochastic rounding, as the one-element int64 tensor the kernels read:
    ``seed``, or drawn from ``device``'s generator (reproducible under ``torch.manual_seed``; on a
    GPU no host sync, and the CPU generator is left alone). None for the other roundings."""
    if rounding != "stochastic":
        return None
    if seed is None:
        return torch.randint(0, 2**31 - 1, (1,), device=device)
    return torch.full((1,), seed, dtype=torch.int64, device=device)


def _rotated_length(spec: KernelSpec, length: int) -> int:
    return -(-length // spec.HADAMARD) * spec.HADAMARD if spec.HADAMARD else length


def launch_amax(x3: Tensor, spec: KernelSpec, signs: Tensor | None) -> Tensor:
    """The amax pre-pass's |x| bits (int32) of ``x3`` ``[B, R, L]``: per row for channel scales, else
    one; zeros where the spec's scales need none."""
    batches, rows, length = x3.shape
    amax = torch.zeros(
        batches * rows if spec.granularity == "channel" else 1, dtype=torch.int32, device=x3.device
    )
    if spec.needs_amax:
        wrap_triton(_amax_kernel)[_grid(x3, length)](
            x3, amax, signs, _rotation_scale(spec.HADAMARD), rows, length, size_bucket(rows),
            size_bucket(length), *x3.stride(), PER_ROW=spec.granularity == "channel", GROUP=spec.GROUP,
            GRANULARITY=spec.GRANULARITY, HADAMARD=spec.HADAMARD,
        )
    return amax


def _launch_quantize(x3: Tensor, spec: KernelSpec, signs: Tensor | None, seed: Tensor | None, out: Tensor,
                     scales: Tensor | None) -> Tensor:
    """The amax pre-pass and the quantize kernel on ``x3`` ``[B, R, L]``: codes into ``out`` and
    ``scales`` when ``scales`` is given, else the fake-quantized values into ``out`` (``[B, R, L']``,
    L' the rotated length). Returns the amax bits."""
    rows, length = x3.shape[1], x3.shape[2]
    rotated = _rotated_length(spec, length)
    padded = spec.padded_length(rotated)
    amax = launch_amax(x3, spec, signs)
    write_codes = scales is not None
    wrap_triton(_quantize_kernel)[_grid(x3, padded)](
        x3, amax, signs, _rotation_scale(spec.HADAMARD), out, scales, seed, rows, length, padded, rotated,
        size_bucket(rows), size_bucket(padded), *x3.stride(), *((0, 0, 0) if write_codes else out.stride()),
        WRITE_CODES=write_codes, **spec.constexprs(),
    )
    return amax


def _empty_scales(spec: KernelSpec, rows: int, padded: int, device) -> Tensor:
    if spec.granularity in ("block", "tile"):
        return torch.empty(
            rows, padded // spec.GROUP, dtype=torch.float32 if spec.scaling == "absmax" else torch.uint8,
            device=device,
        )
    return torch.empty(rows if spec.granularity == "channel" else 1, dtype=torch.float32, device=device)


@triton_op("qpass_codegen::quantize", mutates_args=())
def _quantize_op(
    x: Tensor, spec: str, axis: int, signs: Tensor | None, seed: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Codes ``[rows, LP (/2 packed)]``, scales and the amax bits of ``x`` quantized along ``axis``
    by the kernel spec ``spec`` (JSON), its rotation fused (``signs``: the blocks' sign vector)."""
    kernel = KernelSpec.from_json(spec)
    x3 = _as_3d(x.movedim(axis, -1))
    rows = x3.shape[0] * x3.shape[1]
    padded = kernel.padded_length(_rotated_length(kernel, x3.shape[-1]))
    codes = torch.empty(rows, padded // 2 if kernel.PACKED else padded, dtype=torch.uint8, device=x.device)
    scales = _empty_scales(kernel, rows, padded, x.device)
    with on_device(x.device):
        amax = _launch_quantize(x3, kernel, signs, seed, codes, scales)
    return codes, scales, amax


@triton_op("qpass_codegen::fake_quantize", mutates_args=())
def _fake_quantize_op(x: Tensor, spec: str, axis: int, signs: Tensor | None, seed: Tensor | None) -> Tensor:
    """``x`` fake-quantized along ``axis`` in its dtype (the axis rotated, so padded to whole blocks)."""
    kernel = KernelSpec.from_json(spec)
    shape = list(x.shape)
    shape[axis] = _rotated_length(kernel, shape[axis])
    out, buffer, out3 = _output(shape, x.dtype, x.device, axis)
    with on_device(x.device):
        _launch_quantize(_as_3d(x.movedim(axis, -1)), kernel, signs, seed, out3, None)
    return _finish(out, buffer, axis)


@triton_op("qpass_codegen::dequantize", mutates_args=())
def _dequantize_op(
    codes: Tensor, scales: Tensor, tensor_scale: Tensor | None, spec: str, shape: list[int], axis: int,
    dtype: torch.dtype,
) -> Tensor:
    """Codes and scales (``[rows, LP (/2)]``, as :func:`_quantize_op` writes them) to values of
    ``shape`` in ``dtype``, quantized along ``axis``."""
    kernel = KernelSpec.from_json(spec)
    out, buffer, out3 = _output(shape, dtype, codes.device, axis)
    rows, length = out3.shape[1], out3.shape[2]
    padded = kernel.padded_length(length)
    if tensor_scale is None:
        tensor_scale = codes.new_ones((), dtype=torch.float32)
    with on_device(codes.device):
        wrap_triton(_dequantize_kernel)[_grid(out3, padded)](
            codes, scales, tensor_scale.float(), out3, rows, length, padded, size_bucket(rows),
            size_bucket(padded), *out3.stride(),
            **{name: getattr(kernel, name) for name in DEQUANTIZE_CONSTEXPRS},
        )
    return _finish(out, buffer, axis)


def _check(x: Tensor, quantizer: Quantizer, axis: int, rotation: Rotation | None) -> None:
    """The reference's errors for bad arguments (an empty or integer tensor, an axis out of range),
    then a ValueError naming what the kernels cannot run (float64, a full-size rotation, blocks that
    are not a power of two) before anything is allocated or launched."""
    resolve_arguments(x, quantizer.spec, axis, None, quantizer.rounding, None, None, None)
    reason = unsupported(quantizer, rotation, x.dtype)
    if reason is not None:
        raise ValueError(f"no Triton kernel for {quantizer}: {reason}")


def _kernel_inputs(x: Tensor, quantizer: Quantizer, rotation: Rotation | None, signs: Tensor | None,
                   seed: int | None) -> tuple[str, Tensor | None, Tensor | None]:
    """The ops' spec (JSON), sign vector and seed tensor for quantizing ``x``."""
    spec = kernel_spec(quantizer.spec, quantizer.rounding, rotation.block if rotation is not None else 0)
    signs = _rotation_signs(rotation, signs, x.device)
    return spec.to_json(), signs, draw_seed(quantizer.rounding, seed, x.device)


def quantize(
    x: Tensor, quantizer: Quantizer, axis: int = -1, rotation: Rotation | None = None,
    signs: Tensor | None = None, seed: int | None = None,
) -> QTensor:
    """:func:`qpass.quantize` by the generated kernels: a :class:`QTensor` of the same bits.

    ``rotation`` (a block Hadamard) is applied along ``axis`` first, fused into the kernel; the
    QTensor then describes the rotated tensor. ``seed`` seeds stochastic rounding (default: drawn
    from the generator of x's device)."""
    _check(x, quantizer, axis, rotation)
    shape = list(x.shape)
    x, axis = _with_axis(x, axis)
    spec, signs, seed = _kernel_inputs(x, quantizer, rotation, signs, seed)
    codes, scales, amax = torch.ops.qpass_codegen.quantize(x.detach(), spec, axis, signs, seed)
    moved = list(x.movedim(axis, -1).shape)
    if rotation is not None:
        shape[axis] = moved[-1] = rotation.padded(moved[-1])
    codes = codes.reshape(*moved[:-1], codes.shape[-1])
    granularity = quantizer.spec.granularity
    if granularity in ("block", "tile"):
        scales = scales.reshape(*moved[:-1], scales.shape[-1])
    elif granularity == "channel":
        scales = scales.reshape(*moved[:-1], 1)
    else:
        scales = scales.reshape(())
    tensor_scale = None
    if quantizer.spec.scaling == "nvfp4":
        tensor_scale = _global_scale(amax, quantizer.spec.scale_mode)
    return QTensor(codes, scales, quantizer.spec, torch.Size(shape), axis, x.dtype, tensor_scale)


def _global_scale(amax_bits: Tensor, scale_mode: str | None) -> Tensor:
    return nvfp4.global_scale(amax_bits.view(torch.float32).reshape(()), scale_mode)


def _output(shape: list[int], dtype: torch.dtype, device, axis: int) -> tuple[Tensor, Tensor | None, Tensor]:
    """A contiguous result of ``shape``, and where the kernel writes it, ``[B, R, L]`` with ``axis``
    last: a view of the result, or where none exists (an inner axis of a 4-d tensor) a buffer of its
    own, returned second too for :func:`_finish` to move back (None: nothing to move)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    moved = out.movedim(axis, -1)
    view = _view_3d(moved)
    if view is not None:
        return out, None, view
    buffer = torch.empty(moved.shape[:-2].numel(), *moved.shape[-2:], dtype=dtype, device=device)
    return out, buffer, buffer


def _finish(out: Tensor, buffer: Tensor | None, axis: int) -> Tensor:
    if buffer is not None:
        out.copy_(buffer.reshape(out.movedim(axis, -1).shape).movedim(-1, axis))
    return out


def fake_quantize(
    x: Tensor, quantizer: Quantizer, axis: int = -1, rotation: Rotation | None = None,
    signs: Tensor | None = None, seed: int | None = None,
) -> Tensor:
    """:func:`qpass.fake_quantize` (after ``rotation``, fused) in one pass, in ``x``'s dtype."""
    _check(x, quantizer, axis, rotation)
    scalar = x.ndim == 0 and rotation is None  # quantized as one element, returned 0-dim as torch's is
    x, axis = _with_axis(x, axis)
    spec, signs, seed = _kernel_inputs(x, quantizer, rotation, signs, seed)
    # Forward only, detached as it always was: the ops have no autograd (qpass.ops registers it).
    out = torch.ops.qpass_codegen.fake_quantize(x.detach(), spec, axis, signs, seed)
    return out.reshape(()) if scalar else out


def _with_axis(x: Tensor, axis: int) -> tuple[Tensor, int]:
    """A 0-dim tensor is quantized as one element; the axis as a non-negative index."""
    return (x.reshape(1) if x.ndim == 0 else x), axis % max(x.ndim, 1)


def dequantize(qt: QTensor) -> Tensor:
    """:func:`qpass.dequantize` by the generated kernel."""
    out = torch.ops.qpass_codegen.dequantize(
        qt.codes, qt.scales, qt.tensor_scale, kernel_spec(qt.format).to_json(), list(qt.shape) or [1],
        qt.axis, qt.dtype,
    )
    return out.reshape(qt.shape)


DEQUANTIZE_CONSTEXPRS = (
    "EBITS", "MBITS", "EMIN", "HAS_INF", "HAS_NAN", "IS_INT", "PACKED", "SCALING", "GRANULARITY", "GROUP",
    "HADAMARD",
)
