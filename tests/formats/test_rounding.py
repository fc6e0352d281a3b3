"""round_to_element (SPEC section 1): RNE bit for bit against ml_dtypes and torch's float8 casts,
saturation and specials, ties-away, and stochastic rounding's support, reproducibility and
unbiasedness.

Oracles: ml_dtypes casts, torch's ``.to(torch.float8_*)``, numpy's round-half-even for int8, and
grids read from ml_dtypes' code tables (never qpass's own tables).
"""

from __future__ import annotations

import math

import ml_dtypes  # noqa: F401 -- the oracles need it: fail here, at import, if it is missing
import numpy as np
import pytest
import torch
from oracles import ALL_FORMATS, FLOAT_FORMATS, ML_DTYPE

from qpass.formats.element import ELEMENT_FORMATS
from qpass.formats.rounding import round_to_element

TORCH_FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
N_CODES = {"fp8_e4m3": 256, "fp8_e5m2": 256, "fp6_e2m3": 64, "fp6_e3m2": 64, "fp4_e2m1": 16}

# Hand-typed from SPEC section 1: (max normal, min subnormal, mantissa bits, emax).
PARAMS = {
    "fp8_e4m3": (448.0, 2.0**-9, 3, 8),
    "fp8_e5m2": (57344.0, 2.0**-16, 2, 15),
    "fp6_e2m3": (7.5, 2.0**-3, 3, 2),
    "fp6_e3m2": (28.0, 2.0**-4, 2, 4),
    "fp4_e2m1": (6.0, 0.5, 1, 2),
    "int8": (127 / 64, 2.0**-6, 6, 0),
}
F32_MAX = float(torch.finfo(torch.float32).max)
INF = torch.tensor(math.inf)


def f32(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def grid(name: str) -> np.ndarray:
    """Sorted distinct finite values of the format (float64), from ml_dtypes / k/64 by hand."""
    if name == "int8":
        return np.arange(-127, 128, dtype=np.float64) / 64
    codes = np.arange(N_CODES[name], dtype=np.uint8)
    values = codes.view(ML_DTYPE[name]).astype(np.float64)
    return np.unique(values[np.isfinite(values)])  # -0 and +0 collapse into one 0


def midpoints(name: str) -> np.ndarray:
    g = grid(name)
    return (g[1:] + g[:-1]) / 2  # exact in fp32: one bit more than the format's mantissa


def sweep(name: str, seed: int = 0) -> torch.Tensor:
    """Dense fp32 inputs with |x| <= max normal: the grid, every tie, ties +- 1 fp32 ulp, the grid
    +- 1 ulp, the region just under max normal, element subnormals, fp32 subnormals, signed zeros,
    and random fp32 bit patterns over the whole exponent range of the format."""
    max_normal, min_sub, mbits, emax = PARAMS[name]
    g = f32(grid(name))
    mids = f32(midpoints(name))
    special = f32(
        [0.0, -0.0, min_sub / 2, min_sub * 0.75, min_sub * 1.5, max_normal, -max_normal]
        + [1e-45, -1e-45, 2.0**-126, 2**-126 - 2**-149, 1e-40, -3e-39]  # fp32 subnormals
    )
    near = torch.cat([g, mids, special])
    parts = [
        near,
        torch.nextafter(near, INF),
        torch.nextafter(near, -INF),
        torch.linspace(-max_normal, max_normal, 30001),
        torch.linspace(-8 * min_sub, 8 * min_sub, 4001),  # element subnormal range, finely
    ]
    gen = torch.Generator().manual_seed(seed)
    n = 60000
    # Random fp32 bit patterns: exponents from well below the smallest subnormal to max normal's binade.
    lo_exp = 127 + math.floor(math.log2(min_sub)) - 3
    exp = torch.randint(lo_exp, 127 + emax + 1, (n,), generator=gen, dtype=torch.int32)
    mant = torch.randint(0, 1 << 23, (n,), generator=gen, dtype=torch.int32)
    sign = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int32) << 31
    parts.append((sign | (exp << 23) | mant).view(torch.float32))
    # fp32 subnormal inputs (exponent field 0).
    sub = torch.randint(1, 1 << 23, (2000,), generator=gen, dtype=torch.int32)
    parts.append(sub.view(torch.float32))  # negated with everything else below
    x = torch.cat(parts)
    x = torch.cat([x, -x])
    return x[x.abs() <= max_normal]


def ml_rne(x: torch.Tensor, name: str) -> torch.Tensor:
    return torch.from_numpy(x.numpy().astype(ML_DTYPE[name]).astype(np.float32))


def int8_rne(x: torch.Tensor) -> torch.Tensor:
    """MX int8 by hand: numpy's rint (half to even) on x * 64 (exact in float64), clamp to +-127.
    Two's complement has no -0, so every zero is +0."""
    x64 = x.double().numpy()
    k = np.clip(np.rint(x64 * 64), -127, 127) + 0.0  # -0 + 0 == +0
    return torch.from_numpy((k / 64).astype(np.float32))


def assert_same_bits(got: torch.Tensor, expected: torch.Tensor, x: torch.Tensor, what: str):
    bad = bits(got) != bits(expected)
    if bad.any():
        i = torch.nonzero(bad).flatten()[:8]
        rows = [(x[j].item(), got[j].item(), expected[j].item()) for j in i]
        raise AssertionError(f"{what}: {int(bad.sum())} mismatches (x, got, expected): {rows}")


# --------------------------------------------------------------------------------------------
# RNE, bit for bit.


@pytest.mark.parametrize("name", FLOAT_FORMATS)
def test_rne_matches_ml_dtypes(name):
    x = sweep(name)
    got = round_to_element(x, ELEMENT_FORMATS[name], "rne")
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert_same_bits(got, ml_rne(x, name), x, f"{name} vs ml_dtypes")


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_rne_matches_torch_float8(name):
    x = sweep(name, seed=1)
    got = round_to_element(x, ELEMENT_FORMATS[name], "rne")
    assert_same_bits(got, x.to(TORCH_FP8[name]).float(), x, f"{name} vs torch")


def test_rne_int8_matches_numpy():
    x = sweep("int8")
    got = round_to_element(x, ELEMENT_FORMATS["int8"], "rne")
    assert_same_bits(got, int8_rne(x), x, "int8 vs numpy rint")


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_rne_ties_go_to_even(name):
    # Every tie lands on the neighbour whose last mantissa bit (int8: whose k) is even. Parity is
    # read from the neighbour's position in the grid: consecutive nonnegative grid values alternate.
    g = grid(name)
    mids = midpoints(name)
    got = round_to_element(f32(mids), ELEMENT_FORMATS[name], "rne").double().numpy()
    idx_lo = np.arange(len(mids))
    zero = int(np.searchsorted(g, 0.0))
    # The nonnegative value at grid index i has mantissa (or k) parity (i - zero) % 2.
    lo_even = (np.abs(idx_lo - zero) % 2) == 0
    want = np.where(lo_even, g[idx_lo], g[idx_lo + 1])
    assert np.array_equal(got, want)


# --------------------------------------------------------------------------------------------
# Saturation and specials.


def beyond_max(name: str) -> torch.Tensor:
    """Finite positive values above max normal: the would-be tie with the next binade, it +- ulp,
    up to 2 * max normal, and huge values up to fp32 max."""
    max_normal, _, mbits, emax = PARAMS[name]
    top_ulp = 2.0 ** (emax - mbits)
    tie = max_normal + top_ulp / 2
    x = f32([tie, max_normal + top_ulp, 1.5 * max_normal, 2 * max_normal, 1e6, 1e20, 3e38, F32_MAX])
    toward = f32([math.inf, math.inf, -math.inf, -math.inf])
    x = torch.cat([x, torch.nextafter(f32([max_normal, tie, tie, 2 * max_normal]), toward)])
    x = torch.cat([x, torch.linspace(max_normal, 2 * max_normal, 1001)[1:]])
    assert (x > max_normal).all()
    return x


@pytest.mark.parametrize("rounding", ["rne", "away", "stochastic"])
@pytest.mark.parametrize("name", ALL_FORMATS)
def test_finite_overflow_saturates(name, rounding):
    max_normal = PARAMS[name][0]
    x = beyond_max(name)
    x = torch.cat([x, -x])
    got = round_to_element(x, ELEMENT_FORMATS[name], rounding, generator=torch.Generator().manual_seed(0))
    assert_same_bits(got, torch.copysign(f32(max_normal).expand_as(x), x), x, f"{name} {rounding}")


@pytest.mark.parametrize("rounding", ["rne", "away", "stochastic"])
@pytest.mark.parametrize("name", ALL_FORMATS)
def test_inf_and_nan(name, rounding):
    x = f32([math.inf, -math.inf, math.nan])
    got = round_to_element(x, ELEMENT_FORMATS[name], rounding, generator=torch.Generator().manual_seed(0))
    assert got[2].isnan()
    if name == "fp8_e5m2":
        assert got[0] == math.inf and got[1] == -math.inf
    else:
        # No Inf in the format: overflow becomes NaN, never a finite number.
        assert got[:2].isnan().all(), got


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_half_min_subnormal_rounds_to_signed_zero(name):
    min_sub = PARAMS[name][1]
    half = f32([min_sub / 2, -min_sub / 2])
    got = round_to_element(half, ELEMENT_FORMATS[name], "rne")
    negative_zero = 0.0 if name == "int8" else -0.0  # two's complement int8 has no -0
    assert bits(got).tolist() == bits(f32([0.0, negative_zero])).tolist()
    above = torch.nextafter(half, f32([INF, -INF]))  # just beyond the tie, away from zero
    got = round_to_element(above, ELEMENT_FORMATS[name], "rne")
    assert got.tolist() == [min_sub, -min_sub]
    # fp32's smallest subnormals and tiny values are signed zeros too.
    tiny = f32([1e-45, -1e-45, 1e-30, -1e-30, 0.0, -0.0])
    got = round_to_element(tiny, ELEMENT_FORMATS[name], "rne")
    assert bits(got).tolist() == bits(f32([0.0, negative_zero] * 3)).tolist()


# --------------------------------------------------------------------------------------------
# Ties away from zero.

# (format, tie, away result, rne result), worked out by hand from the grids of SPEC section 1.
HAND_TIES = [
    ("fp4_e2m1", 0.25, 0.5, 0.0),
    ("fp4_e2m1", 0.75, 1.0, 1.0),
    ("fp4_e2m1", 1.25, 1.5, 1.0),
    ("fp4_e2m1", 2.5, 3.0, 2.0),
    ("fp4_e2m1", 3.5, 4.0, 4.0),
    ("fp4_e2m1", 5.0, 6.0, 4.0),
    ("fp4_e2m1", -5.0, -6.0, -4.0),
    ("fp4_e2m1", -0.25, -0.5, -0.0),
    ("fp8_e4m3", 2.0**-10, 2.0**-9, 0.0),
    ("fp8_e4m3", 1.0625, 1.125, 1.0),
    ("fp8_e4m3", 17.0, 18.0, 16.0),
    ("fp8_e4m3", -17.0, -18.0, -16.0),
    ("fp8_e4m3", 432.0, 448.0, 448.0),
    ("fp8_e5m2", 1.125, 1.25, 1.0),
    ("fp8_e5m2", 2.0**-17, 2.0**-16, 0.0),
    ("fp8_e5m2", -53248.0, -57344.0, -49152.0),
    ("fp6_e2m3", 0.0625, 0.125, 0.0),
    ("fp6_e2m3", 1.0625, 1.125, 1.0),
    ("fp6_e2m3", 7.25, 7.5, 7.0),
    ("fp6_e3m2", 2.0**-5, 2.0**-4, 0.0),
    ("fp6_e3m2", 1.125, 1.25, 1.0),
    ("fp6_e3m2", -26.0, -28.0, -24.0),
    ("int8", 0.5 / 64, 1 / 64, 0.0),
    ("int8", 2.5 / 64, 3 / 64, 2 / 64),
    ("int8", -2.5 / 64, -3 / 64, -2 / 64),
    ("int8", 126.5 / 64, 127 / 64, 126 / 64),
]


@pytest.mark.parametrize("name,x,away,rne", HAND_TIES)
def test_away_hand_picked_ties(name, x, away, rne):
    fmt = ELEMENT_FORMATS[name]
    t = f32([x])
    assert bits(round_to_element(t, fmt, "away")).item() == bits(f32([away])).item()
    assert bits(round_to_element(t, fmt, "rne")).item() == bits(f32([rne])).item()


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_away_every_tie_goes_to_larger_magnitude(name):
    g = grid(name)
    mids = midpoints(name)
    want = np.where(mids >= 0, g[1:], g[:-1])  # the neighbour farther from zero
    got = round_to_element(f32(mids), ELEMENT_FORMATS[name], "away").double().numpy()
    assert np.array_equal(got, want)


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_away_equals_rne_off_ties(name):
    x = sweep(name, seed=2)
    is_tie = torch.from_numpy(np.isin(x.double().abs().numpy(), np.abs(midpoints(name))))
    x = x[~is_tie]
    oracle = int8_rne(x) if name == "int8" else ml_rne(x, name)
    assert_same_bits(round_to_element(x, ELEMENT_FORMATS[name], "away"), oracle, x, f"{name} away")


# --------------------------------------------------------------------------------------------
# Stochastic rounding.


def neighbours(name: str, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Grid floor and ceil of each x (equal when x is on the grid)."""
    g = grid(name)
    xd = x.double().numpy()
    lo = g[np.searchsorted(g, xd, side="right") - 1]
    hi = g[np.searchsorted(g, xd, side="left")]
    return lo, hi


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_stochastic_picks_a_grid_neighbour(name):
    x = sweep(name, seed=3)
    got = round_to_element(x, ELEMENT_FORMATS[name], "stochastic", generator=torch.Generator().manual_seed(7))
    lo, hi = neighbours(name, x)
    gd = got.double().numpy()
    ok = (gd == lo) | (gd == hi)
    assert ok.all(), list(zip(x[~torch.from_numpy(ok)][:5].tolist(), gd[~ok][:5]))
    # Values on the grid are returned unchanged, and both neighbours do occur.
    on_grid = lo == hi
    assert np.array_equal(gd[on_grid], lo[on_grid])
    between = ~on_grid
    assert (gd[between] == lo[between]).any() and (gd[between] == hi[between]).any()
    # The sign is kept, zeros included (a negative value that rounds to zero gives -0), except
    # in int8, whose two's complement has no -0.
    expected_sign = torch.signbit(x) & ((got != 0) | (name != "int8"))
    assert torch.equal(torch.signbit(got), expected_sign)


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_stochastic_is_reproducible(name):
    fmt = ELEMENT_FORMATS[name]
    x = sweep(name, seed=4)[:20000]
    a = round_to_element(x, fmt, "stochastic", generator=torch.Generator().manual_seed(123))
    b = round_to_element(x, fmt, "stochastic", generator=torch.Generator().manual_seed(123))
    c = round_to_element(x, fmt, "stochastic", generator=torch.Generator().manual_seed(124))
    assert torch.equal(bits(a), bits(b))
    assert not torch.equal(bits(a), bits(c))
    # The same generator object advances: a second draw differs from the first.
    g = torch.Generator().manual_seed(123)
    first = round_to_element(x, fmt, "stochastic", generator=g)
    second = round_to_element(x, fmt, "stochastic", generator=g)
    assert torch.equal(bits(first), bits(a)) and not torch.equal(bits(first), bits(second))
    # generator=None uses torch's global generator, so torch.manual_seed makes it reproducible.
    torch.manual_seed(5)
    d = round_to_element(x, fmt, "stochastic")
    torch.manual_seed(5)
    e = round_to_element(x, fmt, "stochastic")
    assert torch.equal(bits(d), bits(e))


def unbiasedness_cases(name: str) -> list[tuple[float, float, float]]:
    """(lo, hi, p): neighbours lo < hi on the grid and the fraction p of the way from lo to hi,
    with |p - 1/2| >= 1/8. Covers the element subnormal range (including the step from 0), a
    normal binade, the top binade, and negative values."""
    g = grid(name)
    zero = int(np.searchsorted(g, 0.0))
    picks = [
        (zero, 0.125),  # [0, min subnormal]: subnormal range
        (zero + 1, 0.8125),  # [min subnormal, 2 * min subnormal]
        (zero + len(g) // 4, 0.3125),  # mid positive range
        (len(g) - 2, 0.625),  # top binade: [previous, max normal]
        (zero - 1, 0.1875),  # [-min subnormal, 0]: negative subnormal
        (len(g) // 3, 0.90625),  # negative normals
        (1, 0.375),  # [-max normal, next]
    ]
    return [(float(g[i]), float(g[i + 1]), p) for i, p in picks]


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_stochastic_is_unbiased(name):
    """Statistical test at a fixed seed (deterministic, so it cannot flake).

    For x = lo + p * (hi - lo), each draw goes up to hi with probability p, so the count K of
    "hi" among N draws is Binomial(N, p): sd = sqrt(N p (1 - p)) <= sqrt(N) / 2. We accept
    |K - N p| <= 5 sd. With N = 100_000 that is at most 5 * 158 = 791 counts (0.8% of N).
    Why that is tight enough to catch a biased implementation:
      * P(up) = 1/2 regardless of x misses by |1/2 - p| * N >= N / 8 = 12_500 counts (every case
        here has |p - 1/2| >= 1/8), i.e. >= 79 sd;
      * round-to-nearest (deterministic) misses by min(p, 1 - p) * N >= 0.09375 * N = 9_375 counts;
      * using P(up) = 1 - p (e.g. the fraction of |x| applied on the wrong side for negatives)
        misses by |1 - 2p| * N >= N / 4.
    Any bias in P(up) larger than about 10 sd / N ~ 1.6% is detected.
    The mean of the dequantized values is the same statistic scaled by (hi - lo):
    |mean - x| <= 5 * (hi - lo) * sqrt(p (1 - p) / N).
    """
    n = 100_000
    fmt = ELEMENT_FORMATS[name]
    cases = unbiasedness_cases(name)
    x = f32([lo + p * (hi - lo) for lo, hi, p in cases])
    # Exactness of the inputs: x - lo and hi - lo are exact in float64, so p is the exact fraction.
    for (lo, hi, p), xi in zip(cases, x.tolist()):
        assert (xi - lo) / (hi - lo) == p
    rows = x[:, None].expand(-1, n).contiguous()  # N independent draws of each x, in one call
    samples = round_to_element(rows, fmt, "stochastic", generator=torch.Generator().manual_seed(2024))
    s = samples.double().numpy()
    for row, (lo, hi, p) in zip(s, cases):
        assert np.all((row == lo) | (row == hi)), (name, lo, hi)
        k = int((row == hi).sum())
        sd = math.sqrt(n * p * (1 - p))
        assert abs(k - n * p) <= 5 * sd, f"{name}: x={lo + p * (hi - lo)} P(up)={k / n}, want {p}"
        xv = lo + p * (hi - lo)
        bound = 5 * (hi - lo) * math.sqrt(p * (1 - p) / n)
        assert abs(row.mean() - xv) <= bound, f"{name}: mean {row.mean()} vs x={xv} (bound {bound})"


def test_stochastic_bound_rejects_biased_rounders():
    """The acceptance bound of test_stochastic_is_unbiased, applied to two deliberately biased
    rounders written here, fails for every case: the test has teeth."""
    n = 100_000
    rng = np.random.default_rng(0)
    for name in ALL_FORMATS:
        for lo, hi, p in unbiasedness_cases(name):
            sd = math.sqrt(n * p * (1 - p))
            coin = int((rng.random(n) < 0.5).sum())  # P(up) = 1/2
            nearest = n if p > 0.5 else 0  # round to nearest
            assert abs(coin - n * p) > 5 * sd
            assert abs(nearest - n * p) > 5 * sd
