"""The test oracle: SPEC section 6 written out by hand with ``qpass.fake_quantize``.

Independent of qpass.ops: one autograd function per product ``A · B`` whose backward computes
``dA = Q(dY along N) · Q(B along N)ᵀ`` and ``dB = Q(A along M)ᵀ · Q(dY along M)`` in fp32. Each GEMM
multiplies row-major matrices: at small sizes an fp32 GEMM's rounding depends on its operands'
layout, and row-major is how the CPU's ``_scaled_mm`` (and so qpass) multiplies.
"""

from __future__ import annotations

import torch

from qpass import fake_quantize


def fq(x, spec, axis):
    """fp32 fake quantization of ``x`` along ``axis`` per ``spec`` (a dict of fake_quantize kwargs,
    or None)."""
    x = x.detach().float()
    return x if spec is None else fake_quantize(x, axis=axis, **spec)


class Spec6Product(torch.autograd.Function):
    """``A [..., M, K] · B [K, N]`` (or batched B) with per-GEMM specs: a, b, da_grad, da_b, db_grad, db_a."""

    @staticmethod
    def forward(ctx, a, b, specs):
        ctx.save_for_backward(a, b)
        ctx.specs = specs
        return (fq(a, specs["a"], -1) @ fq(b, specs["b"], -2)).to(a.dtype)

    @staticmethod
    def backward(ctx, dy):
        a, b = ctx.saved_tensors
        s = ctx.specs
        da = (fq(dy, s["da_grad"], -1) @ fq(b, s["da_b"], -1).mT.contiguous()).sum_to_size(a.shape)
        if b.ndim == 2:  # a weight shared by every row: M is all leading dimensions of A
            a, dy = a.reshape(-1, a.shape[-1]), dy.reshape(-1, dy.shape[-1])
        db = (fq(a, s["db_a"], -2).mT.contiguous() @ fq(dy, s["db_grad"], -2)).sum_to_size(b.shape)
        return da.to(a.dtype), db.to(b.dtype), None


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit for bit (NaN where NaN)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def adversarial(*shape, seed):
    """Gaussian with a zero block, a saturating outlier and tiny (fp32 subnormal) values."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    x[..., 0, :32] = 0.0
    x[..., 1, 3] = 3e4
    x[..., 2, 5:9] = 1e-40
    return x
