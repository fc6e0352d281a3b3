"""The public numerics API (SPEC sections 2, 3, 5 and 7): quantize, dequantize, fake_quantize, qsnr.

Every expected number here is computed independently of qpass: scales with numpy float32
arithmetic straight from the SPEC formulas, element rounding with ml_dtypes casts (clipped first,
because ml_dtypes' float8 types overflow to NaN/Inf where qpass saturates), element codes decoded
through ml_dtypes views. Comparisons are bit for bit.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

import qpass
from qpass import dequantize, fake_quantize, qsnr, quantize

F32 = np.float32
F32_MAX = np.finfo(np.float32).max

# SPEC section 1, written out again so that no expectation reads qpass's own tables:
# element name -> (ml_dtypes type, max normal, emax).
ELEMENTS = {
    "fp8_e4m3": (ml_dtypes.float8_e4m3fn, 448.0, 8),
    "fp8_e5m2": (ml_dtypes.float8_e5m2, 57344.0, 15),
    "fp6_e3m2": (ml_dtypes.float6_e3m2fn, 28.0, 4),
    "fp6_e2m3": (ml_dtypes.float6_e2m3fn, 7.5, 2),
    "fp4_e2m1": (ml_dtypes.float4_e2m1fn, 6.0, 2),
    "int8": (None, 127 / 64, 0),
}
ABSMAX_FORMATS = ["fp8_e4m3", "fp8_e5m2", "fp6_e2m3", "fp6_e3m2", "fp4_e2m1"]
MX_FORMATS = {
    "mxfp8_e4m3": "fp8_e4m3",
    "mxfp8_e5m2": "fp8_e5m2",
    "mxfp6_e2m3": "fp6_e2m3",
    "mxfp6_e3m2": "fp6_e3m2",
    "mxfp4": "fp4_e2m1",
    "mxint8": "int8",
}
NAMED_FORMATS = ABSMAX_FORMATS + list(MX_FORMATS) + ["nvfp4"]  # SPEC section 5
ROUNDINGS = ["rne", "stochastic", "away"]
GRANULARITIES = ["tensor", "channel", ("block", 4), ("block", 16)]


# ---------------------------------------------------------------------------------------------
# Independent oracles
# ---------------------------------------------------------------------------------------------


def cast_rne(v: np.ndarray, element: str) -> np.ndarray:
    """Round fp32 values to ``element`` (RNE, satfinite) with ml_dtypes / plain numpy."""
    dtype, max_normal, _ = ELEMENTS[element]
    v = np.clip(np.asarray(v, np.float32), -max_normal, max_normal)  # satfinite
    if element == "int8":
        # np.round is half-to-even; + 0.0 because two's complement int8 has no -0.
        return (np.round(v * 64) / 64 + 0.0).astype(np.float32)
    return v.astype(dtype).astype(np.float32)


def element_values(codes: torch.Tensor, element: str) -> np.ndarray:
    """Decode a QTensor's (packed) codes to fp32 element values without qpass's decoder."""
    c = np.ascontiguousarray(codes.numpy())
    assert c.dtype == np.uint8
    if element == "fp4_e2m1":  # element 2i in the low nibble, 2i+1 in the high nibble
        c = np.ascontiguousarray(np.stack([c & 0x0F, c >> 4], axis=-1).reshape(*c.shape[:-1], -1))
    if element == "int8":
        return c.view(np.int8).astype(np.float32) / 64
    return c.view(ELEMENTS[element][0]).astype(np.float32)


def absmax_scales(amax, max_normal: float, pow2: bool = False):
    """SPEC section 2 absmax scales plus the decisions on zero, tiny and non-finite amax."""
    amax = np.asarray(amax, np.float32)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        encode = F32(max_normal) / amax  # an fp32 division
        encode = np.minimum(encode, F32_MAX)  # tiny amax: clamp to the largest finite fp32
        if pow2:  # round encode down to a power of two
            _, exp = np.frexp(encode)
            encode = np.ldexp(F32(1), exp - 1).astype(np.float32)
        encode = np.where(amax == 0, F32(1), encode)
        encode = np.where(np.isfinite(amax), encode, F32(np.nan)).astype(np.float32)
        decode = (F32(1) / encode).astype(np.float32)
    return encode, decode


def pad_last(x: np.ndarray, multiple: int) -> np.ndarray:
    pad = -x.shape[-1] % multiple
    return np.concatenate([x, np.zeros((*x.shape[:-1], pad), np.float32)], axis=-1) if pad else x


def absmax_oracle(x: np.ndarray, element: str, granularity, pow2: bool = False):
    """(dequantized, element values [..., K_pad], stored decode scales) for ``x`` along its last axis."""
    K = x.shape[-1]
    block = granularity[1] if isinstance(granularity, tuple) else None
    xp = pad_last(x, block or (2 if element == "fp4_e2m1" else 1))
    groups = xp.reshape(*xp.shape[:-1], -1, block) if block else xp[..., None, :]
    if granularity == "tensor":
        amax = np.abs(groups).max()
    else:
        amax = np.abs(groups).max(axis=-1, keepdims=True)
    encode, decode = absmax_scales(amax, ELEMENTS[element][1], pow2)
    with np.errstate(invalid="ignore"):
        q = cast_rne(groups * encode, element)
        y = (q * decode).astype(np.float32)
    y = y.reshape(*xp.shape)[..., :K]
    stored = decode if granularity == "tensor" else decode[..., 0]
    if granularity == "channel":
        stored = stored.reshape(*x.shape[:-1], 1)
    return y, q.reshape(xp.shape), stored


def mx_floor_oracle(x: np.ndarray, element: str):
    """(dequantized, E8M0 codes) of OCP MX 'floor' scaling of ``x`` along its last axis."""
    K = x.shape[-1]
    _, _, emax = ELEMENTS[element]
    groups = pad_last(x, 32).reshape(*x.shape[:-1], -1, 32)
    amax = np.abs(groups).max(axis=-1, keepdims=True)
    _, exp = np.frexp(np.where(amax > 0, amax, 1))  # amax = m * 2^exp, m in [0.5, 1)
    e = np.clip(exp - 1 - emax, -127, 127)
    q = cast_rne(np.ldexp(groups, -e).astype(np.float32), element)
    y = np.ldexp(q, e).astype(np.float32).reshape(*x.shape[:-1], -1)[..., :K]
    codes = np.where(amax > 0, e + 127, 0)[..., 0].astype(np.uint8)
    return y, codes


def to_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy()


def assert_same_bits(actual, expected):
    """Bitwise equality of fp32 arrays (so -0 != +0); NaNs only need to be NaN in the same places."""
    a = np.asarray(actual, np.float32)
    e = np.asarray(expected, np.float32)
    assert a.shape == e.shape, (a.shape, e.shape)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(e))
    keep = ~np.isnan(e)
    np.testing.assert_array_equal(a[keep].view(np.int32), e[keep].view(np.int32))


def sample(shape, seed=0, spread=True) -> np.ndarray:
    """Normal values; with ``spread`` each row gets its own magnitude so channels differ."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    if spread and len(shape) > 1:
        x = x * np.logspace(-3, 2, shape[0]).reshape(-1, *([1] * (len(shape) - 1)))
    return x.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Absmax scaling: tensor, channel, ("block", k)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("granularity", GRANULARITIES, ids=str)
@pytest.mark.parametrize("element", ABSMAX_FORMATS)
def test_absmax_matches_hand_scales(element, granularity, pow2, axis):
    x = sample((3, 10), seed=1)
    qt = quantize(torch.from_numpy(x), element, axis=axis, granularity=granularity, pow2=pow2)
    x_last = np.moveaxis(x, axis, -1)
    y_last, q, stored = absmax_oracle(x_last, element, granularity, pow2)

    assert qt.scales.dtype == torch.float32
    assert_same_bits(to_np(qt.scales), stored)
    assert_same_bits(element_values(qt.codes, element), q)
    assert_same_bits(to_np(dequantize(qt)), np.moveaxis(y_last, -1, axis))
    # fake_quantize takes the same path without codes.
    fq = fake_quantize(torch.from_numpy(x), element, axis=axis, granularity=granularity, pow2=pow2)
    assert_same_bits(to_np(fq), np.moveaxis(y_last, -1, axis))


@pytest.mark.parametrize("amax", [3.0, 6.0, 12.0, 0.9178991913795471])
def test_absmax_encode_is_one_fp32_division(amax):
    # SPEC section 2: encode = max_normal / amax in fp32, one correctly rounded division
    # (448 / 3 -> 149.33333), not 448 * fl(1 / 3) (-> 149.33334), which rounds twice.
    encode = F32(448) / F32(amax)
    qt = quantize(torch.tensor([amax, -amax / 2]), "fp8_e4m3")
    assert qt.scales.item() == F32(1) / encode


def test_absmax_worked_example_fp4():
    # amax 2.5: encode = fl32(6 / 2.5) = 2.4000000954, scaled 1.2, 2.4, 6.0 -> E2M1 1, 2, 6.
    qt = quantize(torch.tensor([0.5, 1.0, 2.5]), "fp4_e2m1")
    encode = F32(6) / F32(2.5)
    assert qt.scales.item() == F32(1) / encode
    # codes 2 (1.0), 4 (2.0), 7 (6.0), then the zero padding to even length.
    assert qt.codes.tolist() == [0x42, 0x07]
    assert dequantize(qt).tolist() == [float(F32(v) * (F32(1) / encode)) for v in (1, 2, 6)]


def test_absmax_worked_example_pow2():
    # amax 3: 448 / 3 = 149.33 rounds down to the power of two 128; every scaled value is on the
    # E4M3 grid, so the round trip is exact.
    x = torch.tensor([1.0, -2.0, 3.0])
    qt = quantize(x, "fp8_e4m3", pow2=True)
    assert qt.scales.item() == 2.0**-7
    elements = torch.tensor([128.0, -256.0, 384.0]).to(torch.float8_e4m3fn)
    assert qt.codes.tolist() == elements.view(torch.uint8).tolist()
    assert torch.equal(dequantize(qt), x)


@pytest.mark.parametrize("granularity", GRANULARITIES, ids=str)
@pytest.mark.parametrize("element", ABSMAX_FORMATS)
def test_all_zero_group(element, granularity):
    x = sample((3, 8), seed=2)
    x[1] = 0.0  # one whole channel (and, for blocks, whole blocks) of zeros
    qt = quantize(torch.from_numpy(x), element, granularity=granularity)
    out = to_np(dequantize(qt))
    assert_same_bits(out[1], np.zeros(8, np.float32))  # exact +0
    scales = to_np(qt.scales)
    if granularity != "tensor":
        assert (scales[1] == 1.0).all()
    all_zero = quantize(torch.zeros(2, 6), element, granularity=granularity)
    assert (to_np(all_zero.scales) == 1.0).all()
    assert_same_bits(to_np(dequantize(all_zero)), np.zeros((2, 6), np.float32))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("granularity", ["channel", ("block", 4)], ids=str)
@pytest.mark.parametrize("element", ABSMAX_FORMATS)
def test_non_finite_group_is_nan_and_isolated(element, granularity, bad):
    x = sample((3, 8), seed=3)
    x[1, 2] = bad
    qt = quantize(torch.from_numpy(x), element, granularity=granularity)
    out = to_np(dequantize(qt))
    scales = to_np(qt.scales)
    if granularity == "channel":
        assert np.isnan(scales[1]).all() and np.isfinite(scales[[0, 2]]).all()
        assert np.isnan(out[1]).all()  # the whole group, never a finite number or an Inf
        unaffected = out[[0, 2]], absmax_oracle(x[[0, 2]], element, "channel")[0]
    else:
        assert np.isnan(scales[1, 0]) and np.isfinite(scales[1, 1]) and np.isfinite(scales[[0, 2]]).all()
        assert np.isnan(out[1, :4]).all()
        unaffected = out[1, 4:], absmax_oracle(x[1:2, 4:], element, ("block", 4))[0][0]
    assert_same_bits(*unaffected)
    assert_same_bits(to_np(fake_quantize(torch.from_numpy(x), element, granularity=granularity)), out)


@pytest.mark.parametrize("element", ABSMAX_FORMATS)
def test_non_finite_tensor_granularity(element):
    x = torch.tensor([1.0, math.inf, 2.0])
    qt = quantize(x, element)
    assert math.isnan(qt.scales.item())
    assert dequantize(qt).isnan().all()


@pytest.mark.parametrize("fmt", list(MX_FORMATS))
def test_mx_zero_block_and_nan_block(fmt):
    x = sample((96,), seed=4, spread=False)
    x[32:64] = 0.0
    x[70] = math.nan
    qt = quantize(torch.from_numpy(x), fmt)
    assert qt.scales.dtype == torch.uint8
    assert qt.scales.tolist()[1:] == [0x00, 0xFF]
    out = to_np(dequantize(qt))
    assert_same_bits(out[32:64], np.zeros(32, np.float32))
    assert np.isnan(out[64:]).all()
    assert_same_bits(out[:32], mx_floor_oracle(x[:32], MX_FORMATS[fmt])[0])


@pytest.mark.parametrize("granularity", GRANULARITIES, ids=str)
@pytest.mark.parametrize("element", ABSMAX_FORMATS)
def test_fp32_subnormal_amax_absmax(element, granularity):
    # 448 / 1e-40 overflows fp32: encode is clamped to the largest finite fp32, zeros stay zero.
    x = np.array([[1e-40, 0.0, -3e-41, 0.0], [0.0, 2e-45, 0.0, -7e-42]], np.float32)
    out = to_np(fake_quantize(torch.from_numpy(x), element, granularity=granularity))
    assert np.isfinite(out).all()
    assert (out[x == 0] == 0).all()
    assert_same_bits(out, absmax_oracle(x, element, granularity)[0])


@pytest.mark.parametrize("fmt", NAMED_FORMATS)
def test_fp32_subnormal_amax_every_format(fmt):
    x = torch.tensor([[1e-40, 0.0, -3e-41, 0.0, 5e-39, 0.0], [0.0, 2e-45, 0.0, 0.0, -7e-42, 0.0]])
    out = dequantize(quantize(x, fmt))
    assert out.isfinite().all()
    assert (out[x == 0] == 0).all()
    assert fake_quantize(x, fmt).isfinite().all()


# ---------------------------------------------------------------------------------------------
# fake_quantize
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("fmt", NAMED_FORMATS)
def test_fake_quantize_is_dequantize_of_quantize(fmt, rounding):
    x = sample((4, 40), seed=5)
    x[0, :6] = [1e-7, -1e-7, -3e-6, 0.0, -0.0, 2e-30]  # values that round to (signed) zero
    xt = torch.from_numpy(x)
    fq = fake_quantize(xt, fmt, rounding=rounding, generator=1234)
    dq = dequantize(quantize(xt, fmt, rounding=rounding, generator=1234))
    # Bit for bit: the sign of zero included.
    assert_same_bits(to_np(fq), to_np(dq))
    # A torch.Generator seeded the same way gives the same draws as the int seed.
    g = torch.Generator().manual_seed(1234)
    assert_same_bits(to_np(fake_quantize(xt, fmt, rounding=rounding, generator=g)), to_np(fq))


@pytest.mark.parametrize("fmt", NAMED_FORMATS)
def test_fake_quantize_gradient_is_straight_through(fmt):
    x = torch.from_numpy(sample((3, 33), seed=6)).requires_grad_()
    y = fake_quantize(x, fmt)
    assert y.requires_grad
    upstream = torch.from_numpy(sample((3, 33), seed=7))
    y.backward(upstream)
    assert torch.equal(x.grad, upstream)


# ---------------------------------------------------------------------------------------------
# dtypes and ranks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", NAMED_FORMATS)
def test_dtype_preserved_and_half_inputs_equal_their_fp32_upcast(fmt, dtype):
    x = torch.from_numpy(sample((3, 40), seed=8)).to(dtype)
    qt = quantize(x, fmt)
    assert qt.dtype == dtype
    assert dequantize(qt).dtype == dtype
    assert fake_quantize(x, fmt).dtype == dtype
    # The upcast is exact, so codes and scales are those of the fp32 tensor, and the result is
    # the fp32 result rounded to the input dtype.
    qt32 = quantize(x.float(), fmt)
    assert torch.equal(qt.codes, qt32.codes)
    assert_same_bits(to_np(qt.scales), to_np(qt32.scales))
    assert_same_bits(to_np(dequantize(qt)), to_np(dequantize(qt32).to(dtype)))
    assert_same_bits(to_np(fake_quantize(x, fmt)), to_np(fake_quantize(x.float(), fmt).to(dtype)))


@pytest.mark.parametrize("fmt", NAMED_FORMATS)
def test_zero_dim_tensor(fmt):
    x = torch.tensor(-3.0)
    qt = quantize(x, fmt)
    assert qt.shape == torch.Size([])
    out = dequantize(qt)
    assert out.shape == torch.Size([])
    fq = fake_quantize(x, fmt)
    assert fq.shape == torch.Size([])
    assert_same_bits(to_np(out), to_np(fq))
    assert_same_bits(to_np(out), to_np(fake_quantize(x.reshape(1), fmt)[0]))
    if fmt in ABSMAX_FORMATS:
        assert_same_bits(to_np(out), absmax_oracle(np.array([-3.0], np.float32), fmt, "tensor")[0][0])
    elif fmt in MX_FORMATS:  # 3 = 1.5 * 2^1 is on every MX element grid after the power-of-two scale
        assert out.item() == -3.0
    else:
        assert out.item() == pytest.approx(-3.0, rel=1e-6)


@pytest.mark.parametrize("fmt", ABSMAX_FORMATS + list(MX_FORMATS))
def test_one_dim_tensor(fmt):
    x = sample((37,), seed=9, spread=False)
    out = to_np(dequantize(quantize(torch.from_numpy(x), fmt)))
    if fmt in MX_FORMATS:
        expected = mx_floor_oracle(x, MX_FORMATS[fmt])[0]
    else:
        expected = absmax_oracle(x, fmt, "tensor")[0]
    assert_same_bits(out, expected)
    assert_same_bits(to_np(dequantize(quantize(torch.from_numpy(x), fmt, axis=0))), expected)


@pytest.mark.parametrize("axis", [0, 2, -1])
@pytest.mark.parametrize("fmt", ABSMAX_FORMATS + list(MX_FORMATS))
def test_four_dim_tensor(fmt, axis):
    x = sample((2, 3, 35, 5), seed=10)
    x_last = np.moveaxis(x, axis, -1)
    if fmt in MX_FORMATS:
        y_last = mx_floor_oracle(x_last, MX_FORMATS[fmt])[0]
        qt = quantize(torch.from_numpy(x), fmt, axis=axis)
    else:
        y_last = absmax_oracle(x_last, fmt, "channel")[0]
        qt = quantize(torch.from_numpy(x), fmt, axis=axis, granularity="channel")
    assert qt.shape == x.shape and qt.axis == axis % 4
    assert_same_bits(to_np(dequantize(qt)), np.moveaxis(y_last, -1, axis))


def test_nvfp4_four_dim_is_finite_and_close():
    x = torch.from_numpy(sample((2, 3, 4, 16), seed=11))
    out = fake_quantize(x, "nvfp4", axis=2)
    assert out.shape == x.shape and out.isfinite().all()
    assert qsnr(x, out) > 15


# ---------------------------------------------------------------------------------------------
# qsnr
# ---------------------------------------------------------------------------------------------


def test_qsnr_equal_is_inf():
    x = torch.randn(10)
    assert qsnr(x, x.clone()) == math.inf


def test_qsnr_hand_examples():
    # ||x|| = 5, ||x - y|| = 0.5: 20 log10(10) = 20 dB.
    assert qsnr(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.5])) == pytest.approx(20.0, abs=1e-12)
    # ||x|| = 3, ||x - y|| = 1: 20 log10(3).
    val = qsnr(torch.tensor([1.0, 2.0, 2.0]), torch.tensor([1.0, 2.0, 1.0]))
    assert isinstance(val, float)
    assert val == pytest.approx(20 * math.log10(3), abs=1e-9)


@pytest.mark.parametrize("fmt", NAMED_FORMATS)
def test_qsnr_of_quantized_is_finite(fmt):
    x = torch.from_numpy(sample((4, 64), seed=12, spread=False))
    val = qsnr(x, fake_quantize(x, fmt))
    assert math.isfinite(val) and val > 5


def test_qsnr_orders_formats_by_precision():
    x = torch.from_numpy(sample((8, 64), seed=13, spread=False))
    assert qsnr(x, fake_quantize(x, "mxfp8_e4m3")) > qsnr(x, fake_quantize(x, "mxfp6_e2m3")) > qsnr(
        x, fake_quantize(x, "mxfp4")
    )


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

API = [quantize, fake_quantize]


@pytest.mark.parametrize("fn", API)
def test_unknown_format_lists_known_formats(fn):
    with pytest.raises(ValueError) as info:
        fn(torch.ones(4), "fp5_e3m1")
    message = str(info.value)
    assert "fp5_e3m1" in message
    for name in NAMED_FORMATS:
        assert name in message


@pytest.mark.parametrize("fn", API)
def test_unknown_rounding_lists_modes(fn):
    with pytest.raises(ValueError) as info:
        fn(torch.ones(4), "fp8_e4m3", rounding="nearest")
    for mode in ROUNDINGS:
        assert mode in str(info.value)


@pytest.mark.parametrize("fn", API)
def test_unknown_scale_mode_lists_modes(fn):
    with pytest.raises(ValueError) as info:
        fn(torch.ones(32), "mxfp4", scale_mode="round")
    for mode in ("floor", "ceil", "even", "rceil"):
        assert mode in str(info.value)


BAD_GRANULARITIES = ["row", "block", ("block",), ("block", 0), ("tile", 4), ("block", 2.5)]


@pytest.mark.parametrize("granularity", BAD_GRANULARITIES, ids=str)
@pytest.mark.parametrize("fn", API)
def test_unknown_granularity_lists_kinds(fn, granularity):
    with pytest.raises(ValueError) as info:
        fn(torch.ones(8), "fp8_e4m3", granularity=granularity)
    for kind in ("tensor", "channel", "block"):
        assert kind in str(info.value)


@pytest.mark.parametrize("fmt", list(MX_FORMATS) + ["nvfp4"])
@pytest.mark.parametrize("fn", API)
def test_granularity_on_fixed_block_formats_is_rejected(fn, fmt):
    with pytest.raises(ValueError):
        fn(torch.ones(32), fmt, granularity="tensor")


@pytest.mark.parametrize("fmt", ABSMAX_FORMATS + ["nvfp4"])
@pytest.mark.parametrize("fn", API)
def test_scale_mode_on_non_mx_is_rejected(fn, fmt):
    with pytest.raises(ValueError):
        fn(torch.ones(32), fmt, scale_mode="floor")


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool])
@pytest.mark.parametrize("fn", API)
def test_non_float_tensor_is_type_error(fn, dtype):
    with pytest.raises(TypeError):
        fn(torch.ones(8, dtype=dtype), "fp8_e4m3")


@pytest.mark.parametrize("shape,axis", [((4, 8), 2), ((4, 8), -3), ((8,), 1), ((), 1), ((), -2)])
@pytest.mark.parametrize("fn", API)
def test_axis_out_of_range_is_index_error(fn, shape, axis):
    with pytest.raises(IndexError):
        fn(torch.ones(shape), "mxfp4", axis=axis)


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 32)])
@pytest.mark.parametrize("fn", API)
def test_empty_tensor_is_value_error(fn, shape):
    with pytest.raises(ValueError):
        fn(torch.ones(shape), "mxfp4")


def test_top_level_names():
    for name in ("quantize", "dequantize", "fake_quantize", "qsnr", "QTensor"):
        assert hasattr(qpass, name), name
    assert qpass.quantize is quantize and qpass.dequantize is dequantize
    assert isinstance(quantize(torch.ones(4), "fp8_e4m3"), qpass.QTensor)
