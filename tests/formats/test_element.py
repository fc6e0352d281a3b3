"""Exhaustive tests of the element formats (SPEC section 1): every code's value, the format
parameters, code round trips and the special-value encodings.

Oracles are independent of qpass: ml_dtypes' float8/float6/float4 types for the float formats,
two's complement worked out here for int8, and the SPEC section-1 table typed in by hand.
"""

from __future__ import annotations

import math

import ml_dtypes  # noqa: F401 -- the oracles need it: fail here, at import, if it is missing
import numpy as np
import pytest
import torch
from oracles import ALL_FORMATS, FLOAT_FORMATS, ML_DTYPE

from qpass.formats.element import ELEMENT_FORMATS, code_table, decode, encode, encode_by_bits
from qpass.formats.rounding import round_to_element

# SPEC section 1, typed in by hand (None where the SPEC table says "–").
SPEC_TABLE = {
    #            bits ebits mbits bias emax  max normal    min normal  min subnormal
    "fp8_e4m3": (8, 4, 3, 7, 8, 448.0, 2.0**-6, 2.0**-9),
    "fp8_e5m2": (8, 5, 2, 15, 15, 57344.0, 2.0**-14, 2.0**-16),
    "fp6_e3m2": (6, 3, 2, 3, 4, 28.0, 2.0**-2, 2.0**-4),
    "fp6_e2m3": (6, 2, 3, 1, 2, 7.5, 1.0, 2.0**-3),
    "fp4_e2m1": (4, 2, 1, 1, 2, 6.0, 1.0, 0.5),
    "int8": (8, None, None, None, 0, 127 / 64, None, 2.0**-6),
}


def n_codes(name: str) -> int:
    return 1 << SPEC_TABLE[name][0]


def all_codes(name: str) -> torch.Tensor:
    return torch.arange(n_codes(name), dtype=torch.uint8)


def int8_value(code: int) -> float:
    """MX int8: the two's complement byte k, times the implicit 2^-6."""
    k = code - 256 if code & 0x80 else code
    return k / 64


def expected_table(name: str) -> np.ndarray:
    """fp32 value of every code, computed without qpass."""
    if name == "int8":
        return np.array([int8_value(c) for c in range(256)], dtype=np.float32)
    codes = np.arange(n_codes(name), dtype=np.uint8)
    return codes.view(ML_DTYPE[name]).astype(np.float32)


def finite_codes(name: str) -> list[int]:
    table = expected_table(name)
    return [c for c in range(n_codes(name)) if np.isfinite(table[c])]


# --------------------------------------------------------------------------------------------
# Every code decodes to the independently computed value.


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_code_table_matches_reference_bit_for_bit(name):
    fmt = ELEMENT_FORMATS[name]
    table = code_table(fmt)
    assert table.dtype == torch.float32
    assert table.shape == (n_codes(name),)
    expected = torch.from_numpy(expected_table(name))
    got_nan, exp_nan = table.isnan(), expected.isnan()
    assert torch.equal(got_nan, exp_nan), f"NaN codes differ: {torch.nonzero(got_nan ^ exp_nan).flatten()}"
    # Compare the fp32 bits of the non-NaN codes, so -0 (sign code) vs +0 matters.
    ok = ~exp_nan
    assert torch.equal(table[ok].view(torch.int32), expected[ok].view(torch.int32))


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_decode_matches_reference(name):
    fmt = ELEMENT_FORMATS[name]
    # Shuffled and reshaped, so decode is checked as an elementwise lookup, not just on arange.
    perm = torch.randperm(n_codes(name), generator=torch.Generator().manual_seed(0))
    codes = all_codes(name)[perm].reshape(-1, 4 if n_codes(name) >= 16 else 2)
    got = decode(codes, fmt)
    assert got.dtype == torch.float32 and got.shape == codes.shape
    expected = torch.from_numpy(expected_table(name))[perm].reshape(codes.shape)
    assert torch.equal(got.isnan(), expected.isnan())
    ok = ~expected.isnan()
    assert torch.equal(got[ok].view(torch.int32), expected[ok].view(torch.int32))


def test_fp4_grid_is_the_spec_grid():
    # SPEC: "grid 0, .5, 1, 1.5, 2, 3, 4, 6" and E2M1 code = s<<3 | e<<1 | m.
    fmt = ELEMENT_FORMATS["fp4_e2m1"]
    grid = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    table = code_table(fmt).tolist()
    assert table[:8] == grid
    assert table[8:] == [-v for v in grid]
    assert math.copysign(1.0, table[8]) == -1.0  # code 0b1000 is -0
    for s in (0, 1):
        for e in range(4):
            for m in range(2):
                value = (m / 2) if e == 0 else (1 + m / 2) * 2.0 ** (e - 1)
                assert table[s << 3 | e << 1 | m] == (-value if s else value)


def test_int8_two_complement_by_hand():
    fmt = ELEMENT_FORMATS["int8"]
    table = code_table(fmt)
    assert table[0x00] == 0.0
    assert table[0x01] == 1 / 64
    assert table[0x40] == 1.0
    assert table[0x7F] == 127 / 64
    assert table[0xFF] == -1 / 64
    assert table[0xC0] == -1.0
    assert table[0x81] == -127 / 64
    assert table[0x80] == -2.0  # the code exists in the byte but is never produced (see below)


# --------------------------------------------------------------------------------------------
# SPEC section-1 parameters, against both the decoded table and the ElementFormat fields.


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_spec_table_against_decoded_values(name):
    bits, ebits, mbits, bias, emax, max_normal, min_normal, min_subnormal = SPEC_TABLE[name]
    table = expected_table(name).astype(np.float64)  # independent values
    got = code_table(ELEMENT_FORMATS[name]).double().numpy()
    for values in (table, got):
        finite = values[np.isfinite(values)]
        if name == "int8":
            finite = finite[finite != -2.0]  # code 0x80: exists in the byte, never produced
        assert finite.max() == max_normal
        assert finite.min() == -max_normal
        assert finite[finite > 0].min() == min_subnormal
        assert math.floor(math.log2(finite.max())) == emax
        if name != "int8":
            # The smallest normal is code (exp field 1, mantissa 0); the codes below it are the
            # subnormals, evenly spaced by the min subnormal.
            assert values[1 << mbits] == min_normal
            sub = values[: 1 << mbits]
            assert np.array_equal(sub, np.arange(1 << mbits) * min_subnormal)
            # bias: exponent field == bias, mantissa 0 encodes 1.0.
            assert values[bias << mbits] == 1.0
            # max normal is the largest finite positive code.
            pos = values[: 1 << (ebits + mbits)]
            assert pos[np.isfinite(pos)].max() == max_normal


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_spec_table_against_format_fields(name):
    bits, ebits, mbits, bias, emax, max_normal, min_normal, min_subnormal = SPEC_TABLE[name]
    fmt = ELEMENT_FORMATS[name]
    assert fmt.name == name
    assert fmt.bits == bits
    assert fmt.emax == emax
    assert fmt.max_normal == max_normal
    assert fmt.min_subnormal == min_subnormal
    if name == "int8":
        assert fmt.is_int
        assert not fmt.has_nan and not fmt.has_inf
    else:
        assert not fmt.is_int
        assert (fmt.ebits, fmt.mbits, fmt.bias) == (ebits, mbits, bias)
        assert fmt.min_normal == min_normal
        assert fmt.emin == 1 - bias


def test_spec_specials_per_format():
    flags = {n: (ELEMENT_FORMATS[n].has_nan, ELEMENT_FORMATS[n].has_inf) for n in ALL_FORMATS}
    assert flags == {
        "fp8_e4m3": (True, False),
        "fp8_e5m2": (True, True),
        "fp6_e2m3": (False, False),
        "fp6_e3m2": (False, False),
        "fp4_e2m1": (False, False),
        "int8": (False, False),
    }
    # E4M3FN: only S.1111.111 is NaN, no Inf.
    e4m3 = code_table(ELEMENT_FORMATS["fp8_e4m3"])
    assert torch.nonzero(e4m3.isnan()).flatten().tolist() == [0x7F, 0xFF]
    assert not e4m3.isinf().any()
    assert e4m3[0x7E] == 448.0 and e4m3[0xFE] == -448.0
    # E5M2: IEEE-style top binade.
    e5m2 = code_table(ELEMENT_FORMATS["fp8_e5m2"])
    assert torch.nonzero(e5m2.isnan()).flatten().tolist() == [0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF]
    assert e5m2[0x7C] == math.inf and e5m2[0xFC] == -math.inf
    assert torch.nonzero(e5m2.isinf()).flatten().tolist() == [0x7C, 0xFC]
    # fp6 / fp4 / int8: every code is finite.
    for name in ("fp6_e2m3", "fp6_e3m2", "fp4_e2m1", "int8"):
        assert code_table(ELEMENT_FORMATS[name]).isfinite().all(), name


# --------------------------------------------------------------------------------------------
# Round trips: encode(decode(code)) == code for every finite code.


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_every_finite_code_reencodes_to_itself(name):
    fmt = ELEMENT_FORMATS[name]
    codes = finite_codes(name)
    if name == "int8":
        # 0x80 (-2.0) is outside the symmetric int8 range: encode never has to produce it.
        codes.remove(0x80)
    codes_t = torch.tensor(codes, dtype=torch.uint8)
    back = encode(decode(codes_t, fmt), fmt)
    assert back.dtype == torch.uint8
    bad = [(hex(c), hex(b)) for c, b in zip(codes, back.tolist()) if c != b]
    assert not bad, f"code -> decode -> encode changed: {bad}"


@pytest.mark.parametrize("name", FLOAT_FORMATS)
def test_signed_zeros_have_distinct_codes(name):
    fmt = ELEMENT_FORMATS[name]
    sign_code = 1 << (SPEC_TABLE[name][0] - 1)
    zeros = torch.tensor([0.0, -0.0])
    assert encode(zeros, fmt).tolist() == [0, sign_code]


def test_int8_negative_zero_encodes_to_zero():
    # int8 has a single zero: -0.0 is k = 0, code 0x00.
    assert encode(torch.tensor([-0.0, 0.0]), ELEMENT_FORMATS["int8"]).tolist() == [0, 0]


def test_int8_code_0x80_is_never_produced():
    fmt = ELEMENT_FORMATS["int8"]
    # Everything that can reach the int8 element: values around -2 (the value of 0x80), far below it,
    # the whole range in fine steps, and fp32's extremes.
    x = torch.cat(
        [
            torch.linspace(-4.0, 4.0, 20001),
            torch.tensor([-2.0, -1.9921875, -1.984375, -1.98, -1.99, -2.0 + 2**-20, -1e30, -3.4028235e38]),
            torch.nextafter(torch.tensor([-2.0, -127 / 64, -127.5 / 64]), torch.tensor(-math.inf)),
            torch.nextafter(torch.tensor([-2.0, -127 / 64, -127.5 / 64]), torch.tensor(math.inf)),
        ]
    )
    for rounding in ("rne", "away", "stochastic"):
        g = torch.Generator().manual_seed(1)
        q = round_to_element(x, fmt, rounding, generator=g)
        assert q.min() == -127 / 64, rounding
        codes = encode(q, fmt)
        assert not (codes == 0x80).any(), f"{rounding}: encode produced 0x80 for {x[codes == 0x80][:5]}"
        # And the codes are exactly the two's complement of round(q * 64).
        expected = [(round(v * 64)) & 0xFF for v in q.tolist()]
        assert codes.tolist() == expected, rounding


# --------------------------------------------------------------------------------------------
# Specials.

NEG_NAN = torch.tensor([0xFFC00000 - (1 << 32)], dtype=torch.int32).view(torch.float32)  # NaN, sign set


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_nan_encodes_to_0x7f(name):
    fmt = ELEMENT_FORMATS[name]
    nans = torch.cat([torch.tensor([math.nan]), NEG_NAN])
    assert torch.isnan(nans).all() and nans.view(torch.int32)[1] < 0
    assert encode(nans, fmt).tolist() == [0x7F, 0x7F]


def test_e5m2_inf_codes():
    fmt = ELEMENT_FORMATS["fp8_e5m2"]
    codes = encode(torch.tensor([math.inf, -math.inf]), fmt)
    assert codes.tolist() == [0x7C, 0xFC]
    # Same bits as torch's own float8_e5m2.
    torch_codes = torch.tensor([math.inf, -math.inf]).to(torch.float8_e5m2).view(torch.uint8)
    assert codes.tolist() == torch_codes.tolist()
    assert decode(codes, fmt).tolist() == [math.inf, -math.inf]


def test_e4m3_inf_is_not_hidden():
    # E4M3FN has no Inf: encoding one must give a NaN code, never a finite value.
    fmt = ELEMENT_FORMATS["fp8_e4m3"]
    codes = encode(torch.tensor([math.inf, -math.inf]), fmt)
    assert decode(codes, fmt).isnan().all(), codes.tolist()


@pytest.mark.parametrize("name", ["fp6_e2m3", "fp6_e3m2", "fp4_e2m1", "int8"])
def test_formats_without_specials_encode_nonfinite_to_zero(name):
    fmt = ELEMENT_FORMATS[name]
    x = torch.cat([torch.tensor([math.nan, math.inf, -math.inf]), NEG_NAN])
    assert encode(x, fmt).tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_torch_casts_encode_and_decode_as_the_bits_do(name):
    """encode/decode take torch's float8 casts for the fp8 formats: the same codes as the definition
    for every code's value, both zeros, NaN of either sign, and Inf (a NaN code in E4M3)."""
    fmt = ELEMENT_FORMATS[name]
    codes = torch.arange(256, dtype=torch.uint8)
    values = torch.cat([code_table(fmt)[codes.long()],
                        torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf"), 0.0, -0.0])])
    assert torch.equal(encode(values, fmt), encode_by_bits(values, fmt))
    torch.testing.assert_close(
        decode(codes, fmt), code_table(fmt)[codes.long()], rtol=0, atol=0, equal_nan=True)
