"""Property tests (hypothesis) for quantize/dequantize over random formats, shapes, axes and magnitudes.

Inputs span many binades, fp32 subnormals included, up to 2^100 (not up to fp32's max: near 2^128
the SPEC's own dequantization q * scale can overflow fp32, e.g. MX "ceil" scales of amax ~ 2^128,
which is a property of the formulas, not of rounding).

Scales are recomputed by hand (numpy float32, SPEC section 2) and element codes are decoded through
ml_dtypes, so no property leans on qpass's own helpers. Runs are reproducible: derandomize=True.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from qpass import dequantize, fake_quantize, quantize

F32 = np.float32
F32_MAX = np.finfo(np.float32).max

# SPEC section 1: element -> (ml_dtypes type, max normal, emin, mantissa bits, emax).
# int8 is k/64 with |k| <= 127: one binade [1, 2) of step 2^-6 below which the step stays 2^-6.
ELEMENTS = {
    "fp8_e4m3": (ml_dtypes.float8_e4m3fn, 448.0, -6, 3, 8),
    "fp8_e5m2": (ml_dtypes.float8_e5m2, 57344.0, -14, 2, 15),
    "fp6_e3m2": (ml_dtypes.float6_e3m2fn, 28.0, -2, 2, 4),
    "fp6_e2m3": (ml_dtypes.float6_e2m3fn, 7.5, 0, 3, 2),
    "fp4_e2m1": (ml_dtypes.float4_e2m1fn, 6.0, 0, 1, 2),
    "int8": (None, 127 / 64, 0, 6, 0),
}
# SPEC section 5: format -> (element, scaling kind).
FORMATS = {
    **{e: (e, "absmax") for e in ("fp8_e4m3", "fp8_e5m2", "fp6_e2m3", "fp6_e3m2", "fp4_e2m1")},
    "mxfp8_e4m3": ("fp8_e4m3", "mx"),
    "mxfp8_e5m2": ("fp8_e5m2", "mx"),
    "mxfp6_e2m3": ("fp6_e2m3", "mx"),
    "mxfp6_e3m2": ("fp6_e3m2", "mx"),
    "mxfp4": ("fp4_e2m1", "mx"),
    "mxint8": ("int8", "mx"),
    "nvfp4": ("fp4_e2m1", "nvfp4"),
}
GRANULARITIES = [None, "tensor", "channel", ("block", 3), ("block", 8), ("block", 32)]
SCALE_MODES = ["floor", "ceil", "even", "rceil"]

PROPERTY_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


@st.composite
def cases(draw, formats=tuple(FORMATS), roundings=("rne",)):
    """A dict: x (fp32 numpy), fmt, axis and the quantize keyword options."""
    fmt = draw(st.sampled_from(formats))
    ndim = draw(st.integers(1, 3))
    axis = draw(st.integers(-ndim, ndim - 1))
    shape = [draw(st.integers(1, 4)) for _ in range(ndim)]
    shape[axis] = draw(st.integers(1, 70))  # odd lengths and several MX/NVFP4 blocks
    # Magnitudes 2^u with u uniform in [low, low + span]: from fp32 subnormals to 2^100.
    low = draw(st.integers(-150, 100))
    span = draw(st.integers(0, 80))
    zeros = draw(st.sampled_from([0.0, 0.2, 0.6]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    u = rng.uniform(low, min(low + span, 100), size=shape)
    x = np.exp2(u) * rng.choice([-1.0, 1.0], size=shape)
    x = np.where(rng.random(shape) < zeros, 0.0, x).astype(np.float32)

    options = {"rounding": draw(st.sampled_from(roundings))}
    kind = FORMATS[fmt][1]
    if kind == "absmax":
        granularity = draw(st.sampled_from(GRANULARITIES))
        if fmt == "fp4_e2m1" and granularity == ("block", 3):
            # Odd fp4 blocks are covered (and currently fail) in test_layout.py; kept out of here so
            # that the rounding properties are not masked by that packing error.
            granularity = ("block", 8)
        options["granularity"] = granularity
        options["pow2"] = draw(st.booleans())
    elif kind == "mx":
        options["scale_mode"] = draw(st.sampled_from(SCALE_MODES))
    if options["rounding"] == "stochastic":
        options["generator"] = draw(st.integers(0, 2**31 - 1))
    return {"x": x, "fmt": fmt, "axis": axis, "options": options}


# ---------------------------------------------------------------------------------------------
# Independent oracles
# ---------------------------------------------------------------------------------------------


def element_values(codes: torch.Tensor, element: str) -> np.ndarray:
    """fp32 element values of (packed) codes, decoded with ml_dtypes."""
    c = np.ascontiguousarray(codes.numpy())
    if element == "fp4_e2m1":  # element 2i low nibble, 2i+1 high nibble
        c = np.ascontiguousarray(np.stack([c & 0x0F, c >> 4], axis=-1).reshape(*c.shape[:-1], -1))
    if element == "int8":
        return c.view(np.int8).astype(np.float32) / 64
    return c.view(ELEMENTS[element][0]).astype(np.float32)


def floor_log2(a: np.ndarray) -> np.ndarray:
    """Exact floor(log2(a)) for a > 0 (fp32 subnormals included), via frexp."""
    _, exp = np.frexp(a)
    return exp - 1


def grid_step(s: np.ndarray, element: str) -> np.ndarray:
    """The grid step of ``element`` at the binade of each (unrounded) scaled value, in float64."""
    _, _, emin, mbits, _ = ELEMENTS[element]
    a = np.abs(s).astype(np.float64)
    binade = np.where(a > 0, floor_log2(np.where(a > 0, a, 1.0)), emin)
    return np.ldexp(1.0, np.maximum(binade, emin) - mbits)


def block_size(fmt: str, options: dict) -> int:
    element, kind = FORMATS[fmt]
    if kind == "mx":
        return 32
    if kind == "nvfp4":
        return 16
    granularity = options.get("granularity")
    if isinstance(granularity, tuple):
        return granularity[1]
    return 2 if element == "fp4_e2m1" else 1  # whole axis; fp4 pads to even length for packing


def grouped(x: np.ndarray, axis: int, fmt: str, options: dict) -> np.ndarray:
    """x with ``axis`` last, zero-padded per SPEC section 3, as [..., G, B] (G = 1 for tensor/channel)."""
    last = np.moveaxis(x, axis, -1)
    multiple = block_size(fmt, options)
    pad = -last.shape[-1] % multiple
    last = np.concatenate([last, np.zeros((*last.shape[:-1], pad), np.float32)], axis=-1)
    kind = FORMATS[fmt][1]
    if kind == "absmax" and not isinstance(options.get("granularity"), tuple):
        return last[..., None, :]
    return last.reshape(*last.shape[:-1], -1, multiple)


def absmax_encode(groups: np.ndarray, element: str, options: dict) -> np.ndarray:
    granularity = options.get("granularity") or "tensor"
    amax = np.abs(groups).max() if granularity == "tensor" else np.abs(groups).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", over="ignore"):
        encode = np.minimum(F32(ELEMENTS[element][1]) / amax, F32_MAX)  # fp32 division
    if options.get("pow2"):
        encode = np.ldexp(F32(1), floor_log2(encode)).astype(np.float32)
    return np.where(amax == 0, F32(1), encode).astype(np.float32)


def mx_codes(groups: np.ndarray, element: str, mode: str) -> np.ndarray:
    """E8M0 codes by the SPEC's four rules, for finite blocks, computed from frexp and float64."""
    _, max_normal, _, mbits, emax = ELEMENTS[element]
    amax = np.abs(groups).max(axis=-1)
    a = np.where(amax > 0, amax, F32(1))
    mantissa, exp = np.frexp(a)  # a = mantissa * 2^exp, mantissa in [0.5, 1)
    floor = exp - 1
    if mode == "floor":
        e = floor - emax
    elif mode == "ceil":
        e = np.where(mantissa == 0.5, floor, floor + 1) - emax
    elif mode == "even":  # mantissa in [1, 2) rounded half up to mbits fraction bits; may carry
        rounded = np.floor(mantissa.astype(np.float64) * 2 * 2**mbits + 0.5) / 2**mbits
        e = floor + (rounded >= 2) - emax
    else:  # rceil: d = amax / max_normal in fp32, then ceil(log2(d))
        d = a / F32(max_normal)
        d = np.where(d > 0, d, F32(2.0**-149))
        d_mantissa, d_exp = np.frexp(d)
        e = np.where(d_mantissa == 0.5, d_exp - 1, d_exp)
    e = np.clip(e, -127, 127)
    return np.where(amax > 0, e + 127, 0).astype(np.uint8)


def e4m3(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)


def hand_scaled(x: np.ndarray, axis: int, fmt: str, options: dict, qt) -> np.ndarray:
    """``x * encode`` in fp32, [..., K_padded], with encode computed by hand from the SPEC.

    Also checks the stored MX / NVFP4 scales against the hand computation along the way.
    """
    element, kind = FORMATS[fmt]
    groups = grouped(x, axis, fmt, options)
    if kind == "absmax":
        encode = absmax_encode(groups, element, options)
    elif kind == "mx":
        codes = mx_codes(groups, element, options["scale_mode"])
        np.testing.assert_array_equal(qt.scales.numpy(), codes)
        encode = np.ldexp(F32(1), 127 - codes.astype(np.int32))[..., None].astype(np.float32)
    else:  # nvfp4, SPEC section 2, each step an fp32 operation
        amax = np.abs(groups).max()
        g = F32(1) if amax == 0 else amax / F32(2688)
        # For tensors with amax below ~1e-35 the SPEC's g underflows or (1/g)/s_b overflows fp32,
        # and "scaled element units" mean nothing; EDGE_CASES checks those by their outcome.
        assume(g > 0)
        assert qt.tensor_scale.item() == g
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            ratio = (np.abs(groups).max(axis=-1) / F32(6)) / g
            s_b = e4m3(np.clip(ratio, F32(2.0**-6), F32(448)))
            stored = qt.scales.numpy().view(ml_dtypes.float8_e4m3fn).astype(np.float32)
            np.testing.assert_array_equal(stored, s_b)
            encode = (np.minimum(F32(1) / g, F32_MAX) / s_b)[..., None]
        assume(np.isfinite(encode).all())
    return (groups * encode).astype(np.float32).reshape(*groups.shape[:-2], -1)


def run(case, x=None):
    x = case["x"] if x is None else x
    return quantize(torch.from_numpy(x), case["fmt"], axis=case["axis"], **case["options"])


def dq(case, x=None) -> np.ndarray:
    return dequantize(run(case, x)).numpy()


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.int32), b.view(np.int32))


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------


def _tiny(*pairs, n=32):
    """A 1-D fp32 array of zeros with the given (index, value) pairs set."""
    x = np.zeros(n, np.float32)
    for i, v in pairs:
        x[i] = v
    return x


# Fixed extreme cases, checked against every property on each run (see the end of the file); kept out
# of @example so that a failing one does not stop the random examples from running.
EDGE_CASES = [
    # MX "even" with an fp32-subnormal block amax (rounding raw fp32 bits would lose it).
    {"x": _tiny((0, 2.0**-127)), "fmt": "mxfp8_e4m3", "axis": 0, "options": {"scale_mode": "even"}},
    # NVFP4 tensors with amax ~5e-39 (the factor (1/g)/s_b is clamped, a block with s_b < 1 must
    # still be finite) and ~3e-45 (g = amax / 2688 underflows fp32). g is an fp32 subnormal with
    # few significant bits, so s_b * g no longer reproduces the amax and a second quantization
    # picks other scales: NVFP4 cannot represent such tensors faithfully (docs/formats.md), and
    # only the outcome properties (finite, zeros stay zero) are asked of them.
    {"x": _tiny((0, 5e-39), (16, -7e-42)), "fmt": "nvfp4", "axis": 0, "options": {}, "scaled": False,
     "idempotent": False},
    {"x": _tiny((0, 3e-45)), "fmt": "nvfp4", "axis": 0, "options": {}, "scaled": False, "idempotent": False},
    # Absmax with an fp32-subnormal amax: encode clamped to the largest finite fp32.
    {"x": _tiny((3, -1e-40), (5, 2e-45), n=7), "fmt": "fp6_e3m2", "axis": 0, "options": {"pow2": False}},
]


def assert_finite_result(case):
    """Finite input gives finite output, zeros stay exactly zero: through dequantize and through
    fake_quantize (fp4/fp6/int8 codes cannot hold NaN, so dequantize alone could hide one)."""
    x = torch.from_numpy(case["x"])
    for out in (dequantize(run(case)), fake_quantize(x, case["fmt"], axis=case["axis"], **case["options"])):
        out = out.numpy()
        assert np.isfinite(out).all(), f"finite input quantized to {out[~np.isfinite(out)][:4]}"
        assert (out[case["x"] == 0] == 0).all()


def exactly_idempotent(case) -> bool:
    """Where SPEC arithmetic makes quantize(dequantize(quantize(x))) return exactly the same values.

    MX: y = q * 2^e is exact, and re-deriving e from y's block amax gives e again, or (ceil and
    rceil, when the largest element landed exactly on 2^(emax-1) or max/2) e - 1, where every
    element becomes 2q, still on the grid and <= max normal, so the values are the same. This holds
    for RNE in every scale mode, and for stochastic rounding in floor, ceil and rceil. Not for
    "even" with stochastic rounding on E4M3: a block amax that rounds (half up on the mantissa)
    into the next binade can come out as 240 * 2^e (stochastic rounding down), whose rounded
    mantissa does not carry, so e drops by one and 240 * 2 = 480 saturates to 448.
    Absmax with pow2=True: the scale is a power of two, the same argument applies (q_max is in
    [max/2, max]).
    Absmax with an arbitrary fp32 scale and NVFP4, RNE only: the group maximum lands on max normal
    (E2M1 6 for every NVFP4 block whose s_b is not clamped), and decode = 1/encode and the
    re-derived encode agree to within an ulp or two of fp32, so the values agree to that precision.
    With stochastic rounding there they need not agree at all: a block maximum scaled to ~5.9 may
    round down to 4, and the second pass then derives a different block scale.
    """
    _, kind = FORMATS[case["fmt"]]
    options = case["options"]
    if kind == "mx":
        return options["rounding"] == "rne" or options["scale_mode"] != "even"
    return kind == "absmax" and options["pow2"]


@PROPERTY_SETTINGS
@given(case=cases(roundings=("rne", "stochastic")))
def test_dequantize_quantize_is_idempotent(case):
    check_idempotent(case)


def check_idempotent(case):
    assert_finite_result(case)
    y = dq(case)
    y2 = dq(case, y)
    if exactly_idempotent(case):
        assert same_bits(y2, y)
    elif case["options"]["rounding"] == "rne":
        # Each element re-rounds to the same grid point; only the fp32 scale moves by a few ulps.
        np.testing.assert_allclose(y2, y, rtol=2.0**-20, atol=2.0**-140)


@PROPERTY_SETTINGS
@given(case=cases())
def test_rne_error_is_at_most_half_a_step(case):
    check_rne_error(case)


def scaled_and_quantized(case) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(x in element units by hand, qpass's element values, the grid step at each, max normal)."""
    element, _ = FORMATS[case["fmt"]]
    assert_finite_result(case)
    qt = run(case)
    s = hand_scaled(case["x"], case["axis"], case["fmt"], case["options"], qt).astype(np.float64)
    q = element_values(qt.codes, element).astype(np.float64)
    return s, q, grid_step(s, element), ELEMENTS[element][1]


def check_rne_error(case):
    s, q, step, max_normal = scaled_and_quantized(case)
    assert q.shape == s.shape
    in_range = np.abs(s) <= max_normal
    # In range: within half the grid step of the binade the scaled value lies in.
    err = np.abs(q - s)
    half_step = step / 2
    bad = in_range & (err > half_step)
    assert not bad.any(), (s[bad][:4], q[bad][:4])
    # Beyond max normal: the saturation error, i.e. exactly +-max normal.
    np.testing.assert_array_equal(q[~in_range], np.sign(s[~in_range]) * max_normal)


@PROPERTY_SETTINGS
@given(case=cases(roundings=("stochastic",)))
def test_stochastic_rounding_gives_a_neighbouring_grid_point(case):
    check_stochastic_neighbours(case)


def check_stochastic_neighbours(case):
    s, q, step, max_normal = scaled_and_quantized(case)
    # s / step is exact (a power-of-two scaling), so floor/ceil give the two grid neighbours.
    down = np.clip(np.floor(s / step) * step, -max_normal, max_normal)
    up = np.clip(np.ceil(s / step) * step, -max_normal, max_normal)
    ok = (q == down) | (q == up)
    assert ok.all(), (s[~ok][:4], q[~ok][:4])


@pytest.mark.parametrize("seed", [0, 1])
def test_stochastic_rounding_uses_both_neighbours(seed):
    # A sanity companion to the property: with a fraction of 0.5 both neighbours must appear.
    x = torch.full((4, 64), 1.25)  # E2M1 after scale 1 (amax 6): 1.25 -> 1 or 1.5
    x[:, 0] = 6.0
    q = element_values(quantize(x, "fp4_e2m1", rounding="stochastic", generator=seed).codes, "fp4_e2m1")
    values = set(q[:, 1:].ravel().tolist())
    assert values == {1.0, 1.5}


@pytest.mark.parametrize("case", EDGE_CASES, ids=lambda c: f"{c['fmt']}-{c['x'][c['x'] != 0][0]:.0e}")
def test_edge_cases_satisfy_the_properties(case):
    rne = {**case, "options": {"rounding": "rne", **case["options"]}}
    stochastic = {**case, "options": {"rounding": "stochastic", "generator": 0, **case["options"]}}
    if case.get("idempotent", True):
        check_idempotent(rne)  # includes: finite output, zeros stay zero
    assert_finite_result(rne)
    assert_finite_result(stochastic)
    if case.get("scaled", True):  # the SPEC's x * encode is finite here: element-unit properties
        check_rne_error(rne)
        check_stochastic_neighbours(stochastic)
