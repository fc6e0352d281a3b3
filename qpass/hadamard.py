"""Orthonormal Hadamard matrices and the (randomized, block-diagonal or full-size) Hadamard transform.

A Hadamard matrix of order n has entries ±1 and orthogonal rows; divided by sqrt(n) it is an
orthonormal rotation. Orders are built as ``kron(H_{2^a}, H_m)``: ``H_{2^a}`` by Sylvester's doubling
and ``H_m`` (m a multiple of 4) by Paley's constructions from the quadratic character of a finite
field GF(q), q = p^e with e <= 3:

* Paley I:  m = q + 1 for q ≡ 3 (mod 4), e.g. 12 (q = 11), 28 (q = 27), 108 (q = 107), 344 (q = 343);
* Paley II: m = 2(q + 1) for q ≡ 1 (mod 4), e.g. 36 (q = 17), 76 (q = 37).

This covers every power of two and most LLM widths (11008 = 32·344, 13824 = 128·108, 14336 = 512·28,
28672 = 1024·28). ``hadamard_transform`` never builds the n×n matrix: it multiplies by the small
``H_m`` and runs a fast Walsh–Hadamard transform (log2 steps of sums and differences) on the 2^a axis.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
from torch import Tensor

__all__ = ["hadamard_matrix", "hadamard_size_supported", "hadamard_transform", "random_signs"]

_SUPPORTED = (
    "supported orders are 1, 2 and 2^a * m with m = 1 (Sylvester), m = q + 1 for a prime power "
    "q ≡ 3 (mod 4) (Paley I) or m = 2(q + 1) for a prime power q ≡ 1 (mod 4) (Paley II), q = p^e with e <= 3"
)


# ---- which orders can be built ------------------------------------------------------------------


def _prime_power(q: int) -> tuple[int, int] | None:
    """``(p, e)`` with ``q == p**e`` for a prime p, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)  # the smallest prime factor
    e = 0
    while q % p == 0:
        q //= p
        e += 1
    return (p, e) if q == 1 else None


def _paley_field(m: int) -> tuple[str, int] | None:
    """The Paley construction (``"I"`` or ``"II"``) and field size q that give order m (a multiple
    of 4), or None."""
    for kind, q, residue in (("I", m - 1, 3), ("II", m // 2 - 1, 1)):
        field = _prime_power(q)
        # Only fields GF(p^e) with e <= 3 are implemented (see _irreducible).
        if field is not None and field[1] <= 3 and q % 4 == residue:
            return kind, q
    return None


@functools.cache
def _decompose(n: int) -> tuple[int, int] | None:
    """``(a, m)`` with ``n == 2**a * m`` and H_m buildable (m = 1 or a Paley order), or None.

    The largest power of two wins: it leaves the smallest dense factor for the transform to multiply.
    And since every smaller ``n / 2^j`` was tried first, ``_decompose(m) == (0, m)``: H_m is the
    Paley matrix itself, which the fast transform relies on.
    """
    if n < 1:
        return None
    twos = (n & -n).bit_length() - 1
    for a in range(twos, -1, -1):
        m = n >> a
        if m == 1 or (m % 4 == 0 and _paley_field(m) is not None):
            return a, m
    return None


def hadamard_size_supported(n: int) -> bool:
    """Whether :func:`hadamard_matrix` (and a full-size :func:`hadamard_transform`) can do order n."""
    return _decompose(n) is not None


# ---- finite fields and Paley's constructions ----------------------------------------------------


def _irreducible(p: int, e: int) -> tuple[int, ...]:
    """Coefficients ``(c_0, ..., c_{e-1})`` of a monic irreducible ``x^e + ... + c_0`` over GF(p), e = 2, 3.

    For degree 2 or 3 a polynomial is irreducible iff it has no root, since any factorization would
    include a linear factor."""
    for coefficients in itertools.product(range(p), repeat=e):
        if all((x**e + sum(c * x**k for k, c in enumerate(coefficients))) % p for x in range(p)):
            return coefficients
    raise AssertionError(f"no irreducible polynomial of degree {e} over GF({p})")  # cannot happen


def _field_square(digits: tuple[int, ...], p: int, modulus: tuple[int, ...]) -> tuple[int, ...]:
    """The square of a GF(p^e) element given as polynomial coefficients (lowest first)."""
    e = len(digits)
    product = [0] * (2 * e - 1)
    for i, a in enumerate(digits):
        for j, b in enumerate(digits):
            product[i + j] += a * b
    # Reduce from the top: x^e = -(c_0 + c_1 x + ... + c_{e-1} x^{e-1}).
    for top in range(2 * e - 2, e - 1, -1):
        carry, product[top] = product[top], 0
        for k, c in enumerate(modulus):
            product[top - e + k] -= carry * c
    return tuple(c % p for c in product[:e])


def _quadratic_character(p: int, e: int) -> tuple[Tensor, Tensor]:
    """GF(p^e)'s elements as base-p digits ``[q, e]`` (element i has digits of i), and the quadratic
    character ``chi[i]``: 0 for zero, 1 for a nonzero square, -1 otherwise."""
    q = p**e
    digits = [tuple((i // p**k) % p for k in range(e)) for i in range(q)]
    modulus = _irreducible(p, e) if e > 1 else ()  # GF(p) is the integers mod p: nothing to reduce
    chi = torch.full((q,), -1.0, dtype=torch.float64)
    for element in digits[1:]:
        square = _field_square(element, p, modulus)
        chi[sum(d * p**k for k, d in enumerate(square))] = 1.0
    chi[0] = 0.0
    return torch.tensor(digits, dtype=torch.int64), chi


def _jacobsthal(q: int) -> Tensor:
    """The q×q matrix ``Q[i, j] = chi(a_i - a_j)`` over GF(q)."""
    p, e = _prime_power(q)
    digits, chi = _quadratic_character(p, e)
    # Subtraction in GF(p^e) is digit-wise mod p.
    difference = (digits[:, None, :] - digits[None, :, :]) % p
    return chi[(difference * p ** torch.arange(e)).sum(-1)]


def _paley(m: int) -> Tensor:
    """An m×m ±1 Hadamard matrix (float64, unnormalized) from Paley's construction I or II."""
    kind, q = _paley_field(m)
    jacobsthal = _jacobsthal(q)
    ones = torch.ones(q, 1, dtype=torch.float64)
    if kind == "I":
        # chi(-1) = -1: Q is antisymmetric, C = [[0, 1ᵀ], [-1, Q]] is a skew conference matrix and
        # I + C is Hadamard.
        conference = torch.cat([torch.cat([torch.zeros(1, 1, dtype=torch.float64), ones.T], 1),
                                torch.cat([-ones, jacobsthal], 1)])
        return torch.eye(m, dtype=torch.float64) + conference
    # chi(-1) = 1: Q is symmetric, C = [[0, 1ᵀ], [1, Q]] is a symmetric conference matrix of order
    # q + 1. Replace each ±1 of C by ±[[1, 1], [1, -1]] and each (diagonal) 0 by [[1, -1], [-1, -1]].
    conference = torch.cat([torch.cat([torch.zeros(1, 1, dtype=torch.float64), ones.T], 1),
                            torch.cat([ones, jacobsthal], 1)])
    plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(conference, plus) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero)


def _sylvester(a: int) -> Tensor:
    """The 2^a × 2^a ±1 Sylvester matrix: ``H_{2k} = [[H_k, H_k], [H_k, -H_k]]`` (symmetric)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(a):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def _require_decomposition(n: int) -> tuple[int, int]:
    """``_decompose(n)``, or a ValueError that names n and says which orders are supported."""
    decomposition = _decompose(n)
    if decomposition is None:
        if n < 1:
            reason = "the order must be positive"
        elif n > 2 and n % 4:
            reason = "Hadamard orders above 2 are multiples of 4"
        else:
            reason = "no construction for it is implemented"
        raise ValueError(f"no Hadamard matrix of order {n}: {reason}; {_SUPPORTED}")
    return decomposition


# Bounded: a dense matrix of a large order (e.g. 28672, 6.5 GB in float64) is not worth keeping.
@functools.lru_cache(maxsize=16)
def _hadamard_f64(n: int) -> Tensor:
    a, m = _require_decomposition(n)
    factor = torch.ones(1, 1, dtype=torch.float64) if m == 1 else _paley(m)
    return torch.kron(_sylvester(a), factor) / math.sqrt(n)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The n×n orthonormal Hadamard matrix ``kron(H_{2^a}, H_m) / sqrt(n)`` (``H @ H.T == I``).

    Raises ValueError for an order with no known construction (see :func:`hadamard_size_supported`).
    """
    # A copy: callers may write into the result without touching the cache.
    return _hadamard_f64(n).to(dtype, copy=True)


# ---- transforms ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _matrix_on(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    # Kept per device so that a GPU transform does not copy its matrix from the host on every call.
    return _hadamard_f64(n).to(device=device, dtype=dtype)


def _walsh_hadamard(y: Tensor) -> Tensor:
    """``H_{2^a} @ y`` (unnormalized) along axis -2 of ``y``, which has length 2^a.

    Step ``s`` pairs index ``j`` with ``j + h`` (``h = 2^s``) inside each run of ``2h`` and writes
    their sum and difference in their places: after a steps that is ``H_2 ⊗ ... ⊗ H_2``, Sylvester's
    matrix. The order of the sums is part of qpass's numerics (the ONNX export repeats it op for op),
    and writing into one output per step, rather than stacking, keeps it a few passes over memory."""
    *lead, length, m = y.shape
    h = 1
    while h < length:
        top, bottom = y.reshape(*lead, length // (2 * h), 2, h, m).unbind(-3)
        if torch.is_grad_enabled() and y.requires_grad:  # out= has no autograd: the same sums, stacked
            out = torch.stack([top + bottom, top - bottom], dim=-3)
        else:
            out = torch.empty(*lead, length // (2 * h), 2, h, m, dtype=y.dtype, device=y.device)
            torch.add(top, bottom, out=out.select(-3, 0))
            torch.sub(top, bottom, out=out.select(-3, 1))
        y, h = out.reshape(*lead, length, m), 2 * h
    return y


def _full_transform(x: Tensor, transpose: bool) -> Tensor:
    """``x @ H_n`` (``x @ H_nᵀ`` for ``transpose``) along the last axis without building H_n."""
    a, m = _require_decomposition(x.shape[-1])
    # With X = x reshaped [2^a, m]: x @ kron(A, B) is Aᵀ X B, and Sylvester's A is symmetric.
    y = x.reshape(*x.shape[:-1], 2**a, m)
    if m > 1:
        factor = _matrix_on(m, x.dtype, x.device)  # H_m / sqrt(m)
        y = y @ (factor.T if transpose else factor)
    return (_walsh_hadamard(y) * _inverse_sqrt(2**a, x.dtype)).reshape(x.shape)


def _inverse_sqrt(n: int, dtype: torch.dtype) -> float:
    """``1 / sqrt(n)`` rounded to ``dtype`` first, so that the one multiply by it is the same fp32
    operation in every implementation of the transform (the ONNX export's included)."""
    return 1 / math.sqrt(n) if dtype == torch.float64 else torch.tensor(1 / math.sqrt(n), dtype=dtype).item()


def _check_signs(signs: Tensor | None, length: int, what: str) -> None:
    if signs is not None and tuple(signs.shape) != (length,):
        raise ValueError(f"signs must have shape ({length},) for {what}, got {tuple(signs.shape)}")


def hadamard_transform(
    x: Tensor, block: int | None = None, signs: Tensor | None = None, inverse: bool = False
) -> Tensor:
    """``x @ R`` along the last axis (``x @ R.T`` for ``inverse``), with ``R = diag(signs) @ H``.

    ``block=None``: H is ``hadamard_matrix(n)`` for n = ``x.shape[-1]`` (applied fast, never built),
    and ``signs`` has length n. ``block=b``: R is block diagonal, ``I_{n/b} ⊗ (diag(signs) H_b)``, with
    one sign vector of length b for every block. bfloat16/float16 are computed in float32 and cast
    back; the result is differentiable (plain torch ops, inputs never written).
    """
    if x.dim() == 0 or not x.is_floating_point():
        raise ValueError(
            f"hadamard_transform needs a floating-point tensor with at least one axis, "
            f"got {x.dtype} of shape {tuple(x.shape)}"
        )
    n = x.shape[-1]
    compute = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    y = x.to(compute)
    if signs is not None:
        signs = signs.to(device=x.device, dtype=compute)

    if block is None:
        _check_signs(signs, n, f"a full-size transform of {n}")
        if signs is not None and not inverse:
            y = y * signs
        y = _full_transform(y, transpose=inverse)
        if signs is not None and inverse:
            y = y * signs
        return y.to(x.dtype)

    if block < 1 or n % block:
        raise ValueError(f"Hadamard block size {block} does not divide the last axis' length {n}")
    _check_signs(signs, block, f"{block}-point blocks")
    blocks = y.reshape(*x.shape[:-1], n // block, block)
    if block & (block - 1) == 0:
        # Sums and differences in a fixed order, then one multiply: unlike a matmul (whose summation
        # order depends on the BLAS and the shape), every implementation gets the same bits.
        if signs is not None and not inverse:
            blocks = blocks * signs
        out = _walsh_hadamard(blocks.unsqueeze(-1)).squeeze(-1) * _inverse_sqrt(block, compute)
        if signs is not None and inverse:
            out = out * signs
        return out.reshape(x.shape).to(x.dtype)
    rotation = _matrix_on(block, compute, x.device)
    if signs is not None:
        rotation = signs[:, None] * rotation  # diag(signs) @ H_b
    out = blocks @ (rotation.T if inverse else rotation)
    return out.reshape(x.shape).to(x.dtype)


def random_signs(n: int, seed: int) -> Tensor:
    """n random ±1 values (float32), the same for the same seed on every machine (CPU generator)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=generator).to(torch.float32) * 2 - 1
