"""A scaled GEMM of two :class:`~qpass.gemm_operand.GemmOperand` s by a Triton kernel that dequantizes
in registers: for the operand formats no torch scaled matmul takes (MX fp8 and fp4 below sm100, fp6,
MX int8, NVFP4 where cuBLAS has no block-scaled kernel, absmax blocks, and any mix of two formats).

``out = Σ_k dequant(a)[..., m, k] · dequant(b)[..., n, k] (+ bias)`` (SPEC section 9): each program
loads a ``[BLOCK_M, BLOCK_K]`` tile of a's codes and a ``[BLOCK_N, BLOCK_K]`` one of b's, decodes the
codes and their scales to fp32 (the same fp32 products as :meth:`GemmOperand.dequantize`: element
value times decode scale, NVFP4's ``s_b * g`` first), and multiplies them with an IEEE fp32 ``tl.dot``
(no tf32) into an fp32 accumulator; the bias is added in fp32, then the result is cast. So it equals
``a.dequantize() @ b.dequantize().mT`` up to the order of the fp32 summation. A K tile spans whole
scaling blocks of both operands, so each block's scale is loaded once per tile.

This is a reference-speed kernel for correctness on any format, not a tensor-core-speed one: every
element is decoded to fp32 and the dot runs in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qpass.codegen import numerics as nm
from qpass.codegen.spec import kernel_spec
from qpass.gemm_operand import GemmOperand

# spec.GRANULARITIES and spec.SCALINGS indices, as tl.constexpr objects: the kernel reads them, and
# Triton's compiler reads no other globals (plain ints pass in the interpreter, fail on a GPU).
TENSOR, CHANNEL, BLOCK = (tl.constexpr(i) for i in range(3))  # blocks and NVFP4's tiles: >= BLOCK
ABSMAX, MX, NVFP4 = (tl.constexpr(i) for i in range(3))
BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 64  # host only: launch arguments (the kernel's own are parameters)
OPERAND_CONSTEXPRS = (
    "EBITS", "MBITS", "EMIN", "HAS_INF", "HAS_NAN", "IS_INT", "PACKED", "SCALING", "GRANULARITY", "GROUP",
)
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _dequantized_tile(
    codes_ptr, scales_ptr, g_ptr, batch, rows, k0, R, KP, K, EBITS: tl.constexpr, MBITS: tl.constexpr,
    EMIN: tl.constexpr, HAS_INF: tl.constexpr, HAS_NAN: tl.constexpr, IS_INT: tl.constexpr,
    PACKED: tl.constexpr, SCALING: tl.constexpr, GRANULARITY: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The operand's fp32 values at ``rows`` and K columns ``k0 .. k0 + BLOCK_K``: zero beyond R and
    beyond K, whatever the padding's scale (dequantize drops the padding; a zero code times a NaN
    block scale is not zero). Codes ``[B * R, KP]`` (fp4: ``KP / 2`` bytes, element 2i in the low
    nibble), scales as GemmOperand lays them out."""
    row = (batch * R + rows[:, None]).to(tl.int64)
    in_rows = rows[:, None] < R
    cols = k0 + tl.arange(0, BLOCK_K)
    if PACKED:
        byte_cols = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(codes_ptr + row * (KP // 2) + byte_cols[None, :],
                         mask=in_rows & (byte_cols[None, :] < KP // 2), other=0).to(tl.int32)
        codes = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_R, BLOCK_K))
    else:
        codes = tl.load(codes_ptr + row * KP + cols[None, :], mask=in_rows & (cols[None, :] < KP), other=0)
        codes = codes.to(tl.int32)
    values = nm.decode_element(codes, EBITS, MBITS, EMIN, HAS_INF, HAS_NAN, IS_INT)
    if GRANULARITY >= BLOCK:  # blocks (and NVFP4's tiles, stored per block row): one scale per GROUP columns
        GROUPS: tl.constexpr = BLOCK_K // GROUP
        groups = k0 // GROUP + tl.arange(0, GROUPS)
        stored = tl.load(scales_ptr + row * (KP // GROUP) + groups[None, :],
                         mask=in_rows & (groups[None, :] < KP // GROUP), other=0)
        if SCALING == MX:
            decode = nm.e8m0_value(stored.to(tl.int32), False)
        elif SCALING == NVFP4:
            decode = nm.decode_element(stored.to(tl.int32), 4, 3, -6, False, True, False) * tl.load(g_ptr)
        else:
            decode = stored
        values = tl.reshape(values, (BLOCK_R, GROUPS, GROUP)) * decode[:, :, None]
        values = tl.reshape(values, (BLOCK_R, BLOCK_K))
    elif GRANULARITY == CHANNEL:
        values = values * tl.load(scales_ptr + batch * R + rows, mask=rows < R, other=1.0)[:, None]
    else:
        values = values * tl.load(scales_ptr)
    return tl.where(in_rows & (cols[None, :] < K), values, 0.0)


@triton.jit
def _scaled_gemm_kernel(
    a_codes, a_scales, a_g, b_codes, b_scales, b_g, bias_ptr, out_ptr, M, N, K, AKP, BKP,
    HAS_BIAS: tl.constexpr,
    A_EBITS: tl.constexpr, A_MBITS: tl.constexpr, A_EMIN: tl.constexpr, A_HAS_INF: tl.constexpr,
    A_HAS_NAN: tl.constexpr, A_IS_INT: tl.constexpr, A_PACKED: tl.constexpr, A_SCALING: tl.constexpr,
    A_GRANULARITY: tl.constexpr, A_GROUP: tl.constexpr,
    B_EBITS: tl.constexpr, B_MBITS: tl.constexpr, B_EMIN: tl.constexpr, B_HAS_INF: tl.constexpr,
    B_HAS_NAN: tl.constexpr, B_IS_INT: tl.constexpr, B_PACKED: tl.constexpr, B_SCALING: tl.constexpr,
    B_GRANULARITY: tl.constexpr, B_GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``out [B, M, N] = a [B, M, K] · b [B, N, K]ᵀ (+ bias [N])``; AKP, BKP: the codes' padded K."""
    pid_m, pid_n, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = _dequantized_tile(
            a_codes, a_scales, a_g, batch, m, k0, M, AKP, K, A_EBITS, A_MBITS, A_EMIN, A_HAS_INF, A_HAS_NAN,
            A_IS_INT, A_PACKED, A_SCALING, A_GRANULARITY, A_GROUP, BLOCK_M, BLOCK_K,
        )
        b = _dequantized_tile(
            b_codes, b_scales, b_g, batch, n, k0, N, BKP, K, B_EBITS, B_MBITS, B_EMIN, B_HAS_INF, B_HAS_NAN,
            B_IS_INT, B_PACKED, B_SCALING, B_GRANULARITY, B_GROUP, BLOCK_N, BLOCK_K,
        )
        acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + n, mask=n < N, other=0.0)[None, :]
    offsets = (batch * M + m[:, None]).to(tl.int64) * N + n[None, :]
    tl.store(out_ptr + offsets, nm.cast_rn(acc, out_ptr.dtype.element_ty),
             mask=(m[:, None] < M) & (n[None, :] < N))


# ---- launcher ------------------------------------------------------------------------------------


def _expected_scales_shape(op: GemmOperand) -> tuple[int, ...]:
    spec = op.quantizer.spec
    lead = tuple(op.codes.shape[:-1])
    if spec.blocked:
        return (*lead, spec.padded_length(op.length) // spec.block_size)
    return (*lead, 1) if spec.granularity == "channel" else ()


def _check_operand(op: GemmOperand, name: str) -> None:
    spec = op.quantizer.spec
    if op.codes.ndim < 2:
        raise ValueError(f"{name}: codes must be [..., R, K'], got shape {tuple(op.codes.shape)}")
    padded = spec.padded_length(op.length)
    expected_k = padded // 2 if spec.element.bits == 4 else padded
    if op.codes.shape[-1] != expected_k:
        raise ValueError(f"{name}: {spec.name} codes of K = {op.length} have {expected_k} columns, "
                         f"not {op.codes.shape[-1]}")
    if tuple(op.scales.shape) != _expected_scales_shape(op):
        raise ValueError(
            f"{name}: {spec.name} scales shaped {tuple(op.scales.shape)}, expected "
            f"{_expected_scales_shape(op)} (swizzled scales are for torch's block-scaled GEMMs)"
        )
    if spec.scaling == "nvfp4" and op.global_scale is None:
        raise ValueError(f"{name}: an nvfp4 operand needs its global_scale")


def _flat(op: GemmOperand) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes as uint8 ``[rows, K']`` (all leading dims' rows), scales and the global scale, contiguous."""
    codes = op.codes.contiguous().view(torch.uint8)
    g = op.global_scale if op.global_scale is not None else op.scales.new_ones((), dtype=torch.float32)
    return codes.reshape(-1, codes.shape[-1]), op.scales.contiguous(), g.float().reshape(()).contiguous()


def _constexprs(op: GemmOperand, prefix: str) -> dict:
    spec = kernel_spec(op.quantizer.spec)
    return {prefix + name: getattr(spec, name) for name in OPERAND_CONSTEXPRS}


def scaled_gemm(
    a: GemmOperand, b: GemmOperand, out_dtype: torch.dtype, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``a [..., M, K'] · b [..., N, K']ᵀ (+ bias [N])`` as ``out_dtype [..., M, N]``, dequantized in
    registers, fp32 accumulation. ``b`` is 2-d (shared by all of a's leading dims) or has a's
    leading dims (a batched GEMM). Any formats GemmOperand holds, each side its own, with
    GemmOperand's scale layouts (not swizzled ones)."""
    for op, name in ((a, "a"), (b, "b")):
        _check_operand(op, name)
    if a.length != b.length:
        raise ValueError(f"a and b reduce over different lengths: {a.length} and {b.length}")
    lead = tuple(a.codes.shape[:-2])
    if b.codes.ndim > 2 and tuple(b.codes.shape[:-2]) != lead:
        raise ValueError(f"b's leading dims {tuple(b.codes.shape[:-2])} are neither none nor a's {lead}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype {out_dtype}: expected one of {', '.join(map(str, OUT_DTYPES))}")
    n = b.rows
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias shaped {tuple(bias.shape)}, expected ({n},)")
    # A 2-d b against a batch of a: one GEMM of all of a's rows (a's per-row scales stay per row).
    batch = torch.Size(lead).numel() if b.codes.ndim > 2 else 1
    m = a.codes.shape[:-1].numel() // batch
    device = a.codes.device
    out = torch.empty(batch, m, n, dtype=out_dtype, device=device)
    has_bias = bias is not None
    bias = (bias if has_bias else torch.zeros(1, device=device)).float().contiguous()
    block_k = max(BLOCK_K, kernel_spec(a.quantizer.spec).GROUP, kernel_spec(b.quantizer.spec).GROUP)
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N), batch)
    _scaled_gemm_kernel[grid](
        *_flat(a), *_flat(b), bias, out, m, n, a.length, a.quantizer.spec.padded_length(a.length),
        b.quantizer.spec.padded_length(b.length), HAS_BIAS=has_bias, **_constexprs(a, "A_"),
        **_constexprs(b, "B_"), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=block_k,
    )
    return out.reshape(*lead, a.rows, n)
