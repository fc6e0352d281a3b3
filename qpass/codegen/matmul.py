"""The quantized matmul: ``y = x · dequant(W)ᵀ (+ bias)`` with W stored packed, dequantized in registers.

:func:`weight_matmul` takes a weight QTensor of W ``[N, K]`` quantized along K (what
``qpass.quantize(w, fmt, axis=-1)`` or :func:`qpass.codegen.quantize` returns) and an activation
``x [..., K]``, which is either used as it is or fake-quantized along K on the fly inside the kernel
with an ``input_quantizer`` (SPEC section 6's forward GEMM). Accumulation is in fp32; the output is
cast to ``out_dtype`` after the optional bias is added in fp32.

**Scales split for tensor cores.** Each operand's scale is split into an *inner* part, multiplied
into the decoded elements inside the K loop, and an *outer* fp32 factor per output column (weight),
per row (activations) or per tensor, applied to the accumulator once after the loop:

=====================  ===============================  ===============================
format                 inner (per block, in the loop)   outer (after the loop)
=====================  ===============================  ===============================
MX                     E8M0 ``2^e``                     --
nvfp4 (1x16 or tile)   E4M3 ``s_b``                     ``g`` (per tensor)
absmax tensor/channel  --                               the fp32 decode scale
absmax block, pow2     the decode scale (``2^e``)       --
absmax block           the fp32 decode scale            --
=====================  ===============================  ===============================

element x inner is exact in bf16 for all but the last row: elements have at most 7 significant bits
(MX int8's k/64; e2m1 x e4m3 has at most 6) and a power of two adds none. So where both operands
split, the ``tl.dot`` runs on bf16 operands, whose products are exact in the fp32 accumulator: the
only rounding is fp32 accumulation (and the multiplies by the outer factors). An arbitrary fp32
absmax block scale cannot be split so: such weights are dequantized to fp32 tiles (the same fp32
products as :func:`qpass.dequantize`) and multiplied with an IEEE fp32 dot.

**Activations** are x itself (``input_quantizer=None``) or quantized along K on the fly, reproducing
:func:`qpass.fake_quantize` bit for bit. Which values enter the dot:

- bf16 x: x, or fake_quantize's values cast back to bf16 (as it returns them): bf16 already, so
  the dot is bf16 whenever the weight splits;
- fp32 x with a splitting activation format (and weight): the activations' element values times
  their inner scale, their outer factor (per-token absmax scale, nvfp4's g) after the loop: the
  same products up to fp32 rounding, in a bf16 dot;
- otherwise (fp32 x against fp32 absmax blocks on either side, any fp16 x): fake_quantize's values
  in x's dtype, IEEE fp32 dot (see ``_weight_matmul_kernel`` for why not tf32 or bf16).

So the result is ``input_quantizer(x, -1) @ dequantize(W).T`` up to fp32 rounding. Block scales
(MX, nvfp4, absmax blocks) are computed per ``[BLOCK_M, BLOCK_K]`` tile in registers (a K tile
always spans whole blocks; for nvfp4 16x16 tiles the rows are laid out per batch entry, each padded
to a multiple of 16, so an M tile spans whole 16-row groups); scales that need a whole row or
tensor (absmax tensor and channel, nvfp4's global scale) come from the amax pre-pass of
:mod:`qpass.codegen.quantize`. Stochastic rounding draws Philox numbers at the same element
offsets as :func:`qpass.codegen.fake_quantize`, so the same ``seed`` quantizes x the same way.

**tl.dot_scaled.** Triton's interpreter runs ``tl.dot_scaled`` (checked with a small kernel,
Triton 3.9), so MXFP4/MXFP8 weights times MXFP4/MXFP8-quantized activations (bf16 or fp32 ``x``)
have a path that hands the packed codes and E8M0 scales to ``tl.dot_scaled``. It is taken by
default only on GPUs with compute capability 10 or more (Blackwell: native MX tensor cores; Triton
emulates ``dot_scaled`` elsewhere, Hopper has no FP4/MX MMA), and is tested under the interpreter by
forcing it (``dot_scaled=True``).

Where the split is not exact: bf16 holds fewer bits than fp32 below its normal range (|value| <
2^-126, i.e. MX scales near 2^-127), where the bf16 dot rounds what the fp32 reference keeps; an
outer factor applied after the sum can overflow (or underflow) where the reference's per-element
products would not, only for sums near fp32's limits. The kernel is forward only (no autograd).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from qpass.codegen import numerics as nm
from qpass.codegen.quantize import (
    _as_3d,
    _load_seed,
    _load_tile,
    _quantize_tile,
    draw_seed,
    launch_amax,
    on_device,
)
from qpass.codegen.spec import KERNEL_DTYPES, KernelSpec, kernel_spec, unsupported
from qpass.codegen.tuning import INTERPRETING, matmul_configs, prune_matmul, size_bucket
from qpass.formats.qtensor import QTensor
from qpass.quantizer import Quantizer

# GRANULARITIES and SCALINGS indices (constexprs: globals a kernel reads)
TENSOR, CHANNEL, BLOCK, TILE = (tl.constexpr(i) for i in range(4))
ABSMAX, MX, NVFP4 = (tl.constexpr(i) for i in range(3))

WEIGHT_CONSTEXPRS = (
    "EBITS", "MBITS", "EMIN", "HAS_INF", "HAS_NAN", "IS_INT", "PACKED", "SCALING", "GRANULARITY", "GROUP",
    "POW2",
)
ACTIVATION_CONSTEXPRS = (
    "EBITS", "MBITS", "EMIN", "EMAX", "MAX_NORMAL", "HAS_INF", "HAS_NAN", "IS_INT", "PACKED", "SCALING",
    "GRANULARITY", "GROUP", "SCALE_MODE", "POW2", "ROUNDING",
)
# (ebits, mbits) of the element formats tl.dot_scaled takes, by its names for them.
DOT_SCALED_FORMATS = {(2, 1): "e2m1", (4, 3): "e4m3", (5, 2): "e5m2"}


@triton.jit
def _weight_codes(w_ptr, n, k0, N, KP, PACKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The raw uint8 codes of W's ``[BLOCK_N, BLOCK_K]`` tile at column ``k0`` (fp4: ``BLOCK_K / 2``
    bytes per row), zero beyond the codes. Codes are ``[N, KP]`` (fp4 ``[N, KP / 2]``)."""
    row = n[:, None].to(tl.int64)
    if PACKED:
        byte_cols = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        codes = tl.load(w_ptr + row * (KP // 2) + byte_cols[None, :],
                        mask=(n[:, None] < N) & (byte_cols[None, :] < KP // 2), other=0)
    else:
        cols = k0 + tl.arange(0, BLOCK_K)
        codes = tl.load(w_ptr + row * KP + cols[None, :],
                        mask=(n[:, None] < N) & (cols[None, :] < KP), other=0)
    return codes


@triton.jit
def _weight_scale_codes(
    scales_ptr, n, k0, N, KP, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
):
    """The stored block scales of the tile's ``GROUPS`` blocks, ``[BLOCK_N, GROUPS]`` (0 beyond W)."""
    group_cols = k0 // GROUP + tl.arange(0, GROUPS)
    return tl.load(scales_ptr + n[:, None].to(tl.int64) * (KP // GROUP) + group_cols[None, :],
                   mask=(n[:, None] < N) & (group_cols[None, :] < KP // GROUP), other=0)


@triton.jit
def _inner_scale(stored, SCALING: tl.constexpr):
    """A block's stored scale as the fp32 factor multiplied into its elements in the K loop."""
    if SCALING == MX:
        inner = nm.e8m0_value(stored.to(tl.int32), False)
    elif SCALING == NVFP4:
        inner = nm.decode_element(stored.to(tl.int32), 4, 3, -6, False, True, False)  # s_b, an exact E4M3
    else:
        inner = stored  # an absmax block's fp32 decode scale
    return inner


@triton.jit
def _weight_tile(
    w_ptr, scales_ptr, n, k0, N, KP, EBITS: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr,
    HAS_INF: tl.constexpr, HAS_NAN: tl.constexpr, IS_INT: tl.constexpr, PACKED: tl.constexpr,
    SCALING: tl.constexpr, GRANULARITY: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """W's ``[BLOCK_N, BLOCK_K]`` tile as fp32 element values times their inner scales."""
    codes = _weight_codes(w_ptr, n, k0, N, KP, PACKED, BLOCK_N, BLOCK_K).to(tl.int32)
    if PACKED:  # element 2i in the low nibble, 2i + 1 in the high one
        codes = tl.reshape(tl.join(codes & 0xF, codes >> 4), (BLOCK_N, BLOCK_K))
    values = nm.decode_element(codes, EBITS, MBITS, EMIN, HAS_INF, HAS_NAN, IS_INT)
    if GRANULARITY >= BLOCK:
        if GROUP <= BLOCK_K:  # whole blocks in the tile
            GROUPS: tl.constexpr = BLOCK_K // GROUP
            inner = _inner_scale(
                _weight_scale_codes(scales_ptr, n, k0, N, KP, GROUP, BLOCK_N, GROUPS), SCALING
            )
            values = tl.reshape(
                tl.reshape(values, (BLOCK_N, GROUPS, GROUP)) * inner[:, :, None], (BLOCK_N, BLOCK_K)
            )
        else:  # the tile lies inside one block (both are powers of two)
            stored = tl.load(scales_ptr + n.to(tl.int64) * (KP // GROUP) + k0 // GROUP, mask=n < N, other=0)
            values = values * _inner_scale(stored, SCALING)[:, None]
    return values


@triton.jit
def _activation_inner(values, decode, stored, SCALING: tl.constexpr, GRANULARITY: tl.constexpr,
                      GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Quantized activations times their inner scales (X_SPLIT): MX ``2^e``, nvfp4 ``s_b``, a
    power-of-two absmax block scale; per-tensor and per-row absmax scales are outer (factor 1)."""
    if GRANULARITY >= BLOCK:
        if SCALING == NVFP4:
            inner = nm.decode_element(stored, 4, 3, -6, False, True, False)  # s_b (decode is s_b * g)
        else:
            inner = decode  # 2^e
        values = tl.reshape(
            tl.reshape(values, (BLOCK_M, BLOCK_K // GROUP, GROUP)) * inner[:, :, None], (BLOCK_M, BLOCK_K)
        )
    return values


@triton.jit
def _activation_outer(amax_ptr, b, rows, R, MAX_NORMAL: tl.constexpr, SCALING: tl.constexpr,
                      GRANULARITY: tl.constexpr, SCALE_MODE: tl.constexpr, POW2: tl.constexpr):
    """The activations' outer factor per row (X_SPLIT): nvfp4's g, or the absmax decode scale of the
    tensor or of the row (as ``_group_scales`` derives them from the amax pre-pass)."""
    if SCALING == NVFP4:
        outer = nm.nvfp4_global_scale(nm.bits_float(tl.load(amax_ptr + tl.zeros_like(rows))), SCALE_MODE)
    else:
        index = b.to(tl.int64) * R + rows if GRANULARITY == CHANNEL else tl.zeros_like(rows)
        encode = nm.absmax_encode(
            nm.bits_float(tl.load(amax_ptr + index, mask=rows < R, other=0)), MAX_NORMAL, POW2
        )
        outer = nm.div_rn(nm.filled(encode, 1.0), encode)
    return outer


@triton.autotune(
    configs=matmul_configs(),
    # The constexprs that decide which tiles are valid (prune_matmul) are part of the key, so a tile
    # tuned for one activation format is never reused for another of the same shape. The sizes are
    # keyed by their buckets (tuning.size_bucket): M changes with every token count.
    key=[
        "M_BUCKET", "N_BUCKET", "K_BUCKET", "QUANTIZE_X", "X_GRANULARITY", "X_GROUP", "W_SCALING", "W_GROUP",
        "X_SPLIT", "DOT_BF16", "DOT_SCALED",
    ],
    prune_configs_by={"early_config_prune": prune_matmul},
)
@triton.jit(do_not_specialize=["M_BUCKET", "N_BUCKET", "K_BUCKET"])
def _weight_matmul_kernel(
    x_ptr, w_ptr, w_scales_ptr, w_tensor_scale_ptr, bias_ptr, out_ptr, amax_ptr, seed_ptr,
    M, N, K, R, RP, XP, KP, M_BUCKET, N_BUCKET, K_BUCKET, stride_xb, stride_xr, stride_xk,
    W_EBITS: tl.constexpr, W_MBITS: tl.constexpr, W_EMIN: tl.constexpr, W_HAS_INF: tl.constexpr,
    W_HAS_NAN: tl.constexpr, W_IS_INT: tl.constexpr, W_PACKED: tl.constexpr, W_SCALING: tl.constexpr,
    W_GRANULARITY: tl.constexpr, W_GROUP: tl.constexpr, W_POW2: tl.constexpr,
    QUANTIZE_X: tl.constexpr, X_EBITS: tl.constexpr, X_MBITS: tl.constexpr, X_EMIN: tl.constexpr,
    X_EMAX: tl.constexpr, X_MAX_NORMAL: tl.constexpr, X_HAS_INF: tl.constexpr, X_HAS_NAN: tl.constexpr,
    X_IS_INT: tl.constexpr, X_PACKED: tl.constexpr, X_SCALING: tl.constexpr, X_GRANULARITY: tl.constexpr,
    X_GROUP: tl.constexpr, X_SCALE_MODE: tl.constexpr, X_POW2: tl.constexpr, X_ROUNDING: tl.constexpr,
    X_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_BF16: tl.constexpr, UPCAST_BF16: tl.constexpr,
    DOT_SCALED: tl.constexpr, X_FORMAT: tl.constexpr,
    W_FORMAT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``out [B*R, N] = Q(x) · dequant(W)ᵀ (+ bias)`` for x read as ``[B, R, K]`` through its strides.

    The kernel's rows are the ``M = B * RP`` rows of x with each batch entry's R rows padded to RP
    (a multiple of 16 for 16x16 activation tiles, else R): row m is x[m // RP, m % RP], a padding
    row when ``m % RP >= R``. W's codes are ``[N, KP (/2)]`` with KP its padded K; XP is the
    activations' padded K (their element numbering, for stochastic rounding).

    Activations quantized on the fly are, by default, ``qpass.fake_quantize``'s values cast to x's
    dtype. With X_SPLIT (fp32 x, whose fake-quantized values stay fp32, and an activation scale that
    splits) they are element values times their inner scale, with the outer factor per row applied
    after the loop like the weight's: the same products up to fp32 rounding, and bf16-exact.

    Dot precision: bf16 operands when DOT_BF16 (every weight element times its inner scale is a
    bf16 value, and so is every activation: x is bf16, or split as above), whose products are exact
    in the fp32 accumulator. Otherwise an IEEE fp32 dot: fp32 x has 24-bit significands that tf32
    (11 bits) or bf16 (8) would round, an error far above fp32 accumulation's; fp16 x would lose 3
    bits in bf16, and fp16 operands cannot hold MX-scaled weights (2^-127..2^127); an arbitrary fp32
    absmax block scale makes 24-bit weights. (fp16 x times weights of <= 11 significant bits would be
    exact in tf32: a possible faster path, not taken.)
    """
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    # A K tile holds whole activation scaling blocks whatever the tile the autotuner hands over (the
    # interpreter's single config is never pruned), and 16x16 tiles need whole 16-row groups.
    TILE_K: tl.constexpr = X_GROUP if QUANTIZE_X and X_GRANULARITY >= BLOCK and X_GROUP > BLOCK_K else BLOCK_K
    TILE_M: tl.constexpr = 16 if QUANTIZE_X and X_GRANULARITY == TILE and BLOCK_M < 16 else BLOCK_M
    m = pid_m * TILE_M + tl.arange(0, TILE_M)
    b = m // RP
    rows = tl.where(m < M, m % RP, R)  # R: outside x (masked)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    seed = _load_seed(seed_ptr, X_ROUNDING)  # X_ROUNDING is 0 (rne) without an input quantizer
    acc = tl.zeros((TILE_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, TILE_K):
        cols = k0 + tl.arange(0, TILE_K)
        x = _load_tile(
            x_ptr, b[:, None], rows, cols, R, K, stride_xb, stride_xr, stride_xk, x_ptr, 1.0, 0, TILE_M,
            TILE_K,
        )
        if DOT_SCALED:  # MX codes and E8M0 scales of both operands straight to the MX tensor cores
            values, decode, stored = _quantize_tile(
                x, amax_ptr, seed, b, rows, cols, R, XP, X_EBITS, X_MBITS, X_EMIN, X_EMAX, X_MAX_NORMAL,
                X_HAS_INF, X_HAS_NAN, X_IS_INT, X_SCALING, X_GRANULARITY, X_GROUP, X_SCALE_MODE, X_POW2,
                X_ROUNDING, TILE_M, TILE_K,
            )
            codes = nm.encode_element(values, X_EBITS, X_MBITS, X_EMIN, X_HAS_INF, X_HAS_NAN, X_IS_INT)
            if X_PACKED:
                low, high = tl.split(tl.reshape(codes, (TILE_M, TILE_K // 2, 2)))
                a = (low | (high << 4)).to(tl.uint8)
            else:
                a = _as_fp8(codes.to(tl.uint8), X_FORMAT)
            w = _weight_codes(w_ptr, n, k0, N, KP, W_PACKED, BLOCK_N, TILE_K)
            if not W_PACKED:
                w = _as_fp8(w, W_FORMAT)
            w_scales = _weight_scale_codes(w_scales_ptr, n, k0, N, KP, W_GROUP, BLOCK_N, TILE_K // W_GROUP)
            acc = tl.dot_scaled(
                a, stored.to(tl.uint8), X_FORMAT, tl.trans(w), w_scales.to(tl.uint8), W_FORMAT, acc
            )
        else:
            if QUANTIZE_X:
                values, decode, stored = _quantize_tile(
                    x, amax_ptr, seed, b, rows, cols, R, XP, X_EBITS, X_MBITS, X_EMIN, X_EMAX, X_MAX_NORMAL,
                    X_HAS_INF, X_HAS_NAN, X_IS_INT, X_SCALING, X_GRANULARITY, X_GROUP, X_SCALE_MODE, X_POW2,
                    X_ROUNDING, TILE_M, TILE_K,
                )
                if X_SPLIT:
                    x = _activation_inner(
                        values, decode, stored, X_SCALING, X_GRANULARITY, X_GROUP, TILE_M, TILE_K
                    )
                else:  # fake quantization, back in x's dtype as qpass.fake_quantize returns it
                    X_GROUP_LEN: tl.constexpr = X_GROUP if X_GRANULARITY >= BLOCK else TILE_K
                    x = tl.reshape(
                        tl.reshape(values, (TILE_M, TILE_K // X_GROUP_LEN, X_GROUP_LEN)) * decode[:, :, None],
                        (TILE_M, TILE_K),
                    )
                    x = nm.cast_rn(x, x_ptr.dtype.element_ty)  # RNE to bf16 also under the interpreter
            w = _weight_tile(
                w_ptr, w_scales_ptr, n, k0, N, KP, W_EBITS, W_MBITS, W_EMIN, W_HAS_INF, W_HAS_NAN, W_IS_INT,
                W_PACKED, W_SCALING, W_GRANULARITY, W_GROUP, BLOCK_N, TILE_K,
            )
            if DOT_BF16:  # exact values: the conversions do not round
                x, w = x.to(tl.bfloat16), w.to(tl.bfloat16)
                if UPCAST_BF16:  # the interpreter's tl.dot multiplies bf16's uint16 storage as integers
                    x, w = nm.to_float32(x), nm.to_float32(w)  # exact: the same products
                acc = tl.dot(x, tl.trans(w), acc)
            else:
                acc = tl.dot(nm.to_float32(x), tl.trans(w), acc, input_precision="ieee")
    # The outer factors, once per output.
    if W_SCALING == ABSMAX and W_GRANULARITY == TENSOR:
        acc = acc * tl.load(w_scales_ptr)
    elif W_SCALING == ABSMAX and W_GRANULARITY == CHANNEL:
        acc = acc * tl.load(w_scales_ptr + n, mask=n < N, other=1.0)[None, :]
    elif W_SCALING == NVFP4:
        acc = acc * tl.load(w_tensor_scale_ptr)
    if X_SPLIT and (X_SCALING == NVFP4 or X_GRANULARITY < BLOCK):
        acc = acc * _activation_outer(
            amax_ptr, b, rows, R, X_MAX_NORMAL, X_SCALING, X_GRANULARITY, X_SCALE_MODE, X_POW2
        )[:, None]
    if HAS_BIAS:
        acc = acc + nm.to_float32(tl.load(bias_ptr + n, mask=n < N, other=0.0))[None, :]
    out_rows = (b * R + rows).to(tl.int64)
    tl.store(out_ptr + out_rows[:, None] * N + n[None, :], nm.cast_rn(acc, out_ptr.dtype.element_ty),
             mask=(rows[:, None] < R) & (n[None, :] < N))


@triton.jit
def _as_fp8(codes, FORMAT: tl.constexpr):
    """uint8 codes viewed as the fp8 type ``tl.dot_scaled`` reads for ``FORMAT``."""
    if FORMAT == "e4m3":
        result = codes.to(tl.float8e4nv, bitcast=True)
    else:
        result = codes.to(tl.float8e5, bitcast=True)
    return result


# ---- launcher ------------------------------------------------------------------------------------


def _check_arguments(
    x: torch.Tensor, weight: QTensor, bias: torch.Tensor | None, input_quantizer, out_dtype
) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(weight, QTensor):
        raise TypeError(
            f"weight must be a qpass.QTensor (qpass.quantize(w, fmt, axis=-1)), got {type(weight).__name__}"
        )
    if len(weight.shape) != 2 or weight.axis != 1:
        raise ValueError(
            "weight must be a 2-D [N, K] weight quantized along K (axis 1); "
            f"got shape {tuple(weight.shape)}, axis {weight.axis}"
        )
    padded = weight.format.padded_length(weight.shape[1])
    codes_shape = (weight.shape[0], padded // 2 if weight.format.element.bits == 4 else padded)
    if tuple(weight.codes.shape) != codes_shape or weight.codes.dtype != torch.uint8:
        raise ValueError(f"weight codes must be uint8 {codes_shape} for {weight.format.name} [N, K] = "
                         f"{list(weight.shape)}; got {weight.codes.dtype} {tuple(weight.codes.shape)}")
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"x of dtype {x.dtype}: the kernel takes {', '.join(str(d) for d in KERNEL_DTYPES)}")
    if x.ndim == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x {tuple(x.shape)} does not match the weight's K = {weight.shape[1]} (x must be [..., K])"
        )
    if weight.codes.device != x.device:
        raise ValueError(f"x is on {x.device} but the weight's codes are on {weight.codes.device}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if input_quantizer is not None:
        if not isinstance(input_quantizer, Quantizer):
            raise TypeError(
                f"input_quantizer must be a qpass.Quantizer or None, got {type(input_quantizer).__name__}"
            )
        reason = unsupported(input_quantizer, None, x.dtype)
        if reason is not None:
            raise ValueError(f"no kernel quantizes the input with {input_quantizer}: {reason}")
        if input_quantizer.spec.granularity == "tile" and x.ndim < 2:
            raise ValueError(
                f"{input_quantizer} quantizes 16x16 tiles of x's last two dims: x must have 2 or more, "
                f"got shape {tuple(x.shape)}"
            )
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise TypeError(f"out_dtype must be a floating-point torch.dtype or None, got {out_dtype!r}")


def dot_scaled_unsupported(
    x_dtype: torch.dtype, weight: KernelSpec, activations: KernelSpec | None
) -> str | None:
    """Why the ``tl.dot_scaled`` path cannot run this product, or None when it can."""
    def mx_format(spec):
        return spec.scaling == "mx" and (spec.EBITS, spec.MBITS) in DOT_SCALED_FORMATS and not spec.IS_INT

    if not mx_format(weight):
        return "it takes MXFP4 and MXFP8 (e4m3, e5m2) weights"
    if activations is None or not mx_format(activations):
        return "it takes activations quantized on the fly to MXFP4 or MXFP8 (e4m3, e5m2)"
    if x_dtype not in (torch.bfloat16, torch.float32):
        # fake_quantize's result in fp16 can overflow or flush where the MX values do not.
        return f"it takes bf16 or fp32 x, not {x_dtype}"
    return None


def _splits(spec: KernelSpec) -> bool:
    """Whether the format's scale splits into a bf16-exact inner part and an outer factor: all but
    absmax blocks with arbitrary fp32 scales."""
    return not (spec.scaling == "absmax" and spec.granularity == "block" and not spec.POW2)


def _native_mx(device: torch.device) -> bool:
    """A GPU with MX tensor cores (NVIDIA compute capability 10 or more: Blackwell)."""
    return (
        not INTERPRETING and device.type == "cuda" and torch.version.hip is None
        and torch.cuda.get_device_capability(device)[0] >= 10
    )


def weight_matmul(
    x: Tensor, weight: QTensor, bias: Tensor | None = None,
    input_quantizer: Quantizer | None = None, out_dtype: torch.dtype | None = None, *,
    seed: int | None = None, dot_scaled: bool | None = None,
) -> Tensor:
    """``y = Q(x) · dequant(weight)ᵀ (+ bias)``, ``[..., N]`` for x ``[..., K]``, in ``out_dtype``
    (default x's dtype), accumulated in fp32 with the bias added in fp32 before the cast.

    ``weight``: a QTensor of W ``[N, K]`` quantized along K (axis 1), any format the kernels take.
    ``input_quantizer``: None to use x as it is, or a :class:`qpass.Quantizer` that fake-quantizes
    x along K inside the kernel (the same values as ``input_quantizer(x, -1)``); ``seed`` seeds its
    stochastic rounding (default: drawn from the generator of x's device). ``dot_scaled``: None
    (default) takes the ``tl.dot_scaled`` path where it is native (MXFP4/MXFP8 weights and
    activations on a compute capability >= 10 GPU), True forces it (an error where the formats do
    not allow it), False never takes it.
    """
    _check_arguments(x, weight, bias, input_quantizer, out_dtype)
    w_spec = kernel_spec(weight.format)
    x_spec = (
        kernel_spec(input_quantizer.spec, input_quantizer.rounding) if input_quantizer is not None else None
    )
    reason = dot_scaled_unsupported(x.dtype, w_spec, x_spec)
    if dot_scaled and reason is not None:
        raise ValueError(f"dot_scaled=True: {reason}")
    use_dot_scaled = (
        reason is None if dot_scaled else (dot_scaled is None and reason is None and _native_mx(x.device))
    )
    return torch.ops.qpass_codegen.weight_matmul(  # forward only: detached, the op has no autograd
        x.detach(), weight.codes, weight.scales, weight.tensor_scale, None if bias is None else bias.detach(),
        w_spec.to_json(),
        x_spec.to_json() if x_spec is not None else "",
        x.dtype if out_dtype is None else out_dtype,
        draw_seed(input_quantizer.rounding, seed, x.device) if input_quantizer is not None else None,
        use_dot_scaled,
    )


@triton_op("qpass_codegen::weight_matmul", mutates_args=())
def _weight_matmul_op(
    x: Tensor, codes: Tensor, scales: Tensor, tensor_scale: Tensor | None, bias: Tensor | None,
    weight_spec: str, input_spec: str, out_dtype: torch.dtype, seed: Tensor | None, dot_scaled: bool,
) -> Tensor:
    """:func:`weight_matmul` on W's codes ``[N, KP (/2)]`` and scales, its kernel spec and the input
    quantizer's (JSON, "" for none); ``dot_scaled``: take the ``tl.dot_scaled`` path."""
    w_spec = KernelSpec.from_json(weight_spec)
    x_spec = KernelSpec.from_json(input_spec) if input_spec else None
    n_out, k = codes.shape[0], x.shape[-1]
    out = torch.empty(*x.shape[:-1], n_out, dtype=out_dtype, device=x.device)
    if out.numel() == 0:
        return out
    x3 = _as_3d(x)
    batches, rows = x3.shape[0], x3.shape[1]
    padded_rows = -(-rows // 16) * 16 if x_spec is not None and x_spec.granularity == "tile" else rows
    kp = w_spec.padded_length(k)
    xp = x_spec.padded_length(k) if x_spec is not None else k

    w_constexprs = {f"W_{name}": getattr(w_spec, name) for name in WEIGHT_CONSTEXPRS}
    # Without an input quantizer the activation constexprs are placeholders (never read).
    x_constexprs = {
        f"X_{name}": getattr(x_spec, name) if x_spec is not None else 0 for name in ACTIVATION_CONSTEXPRS
    }
    inner_exact = _splits(w_spec)
    # fp32 activations split into bf16-exact values and outer factors, where the weights also make
    # a bf16 dot possible (otherwise they stay fake_quantize's fp32 values, for an fp32 dot).
    x_split = x.dtype == torch.float32 and x_spec is not None and _splits(x_spec) and inner_exact
    if tensor_scale is None:
        tensor_scale = scales.new_ones((), dtype=torch.float32)
    m = batches * padded_rows

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n_out, meta["BLOCK_N"]))

    with on_device(x.device):
        amax = (
            launch_amax(x3, x_spec, None) if x_spec is not None
            else torch.zeros(1, dtype=torch.int32, device=x.device)
        )
        wrap_triton(_weight_matmul_kernel)[grid](
            x3, codes.contiguous(), scales.contiguous(), tensor_scale.float().contiguous(),
            bias.contiguous() if bias is not None else None, out, amax, seed,
            m, n_out, k, rows, padded_rows, xp, kp, size_bucket(m), size_bucket(n_out), size_bucket(k),
            *x3.stride(), **w_constexprs, QUANTIZE_X=x_spec is not None, **x_constexprs,
            X_SPLIT=x_split and not dot_scaled, HAS_BIAS=bias is not None,
            DOT_BF16=inner_exact and (x.dtype == torch.bfloat16 or x_split), UPCAST_BF16=INTERPRETING,
            DOT_SCALED=dot_scaled,
            X_FORMAT=DOT_SCALED_FORMATS.get((x_spec.EBITS, x_spec.MBITS), "") if dot_scaled else "",
            W_FORMAT=DOT_SCALED_FORMATS.get((w_spec.EBITS, w_spec.MBITS), "") if dot_scaled else "",
        )
    return out
