"""Outlier clamping and compensation (OCC) and its ops, the activation-side numerics of FP4
training (arXiv 2501.17116).

An absmax-scaled FP4 row spends its whole range on its largest element: a few outliers leave the
rest of the row with a bit or two. OCC clamps each row (along the last axis, a token's features) to
its quantiles, so the clamped part ``X_c`` quantizes well, and carries what the clamp removed, the
sparse residual ``X_r = X - X_c`` (about ``2 (1 - alpha)`` of the entries), in high precision:
``X · W ≈ Q(X_c) · Q(W) + X_r · W``. The paper clamps at ``alpha = 0.99``.

``outlier_bounds``                the per-row clamp bounds, statistics without gradient.
``clamp_outliers``                ``(X_c, X_r)``, with ``X_c + X_r == X`` bit for bit (through the
                                  custom op ``qpass::clamp_outliers``, opaque to compilers).
``qpass::residual_matmul``        ``X_r · W`` for a mostly-zero ``X_r``, sparse where that is
                                  cheaper, with a backward that uses the residual's sparsity.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


def _quantile(x: Tensor, q: float) -> Tensor:
    """``torch.quantile(x, q, dim=-1, keepdim=True)`` (linear interpolation), bit for bit.

    The rank and weight arithmetic is ATen's ``quantile_compute``: the rank ``q · (K - 1)`` in x's
    dtype, the weight its fraction, ``torch.lerp`` between the two neighbouring order statistics.
    Those come from a partial sort (``topk``) of the tail that holds them instead of a full sort;
    order statistics are exact values, so any selection gives the same bits.
    """
    k = x.shape[-1]
    # torch.quantile refuses K > 2**24, beyond which fp32 cannot hold the rank exactly: use fp64 there.
    rank = torch.tensor(q, dtype=x.dtype if k <= 2**24 else torch.float64) * (k - 1)
    below, above = int(rank.floor()), int(rank.ceil())
    if q > 0.5:  # the top K - below values, descending: ranks `below` and `above` end the list
        top = x.topk(k - below, dim=-1).values
        low, high = top[..., -1:], top[..., k - 1 - above : k - above]
    else:  # the bottom above + 1 values, ascending
        bottom = x.topk(above + 1, dim=-1, largest=False).values
        low, high = bottom[..., below : below + 1], bottom[..., above:]
    # A weight tensor of the output's shape, as ATen's: lerp's scalar-weight kernel may round otherwise.
    return torch.lerp(low, high, (rank - below).to(x.dtype).expand_as(low))


def _check_alpha(alpha: float) -> None:
    if not 0.5 < alpha <= 1:
        raise ValueError(f"alpha must be in (0.5, 1] (the upper quantile; 1 clamps nothing), got {alpha}")


def outlier_bounds(x: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Per-row clamp bounds ``(lo, hi)`` along the last axis, shaped ``[..., 1]``, without gradient.

    ``lo = min(Q(1 - alpha), 0)`` and ``hi = max(Q(alpha), 0)``, where ``Q`` is ``torch.quantile``
    along the last axis with linear interpolation (bit for bit on finite rows, and without its limit
    of 2**24 elements per row). Bounding by zero makes the clamp only ever shrink magnitudes: the
    lower tail of an all-positive row is no outlier (clamping it would not lower the row's absmax),
    and the exact decomposition of :func:`clamp_outliers` relies on it. ``alpha = 1`` clamps nothing.

    Computed in fp32 (bf16 and fp16 upcast; fp64 stays fp64), like a quantization scale: a
    statistic, treated as a constant by autograd. On a row holding NaN the bounds may be NaN or not
    (torch.quantile's are NaN; ``topk`` orders NaN above every number): :func:`clamp_outliers`
    returns the NaN element non-finite either way.
    """
    _check_alpha(alpha)
    x = x.detach()
    x = x if x.dtype == torch.float64 else x.float()
    return _quantile(x, 1 - alpha).clamp(max=0), _quantile(x, alpha).clamp(min=0)


def clamp_outliers(x: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """``(clamped, residual)`` of x in x's dtype: x clamped to :func:`outlier_bounds`, and the rest.

    ``clamped + residual == x`` bit for bit for finite x (up to the sign of a zero: -0.0 comes back
    +0.0); ``residual`` is zero wherever ``lo <= x <= hi`` and ``clamped`` equals
    ``clamp(x, lo, hi)`` to within half an ulp of x where the clamp moved x. Gradient:
    ``d clamped / dx`` is 1 inside ``[lo, hi]`` (inclusive) and 0 outside, ``d residual / dx`` the
    opposite; the bounds are constants. A NaN or infinite element comes out non-finite in
    ``residual`` (``x - clamp(x)`` of it is never finite).
    """
    return torch.ops.qpass.clamp_outliers(x, alpha)


# A custom op rather than traceable torch code: a compiler that fuses ``x - clamp(x)`` with
# ``x - residual`` keeps the residual in fp32 between them (Inductor does, for bf16 and fp16 inputs),
# which breaks the exact decomposition; and Inductor's lerp need not round as ATen's does.
@torch.library.custom_op("qpass::clamp_outliers", mutates_args=())
def _clamp_outliers(x: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    # Bounds rounded to x's dtype, so that the clamp picks x or a bound, both in x's dtype, as the
    # exact decomposition needs. A rounded bound stays between the two order statistics that it
    # interpolates (both in x's dtype), so it clamps the same elements, or spares the one it landed on.
    x = x.contiguous()
    lo, hi = (bound.to(x.dtype) for bound in outlier_bounds(x, alpha))
    residual = x - x.clamp(lo, hi)
    # x - residual is exact wherever the clamp moved x: x and its bound share a sign with
    # |bound| < |x|, so either x - bound is exact (|bound| >= |x|/2, Sterbenz) and x - residual is
    # the bound, or the residual rounds to within [x/2, x] and x - residual is exact (Sterbenz again).
    return x - residual, residual


@_clamp_outliers.register_fake
def _(x, alpha):
    _check_alpha(alpha)
    return x.new_empty(x.shape), x.new_empty(x.shape)


def _save_residual(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _clamp_outliers_backward(ctx, grad_clamped, grad_residual):
    (residual,) = ctx.saved_tensors
    # x - clamp(x) == 0 exactly where lo <= x <= hi (x - y == 0 only for x == y, subnormals kept)
    return torch.where(residual == 0, grad_clamped, grad_residual), None


_clamp_outliers.register_autograd(_clamp_outliers_backward, setup_context=_save_residual)


# ---- the compensation product ------------------------------------------------------------------

# Sparse (COO, conversions included) against dense torch.matmul on CPU, measured over M 256-8192,
# K and N 128-2048 and densities 0.5-10%: sparse wins up to about 5% for N >= 512, forward and
# backward, and up to about 2% for N = 128, by less on two threads than on one. One threshold at 5%
# costs 8% (one thread) to 12% (two) more in total than the best choice per shape. OCC's residual
# at alpha = 0.99 holds just over 2% (82 of 4096), which a threshold at 2% would miss.
SPARSE_MAX_DENSITY = 0.05


def _use_sparse(r: Tensor) -> bool:
    """Whether a product with r runs sparse. Only on CPU: no other device's sparse kernels were
    measured (there was no GPU where this was written), so elsewhere it stays dense."""
    return r.device.type == "cpu" and torch.count_nonzero(r).item() <= SPARSE_MAX_DENSITY * r.numel()


def _operands(r: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """r as a matrix ``[M, K]`` and b, in the accumulation dtype: fp32, or fp64 if either is."""
    dtype = torch.promote_types(torch.promote_types(r.dtype, b.dtype), torch.float32)
    return r.flatten(0, -2).to(dtype), b.to(dtype)


@torch.library.custom_op("qpass::residual_matmul", mutates_args=())
def residual_matmul(r: Tensor, b: Tensor) -> Tensor:
    """OCC's compensation ``r · b`` for a mostly-zero residual ``r [..., M, K]`` and ``b [K, N]``.

    Accumulated in fp32 (fp64 if an operand is), returned in r's dtype; sparse on CPU where cheaper.

    Gradient contract: r's gradient is computed only on r's nonzeros, ``(grad · bᵀ) ⊙ (r ≠ 0)``,
    and is zero elsewhere. That is all OCC needs: its residual has zero gradient with respect to
    the input wherever it is zero (:func:`clamp_outliers`), so the rest of ``grad · bᵀ`` would be
    discarded anyway. Do not use this op where r's zeros need a gradient.
    """
    r2, b2 = _operands(r, b)
    out = torch.sparse.mm(r2.to_sparse(), b2) if _use_sparse(r2) else r2 @ b2
    return out.reshape(*r.shape[:-1], b.shape[-1]).to(r.dtype)


@residual_matmul.register_fake
def _(r, b):
    return r.new_empty((*r.shape[:-1], b.shape[-1]))


@torch.library.custom_op("qpass::residual_matmul_backward", mutates_args=())
def residual_matmul_backward(
    grad: Tensor, r: Tensor, b: Tensor, need_r: bool, need_b: bool
) -> tuple[Tensor, Tensor]:
    """``grad_r = (grad · bᵀ) ⊙ (r ≠ 0)`` and ``grad_b = rᵀ · grad`` (r's leading dimensions as M).

    Gradients not needed come back empty.
    """
    r2, b2 = _operands(r, b)
    grad2 = grad.flatten(0, -2).to(r2.dtype)
    grad_r = grad_b = grad.new_empty(0)
    if _use_sparse(r2):
        coo = r2.to_sparse()
        if need_r:
            # Sampled at r's nonzeros with weight 1, so that r's values (NaN included) stay out of it.
            with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state", of no use here
                warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
                csr = coo.to_sparse_csr()
            pattern = (csr.crow_indices(), csr.col_indices(), torch.ones_like(csr.values()), csr.shape)
            ones = torch.sparse_csr_tensor(*pattern, check_invariants=False)
            grad_r = torch.sparse.sampled_addmm(ones, grad2, b2.mT, beta=0).to_dense()
        if need_b:
            grad_b = torch.sparse.mm(coo.mT, grad2)
    else:
        if need_r:
            grad_r = torch.where(r2 != 0, grad2 @ b2.mT, 0)
        if need_b:
            grad_b = r2.mT @ grad2
    grad_r = grad_r.reshape(r.shape).to(r.dtype) if need_r else grad_r
    grad_b = grad_b.to(b.dtype).contiguous() if need_b else grad_b
    return grad_r, grad_b


@residual_matmul_backward.register_fake
def _(grad, r, b, need_r, need_b):
    empty = grad.new_empty(0)
    return (r.new_empty(r.shape) if need_r else empty), (b.new_empty(b.shape) if need_b else empty)


def _save_operands(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _residual_matmul_backward(ctx, grad):
    r, b = ctx.saved_tensors
    need_r, need_b = ctx.needs_input_grad
    grad_r, grad_b = torch.ops.qpass.residual_matmul_backward(grad, r, b, need_r, need_b)
    return (grad_r if need_r else None), (grad_b if need_b else None)


residual_matmul.register_autograd(_residual_matmul_backward, setup_context=_save_operands)
