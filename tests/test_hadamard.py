"""qpass.hadamard: the Sylvester and Paley constructions, and the fast transform against the dense matrix."""

import math

import pytest
import torch

from qpass.hadamard import hadamard_matrix, hadamard_size_supported, hadamard_transform, random_signs

# Paley orders with the field each one uses: prime fields, GF(p^2) and GF(p^3), both constructions.
PALEY = {
    12: "I, q = 11", 20: "I, q = 19", 28: "I, q = 27 = 3^3", 36: "II, q = 17", 44: "I, q = 43",
    52: "II, q = 25 = 5^2", 76: "II, q = 37", 100: "II, q = 49 = 7^2", 108: "I, q = 107", 140: "I, q = 139",
    148: "II, q = 73",
    344: "I, q = 343 = 7^3",
}
# Common LLM widths: (n, the power of two, the Paley factor).
LLM_WIDTHS = [(11008, 32, 344), (13824, 128, 108), (14336, 512, 28), (28672, 1024, 28)]
OTHER_WIDTHS = [768, 1536, 2304, 3072, 3584, 4864, 5120, 6144, 8960, 12288, 18432, 18944]
UNSUPPORTED = [0, 3, 6, 10, 14, 50, 92, 172, 188]  # 92, 172, 188: no Paley field for any 2^a split


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_orthonormal_hadamard(h: torch.Tensor) -> None:
    n = h.shape[0]
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=h.dtype), rtol=0, atol=1e-12)
    torch.testing.assert_close(h.abs(), torch.full_like(h, 1 / math.sqrt(n)), rtol=0, atol=1e-15)


def block_diagonal(rotation: torch.Tensor, n: int) -> torch.Tensor:
    return torch.block_diag(*[rotation] * (n // rotation.shape[0]))


@pytest.mark.parametrize("n", [2**k for k in range(11)] + list(PALEY) + [40, 96, 768])
def test_dense_matrix_is_orthonormal_hadamard(n):
    h = hadamard_matrix(n)
    assert h.dtype == torch.float64 and h.shape == (n, n)
    assert_orthonormal_hadamard(h)


def test_sylvester_matrix_is_the_usual_one():
    # H_{2^a}[i, j] = (-1)^popcount(i & j) / sqrt(2^a): the fast transform's butterflies assume it.
    signs = torch.tensor([[(-1) ** (i & j).bit_count() for j in range(16)] for i in range(16)])
    torch.testing.assert_close(hadamard_matrix(16), signs.double() / 4, rtol=0, atol=0)


def test_matrix_dtype_and_cache_isolation():
    h = hadamard_matrix(12, dtype=torch.float32)
    assert h.dtype == torch.float32
    h.zero_()  # the caller's copy: the cached matrix must not change
    assert_orthonormal_hadamard(hadamard_matrix(12))


@pytest.mark.parametrize("n", [1, 2, 4, 1024, *PALEY, 40, 96, *OTHER_WIDTHS, *(w for w, _, _ in LLM_WIDTHS)])
def test_supported_sizes(n):
    assert hadamard_size_supported(n)


@pytest.mark.parametrize("n", UNSUPPORTED)
def test_unsupported_sizes_raise_naming_the_size(n):
    assert not hadamard_size_supported(n)
    with pytest.raises(ValueError, match=rf"order {n}\b.*supported orders"):
        hadamard_matrix(n)
    if n > 0:
        with pytest.raises(ValueError, match=rf"order {n}\b"):
            hadamard_transform(torch.zeros(2, n))


def test_non_multiple_of_four_message_says_why():
    with pytest.raises(ValueError, match="multiples of 4"):
        hadamard_matrix(18)


@pytest.mark.parametrize("n", [12, 20, 28, 36, 40, 96, 108, 344, 768, 64])
@pytest.mark.parametrize("with_signs", [False, True])
def test_fast_full_transform_matches_dense(n, with_signs):
    x = randn(3, n)
    signs = random_signs(n, seed=n) if with_signs else None
    rotation = hadamard_matrix(n) if signs is None else signs.double()[:, None] * hadamard_matrix(n)
    y = hadamard_transform(x, signs=signs)
    torch.testing.assert_close(y, x @ rotation, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        hadamard_transform(x, signs=signs, inverse=True), x @ rotation.T, rtol=0, atol=1e-12
    )
    torch.testing.assert_close(hadamard_transform(y, signs=signs, inverse=True), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("n", "power", "m"), LLM_WIDTHS)
def test_llm_widths(n, power, m):
    # Never the dense n×n matrix: the rows the fast path gives must be kron(H_power, H_m)'s rows,
    # and a random batch must keep its norms and come back exactly.
    assert_orthonormal_hadamard(hadamard_matrix(m))
    rows = torch.tensor([0, 1, m - 1, m, n // 2 + 5, n - 1])
    got = hadamard_transform(torch.nn.functional.one_hot(rows, n).double())
    small, factor = hadamard_matrix(power), hadamard_matrix(m)
    expected = torch.stack([torch.kron(small[i // m], factor[i % m]) for i in rows.tolist()])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)

    x = randn(4, n, seed=n)
    signs = random_signs(n, seed=1)
    y = hadamard_transform(x, signs=signs)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)
    torch.testing.assert_close(hadamard_transform(y, signs=signs, inverse=True), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("block", [16, 32, 12, 128])
@pytest.mark.parametrize("with_signs", [False, True])
def test_block_transform_matches_block_diagonal(block, with_signs):
    n = 384
    x = randn(2, 5, n, seed=block)
    signs = random_signs(block, seed=7) if with_signs else None
    rotation = hadamard_matrix(block) if signs is None else signs.double()[:, None] * hadamard_matrix(block)
    dense = block_diagonal(rotation, n)
    y = hadamard_transform(x, block, signs)
    torch.testing.assert_close(y, x @ dense, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        hadamard_transform(x, block, signs, inverse=True), x @ dense.T, rtol=0, atol=1e-12
    )
    torch.testing.assert_close(hadamard_transform(y, block, signs, inverse=True), x, rtol=0, atol=1e-12)


def test_block_of_full_width_is_the_full_transform():
    x = randn(4, 96)
    torch.testing.assert_close(hadamard_transform(x, 96), hadamard_transform(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("block", [None, 32])
def test_gradient_is_the_inverse_transform(block):
    n = 96
    signs = random_signs(block or n, seed=3)
    x = randn(3, n, seed=1).requires_grad_()
    g = randn(3, n, seed=2)
    (hadamard_transform(x, block, signs) * g).sum().backward()
    torch.testing.assert_close(x.grad, hadamard_transform(g, block, signs, inverse=True), rtol=0, atol=1e-12)


@pytest.mark.parametrize("block", [None, 4])
def test_gradcheck(block):
    x = randn(2, 24).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: hadamard_transform(t, block, random_signs(block or 24, 0)), (x,)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("block", [None, 32])
def test_low_precision_keeps_dtype(dtype, block):
    x = randn(4, 768, dtype=torch.float32).to(dtype)
    y = hadamard_transform(x, block, random_signs(block or 768, seed=0))
    assert y.dtype == dtype and y.shape == x.shape
    expected = hadamard_transform(x.double(), block, random_signs(block or 768, seed=0))
    tolerance = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float32: 1e-6}[dtype]
    torch.testing.assert_close(y.double(), expected, rtol=tolerance, atol=tolerance)


def test_input_is_not_modified_and_leading_shape_kept():
    x = randn(2, 3, 4, 40)
    before = x.clone()
    y = hadamard_transform(x, signs=random_signs(40, seed=0))
    assert y.shape == x.shape
    torch.testing.assert_close(x, before, rtol=0, atol=0)
    torch.testing.assert_close(
        y.reshape(-1, 40), hadamard_transform(x.reshape(-1, 40), signs=random_signs(40, 0))
    )


def test_block_not_dividing_the_axis_raises_naming_both():
    with pytest.raises(ValueError, match=r"\b24\b.*\b100\b"):
        hadamard_transform(torch.zeros(2, 100), block=24)


def test_wrong_sign_length_raises():
    with pytest.raises(ValueError, match="signs"):
        hadamard_transform(torch.zeros(2, 64), block=32, signs=torch.ones(64))
    with pytest.raises(ValueError, match="signs"):
        hadamard_transform(torch.zeros(2, 64), signs=torch.ones(32))


def test_random_signs():
    a = random_signs(1000, seed=5)
    assert a.dtype == torch.float32 and a.shape == (1000,)
    assert set(a.tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(a, random_signs(1000, seed=5), rtol=0, atol=0)
    assert not torch.equal(a, random_signs(1000, seed=6))
