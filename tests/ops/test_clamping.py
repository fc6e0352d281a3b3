"""Outlier clamping and compensation (qpass.ops.clamping): bounds against torch.quantile, the exact
decomposition on adversarial rows, its gradient, and qpass::residual_matmul's two paths."""

import math
import random

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from qpass.ops import clamping
from qpass.ops.clamping import clamp_outliers, outlier_bounds


def reference_bounds(x, alpha):
    x = x if x.dtype == torch.float64 else x.float()
    lo = torch.quantile(x, 1 - alpha, dim=-1, keepdim=True)
    hi = torch.quantile(x, alpha, dim=-1, keepdim=True)
    return lo.clamp(max=0), hi.clamp(min=0)


def random_rows(rng, gen):
    """A random shape (K down to 1) and dtype, Gaussian at a random scale, sometimes full of ties."""
    dtype = rng.choice([torch.float32, torch.float64, torch.bfloat16, torch.float16])
    k = rng.choice([1, 2, 3, 5, 17, 100, 1000, 4097, rng.randint(1, 3000)])
    lead = rng.choice([(), (1,), (7,), (2, 33)])
    scale = 10 ** rng.uniform(-3, 3) if dtype == torch.float16 else 10 ** rng.uniform(-20, 20)
    x = torch.randn(*lead, k, generator=gen, dtype=torch.float64) * scale
    if rng.random() < 0.4:  # ties: few distinct values, some rows all positive or all negative
        x = (x / x.abs().max().clamp(min=1e-300) * rng.choice([1, 3, 8])).round() + rng.choice([0, 2, -2])
    return x.to(dtype)


def test_bounds_match_torch_quantile():
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    for _ in range(150):
        x = random_rows(rng, gen)
        alpha = rng.choice([1.0, 0.999, 0.99, 0.97, 0.75, 0.5 + 1e-9, rng.uniform(0.5, 1)])
        lo, hi = outlier_bounds(x, alpha)
        expected = reference_bounds(x, alpha)
        assert lo.dtype == hi.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
        assert lo.shape == hi.shape == (*x.shape[:-1], 1)
        assert torch.equal(lo, expected[0]) and torch.equal(hi, expected[1]), (x.shape, x.dtype, alpha)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bounds_beyond_torch_quantile_limit(dtype):
    # torch.quantile refuses rows longer than 2**24, where fp32 no longer holds every rank. The
    # quantile of a permutation of consecutive integers is its interpolated rank (minus the offset):
    # exactly in fp64, to fp32's ulp at 2**23 (1) in fp32.
    k, alpha = 2**24 + 3, 0.999
    x = ((torch.arange(k) * 7919) % k - k // 2).to(dtype)  # 7919 is prime to k: a permutation
    lo, hi = outlier_bounds(x, alpha)
    tolerance = 0 if dtype == torch.float64 else 1
    assert abs(lo.item() - ((1 - alpha) * (k - 1) - k // 2)) <= tolerance
    assert abs(hi.item() - (alpha * (k - 1) - k // 2)) <= tolerance


def test_bounds_are_constants():
    x = torch.randn(4, 64, requires_grad=True)
    assert not any(bound.requires_grad for bound in outlier_bounds(x, 0.9))


@pytest.mark.parametrize("alpha", [0.5, 0.2, 1.01, -0.99, math.nan])
def test_alpha_out_of_range(alpha):
    with pytest.raises(ValueError, match=r"alpha must be in \(0.5, 1\]"):
        clamp_outliers(torch.randn(2, 8), alpha)


def adversarial_rows(dtype):
    """Rows that stress the decomposition: outliers far beyond the bound, subnormals, one-signed
    rows (one bound is then 0), ties at the bound, constant rows, K = 1 and 2."""
    big = 6e4 if dtype == torch.float16 else 1e30
    tiny = torch.finfo(dtype).smallest_normal / 8  # subnormal
    gen = torch.Generator().manual_seed(1)
    k = 256
    rows = [
        torch.randn(k, generator=gen),
        torch.randn(k, generator=gen) * 1e-3,
        torch.rand(k, generator=gen) * 1e-3 + 1e-3,  # all positive
        -torch.rand(k, generator=gen) * 1e-3 - 1e-3,  # all negative
        torch.rand(k, generator=gen) * tiny * 4,  # subnormals and small normals
        torch.randint(-3, 4, (k,), generator=gen).float(),  # ties everywhere, at the bounds too
        torch.full((k,), 0.7),
        torch.linspace(-1, 1, k) ** 3,
    ]
    x = torch.stack(rows).double()
    x[:2, ::129] = big  # huge outliers (2 per row: alpha = 0.99 clamps 3) against bounds near 1, 1e-3
    x[1:3, 5::130] = -big
    x[2:4, 7::50] *= 1e5
    x = x.to(dtype)
    return [x, x[:, :1], x[:, :2], x[:, :9]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("alpha", [0.99, 0.9, 0.6, 1.0])
def test_decomposition_is_exact(dtype, alpha):
    eps = torch.finfo(dtype).eps
    for i, x in enumerate(adversarial_rows(dtype)):
        clamped, residual = clamp_outliers(x, alpha)
        assert clamped.dtype == residual.dtype == dtype
        # Bit for bit; a -0.0 input may come back +0.0 (x + 0.0 says the same of every float sum).
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
        assert torch.equal((clamped + residual).view(bits), (x + 0.0).view(bits))
        lo, hi = (bound.to(dtype) for bound in outlier_bounds(x, alpha))
        inside = (x >= lo) & (x <= hi)
        assert torch.equal(residual != 0, ~inside)
        assert torch.equal(clamped[inside], x[inside])
        # Outside, clamped is the bound up to the rounding of x - bound: half an ulp of x. The huge
        # outliers of the full rows make that rounding happen.
        error = (clamped.double() - x.clamp(lo, hi).double()).abs()
        assert (error <= x.double().abs() * eps / 2).all()
        assert (error > 0).any() or i > 0 or alpha == 1
        assert (clamped.double().abs() <= x.double().abs()).all()
        assert (clamped.double() * x.double() >= 0).all()
        if alpha == 1.0:
            assert not residual.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_is_the_mask(dtype):
    x = adversarial_rows(dtype)[0].requires_grad_()
    clamped, residual = clamp_outliers(x, 0.9)
    grad_clamped, grad_residual = torch.randn(2, *x.shape, dtype=dtype)
    torch.autograd.backward((clamped, residual), (grad_clamped, grad_residual))
    lo, hi = (bound.to(dtype) for bound in outlier_bounds(x, 0.9))
    inside = (x >= lo) & (x <= hi)
    assert 0 < inside.sum() < inside.numel()
    assert torch.equal(x.grad, torch.where(inside, grad_clamped, grad_residual))


@pytest.mark.parametrize("alpha", [0.99, 1.0])
def test_non_finite_rows_stay_non_finite(alpha):
    x = torch.randn(6, 300, generator=torch.Generator().manual_seed(2))
    bad = {(0, 3): math.nan, (1, 299): math.inf, (2, 0): -math.inf, (3, 7): math.inf, (3, 8): -math.inf}
    for index, value in bad.items():
        x[index] = value
    x[4] = math.nan  # a whole row
    clamped, residual = clamp_outliers(x, alpha)
    for index in [*bad, *((4, j) for j in range(300))]:
        assert not residual[index].isfinite() and not (clamped[index] + residual[index]).isfinite()
    assert torch.equal(clamp_outliers(x[5:], alpha)[1], residual[5:])  # rows stay independent


def test_residual_density():
    # Rows of distinct values, lo < 0 < hi: hi lies strictly between the order statistics of ranks
    # floor(alpha (K - 1)) and the next, so exactly c = K - 1 - floor(alpha (K - 1)) values lie
    # strictly above it (41 of 4096), and by symmetry as many strictly below lo. As
    # c = ceil((1 - alpha)(K - 1)), the density 2c/K is 2 (1 - alpha) within 2/K.
    k, alpha = 4096, 0.99
    x = torch.randn(64, k, generator=torch.Generator().manual_seed(3))
    residual = clamp_outliers(x, alpha)[1]
    per_side = k - 1 - math.floor(alpha * (k - 1))
    assert torch.equal((residual != 0).sum(-1), torch.full((64,), 2 * per_side))
    assert abs((residual != 0).float().mean().item() - 2 * (1 - alpha)) <= 2 / k


# ---- qpass::residual_matmul ----------------------------------------------------------------------


def exact_operands(m, k, n, density, dtype, seed=0):
    """Small integers times powers of two, few enough bits that every sum is exact in any order (in
    fp32; a bf16 result is then that exact sum rounded once)."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.randint(-8, 9, (2, m, k), generator=gen) * 2.0 ** torch.randint(-4, 4, (2, m, k), generator=gen)
    r = r * (torch.rand(2, m, k, generator=gen) < density)
    b = torch.randint(-8, 9, (k, n), generator=gen) * 2.0 ** torch.randint(-4, 4, (k, n), generator=gen)
    grad = torch.randint(-8, 9, (2, m, n), generator=gen).double()
    return r.to(dtype), b.to(dtype), grad.to(dtype)


def run_product(r, b, grad):
    r, b = r.clone().requires_grad_(), b.clone().requires_grad_()
    out = torch.ops.qpass.residual_matmul(r, b)
    out.backward(grad)
    return out, r.grad, b.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_sparse_and_dense_paths_agree(dtype, monkeypatch):
    r, b, grad = exact_operands(24, 64, 40, 0.05, dtype)
    results = {}
    for sparse in (True, False):
        monkeypatch.setattr(clamping, "_use_sparse", lambda r, sparse=sparse: sparse)
        results[sparse] = run_product(r, b, grad)
    rd, bd, gd = r.double(), b.double(), grad.double()
    expected = (rd @ bd, (gd @ bd.mT) * (rd != 0), (rd.flatten(0, 1).mT @ gd.flatten(0, 1)))
    for sparse_result, dense_result, exact in zip(results[True], results[False], expected):
        assert sparse_result.dtype == dense_result.dtype == dtype
        assert torch.equal(sparse_result, dense_result) and torch.equal(dense_result, exact.to(dtype))


def test_product_accumulates_in_fp32():
    gen = torch.Generator().manual_seed(4)
    r = (torch.randn(16, 512, generator=gen) * (torch.rand(16, 512, generator=gen) < 0.3)).bfloat16()
    b = torch.randn(512, 8, generator=gen).bfloat16()
    assert torch.equal(torch.ops.qpass.residual_matmul(r, b), (r.float() @ b.float()).bfloat16())


def test_sparse_rule():
    r = torch.zeros(64, 100)
    r[:, :5] = 1.0
    assert clamping._use_sparse(r)
    r[0, 5] = 1.0
    assert not clamping._use_sparse(r)


def test_opcheck_clamp_outliers():
    x = adversarial_rows(torch.float32)[0].requires_grad_()
    torch.library.opcheck(torch.ops.qpass.clamp_outliers.default, (x, 0.9))


@pytest.mark.parametrize("sparse", [True, False])
def test_opcheck_residual_matmul(sparse, monkeypatch):
    monkeypatch.setattr(clamping, "_use_sparse", lambda r: sparse)
    r, b, _ = exact_operands(8, 32, 16, 0.1, torch.float32)
    torch.library.opcheck(torch.ops.qpass.residual_matmul.default, (r.requires_grad_(), b.requires_grad_()))


def test_occ_linear_compiles_without_graph_break():
    def occ_linear(x, w):
        clamped, residual = clamp_outliers(x, 0.99)
        return clamped @ w.mT + torch.ops.qpass.residual_matmul(residual, w.mT)

    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(2, 8, 128, generator=gen), torch.randn(48, 128, generator=gen)
    assert clamping._use_sparse(clamp_outliers(x, 0.99)[1])  # 2 of 128 per row
    results = []
    counter = CompileCounterWithBackend("aot_eager")
    for fn in (occ_linear, torch.compile(occ_linear, backend=counter, fullgraph=True)):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xg, wg)
        y.square().sum().backward()
        results.append((y, xg.grad, wg.grad))
    assert counter.frame_count == 1
    for eager, compiled in zip(*results):
        assert torch.equal(compiled, eager)
