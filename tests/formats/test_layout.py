"""Storage layout (SPEC sections 3 and 4): packing, padding, the quantization axis, shapes.

Codes are checked against hand-written bytes and against torch's own float8 casts / ml_dtypes;
shapes against the layout decided for QTensor (axis moved last, zero-padded along it).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qpass import dequantize, fake_quantize, quantize
from qpass.formats.element import ELEMENT_FORMATS
from qpass.formats.packing import pack_codes, pack_fp6, unpack_codes, unpack_fp6

ABSMAX_ELEMENTS = ["fp8_e4m3", "fp8_e5m2", "fp6_e2m3", "fp6_e3m2", "fp4_e2m1"]
MX_FORMATS = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4", "mxint8"]
NAMED_FORMATS = ABSMAX_ELEMENTS + MX_FORMATS + ["nvfp4"]


def _variants(block_sizes):
    """(format, quantize kwargs) for every named format, absmax ones at several granularities."""
    out = [(fmt, {}) for fmt in MX_FORMATS + ["nvfp4"]]
    for element in ABSMAX_ELEMENTS:
        out += [(element, {"granularity": "tensor"}), (element, {"granularity": "channel"})]
        for k in block_sizes:
            if element == "fp4_e2m1" and k % 2:
                continue  # odd fp4 blocks: see test_fp4_odd_block_size
            out.append((element, {"granularity": ("block", k)}))
        out.append((element, {"granularity": ("block", 4), "pow2": True}))
    return out


def _id(variant) -> str:
    fmt, kwargs = variant
    return "-".join([fmt, *(str(v) for v in kwargs.values())])


VARIANTS = _variants([4, 5, 16])


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.float().view(torch.int32)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.equal(bits(a), bits(b))


def sample(*shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    row_magnitudes = torch.logspace(-2, 2, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    return torch.randn(*shape, generator=g) * row_magnitudes


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


def test_fp4_packing_hand_example():
    # amax 6 gives encode 1, so the E2M1 codes are those of x itself:
    # 6 -> 0b0111, 0.5 -> 0b0001, -1 -> 0b1010, 3 -> 0b0101; element 2i low nibble, 2i+1 high.
    qt = quantize(torch.tensor([6.0, 0.5, -1.0, 3.0]), "fp4_e2m1")
    assert qt.codes.dtype == torch.uint8
    assert qt.codes.tolist() == [0x17, 0x5A]
    # Odd length: padded with a zero element (code 0) in the last high nibble.
    assert quantize(torch.tensor([6.0, 0.5, -1.0]), "fp4_e2m1").codes.tolist() == [0x17, 0x0A]
    # MX: amax 6 -> e = floor(log2 6) - 2 = 0, the same codes, padded to 32 elements.
    mx = quantize(torch.tensor([6.0, 0.5, -1.0, 3.0]), "mxfp4")
    assert mx.codes.tolist() == [0x17, 0x5A] + [0] * 14
    assert mx.scales.tolist() == [127]


def test_fp4_packing_agrees_with_ml_dtypes_codes():
    # pow2 scales, so dequantized / scale gives back the element values exactly.
    x = sample(4, 10, seed=1)
    qt = quantize(x, "fp4_e2m1", granularity="channel", pow2=True)
    values = dequantize(qt) / qt.scales
    codes = values.numpy().astype(ml_dtypes.float4_e2m1fn).view(np.uint8)
    expected = codes[:, 0::2] | (codes[:, 1::2] << 4)
    np.testing.assert_array_equal(qt.codes.numpy(), expected)


def test_fp4_pack_unpack_round_trip():
    fp4 = ELEMENT_FORMATS["fp4_e2m1"]
    every_byte = torch.arange(256, dtype=torch.uint8).reshape(4, 64)
    unpacked = unpack_codes(every_byte, fp4)
    assert unpacked.shape == (4, 128)
    assert torch.equal(unpacked[:, 0::2], every_byte & 0x0F)
    assert torch.equal(unpacked[:, 1::2], every_byte >> 4)
    assert torch.equal(pack_codes(unpacked, fp4), every_byte)
    nibbles = torch.randint(0, 16, (3, 2, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_codes(pack_codes(nibbles, fp4), fp4), nibbles)


@pytest.mark.parametrize("element", ["fp8_e4m3", "fp8_e5m2", "fp6_e2m3", "fp6_e3m2", "int8"])
def test_byte_formats_are_not_packed(element):
    fmt = ELEMENT_FORMATS[element]
    codes = torch.randint(0, 64, (3, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(pack_codes(codes, fmt), codes)
    assert torch.equal(unpack_codes(codes, fmt), codes)


def test_fp6_dense_packing_hand_example():
    """Four codes in a 24-bit little-endian word, code i in bits 6i..6i+5 (the ONNX export's fp6)."""
    codes = torch.tensor([[0x3F, 0x01, 0x20, 0x15, 0x07]], dtype=torch.uint8)
    word = 0x3F | 0x01 << 6 | 0x20 << 12 | 0x15 << 18
    packed = pack_fp6(codes)
    assert packed.tolist() == [[word & 0xFF, (word >> 8) & 0xFF, word >> 16, 0x07, 0, 0]]  # padded to 8 codes
    assert torch.equal(unpack_fp6(packed, 5), codes)


def test_fp6_dense_pack_unpack_round_trip():
    codes = torch.randint(0, 64, (3, 2, 41), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    packed = pack_fp6(codes)
    assert packed.shape == (3, 2, 33)  # ceil(41 / 4) * 3 bytes: 6 bits per code
    assert torch.equal(unpack_fp6(packed, 41), codes)


@pytest.mark.parametrize(
    "fmt,torch_dtype,max_normal",
    [("fp8_e4m3", torch.float8_e4m3fn, 448.0), ("fp8_e5m2", torch.float8_e5m2, 57344.0)],
)
def test_fp8_codes_are_torch_float8_bits(fmt, torch_dtype, max_normal):
    # With amax == max normal, encode is 1 and the codes are torch's own float8 bytes of x.
    x = torch.tensor([max_normal, 1.5, -2.0**-9, -3.25, 0.0, 2.0**-16, 100.0, -0.0])
    qt = quantize(x, fmt)
    assert qt.scales.item() == 1.0
    assert qt.codes.shape == x.shape
    assert torch.equal(qt.codes, x.to(torch_dtype).view(torch.uint8))
    # MX: amax = max normal gives e = 0 as well.
    mx = quantize(x, "mx" + fmt)
    assert torch.equal(mx.codes[:8], x.to(torch_dtype).view(torch.uint8))


@pytest.mark.parametrize(
    "fmt,ml_dtype", [("fp6_e2m3", ml_dtypes.float6_e2m3fn), ("fp6_e3m2", ml_dtypes.float6_e3m2fn)]
)
def test_fp6_codes_are_one_per_byte_low_six_bits(fmt, ml_dtype):
    x = sample(3, 9, seed=2)
    qt = quantize(x, fmt, granularity="channel", pow2=True)  # pow2: dequantized / scale is exact
    assert qt.codes.shape == x.shape and int(qt.codes.max()) < 64
    values = (dequantize(qt) / qt.scales).numpy()
    np.testing.assert_array_equal(qt.codes.numpy(), values.astype(ml_dtype).view(np.uint8))


# ---------------------------------------------------------------------------------------------
# Padding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rounding", ["rne", "away"])
@pytest.mark.parametrize("padded", [29, 64])
@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
def test_zero_padding_never_changes_the_unpadded_values(variant, padded, rounding):
    # Zero padding changes no amax (block, channel or, for NVFP4 and tensor granularity, the
    # tensor's), so the first K values must come out bit for bit the same.
    fmt, kwargs = variant
    x = sample(3, 13, seed=3)
    out = dequantize(quantize(x, fmt, rounding=rounding, **kwargs))
    out_padded = dequantize(quantize(F.pad(x, (0, padded - 13)), fmt, rounding=rounding, **kwargs))
    assert_same_bits(out_padded[:, :13], out)
    # The same along a leading quantization axis.
    out0 = dequantize(quantize(x.T, fmt, axis=0, rounding=rounding, **kwargs))
    out0_padded = dequantize(quantize(F.pad(x, (0, padded - 13)).T, fmt, axis=0, rounding=rounding, **kwargs))
    assert_same_bits(out0_padded[:13], out0)


def test_fp4_odd_block_size():
    # ("block", k) takes any k > 0 (SPEC section 7). With fp4 and an odd k the padded axis can be
    # odd, yet two codes share a byte: quantization must still work, and each block must come out
    # as that block quantized on its own.
    x = torch.tensor([[0.3, -1.0, 2.5, 4.0, 0.1, -0.2, 7.0], [1.0, 2.0, 3.0, -0.5, 0.25, 0.125, 9.0]])
    for length in (3, 7):
        out = dequantize(quantize(x[:, :length], "fp4_e2m1", granularity=("block", 3)))
        for start in range(0, length, 3):
            block = x[:, start : min(start + 3, length)]
            expected = fake_quantize(block, "fp4_e2m1", granularity="channel")
            assert_same_bits(out[:, start : start + block.shape[1]], expected)


# ---------------------------------------------------------------------------------------------
# The quantization axis
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, -2, 2])
@pytest.mark.parametrize("variant", _variants([4, 5]), ids=_id)
def test_axis_is_the_same_as_moving_it_last(variant, axis):
    fmt, kwargs = variant
    x = sample(3, 37, 5, seed=4)
    qa = quantize(x, fmt, axis=axis, **kwargs)
    qb = quantize(x.movedim(axis, -1).contiguous(), fmt, axis=-1, **kwargs)
    assert qa.axis == axis % 3 and qb.axis == 2
    assert qa.shape == x.shape
    assert torch.equal(qa.codes, qb.codes)
    assert qa.scales.dtype == qb.scales.dtype
    assert_same_bits(qa.scales, qb.scales)
    if fmt == "nvfp4":
        assert_same_bits(qa.tensor_scale, qb.tensor_scale)
    assert_same_bits(dequantize(qa), dequantize(qb).movedim(-1, axis))
    # fake_quantize handles the axis the same way (compared by value here: the sign of zero is
    # test_api.py's business).
    assert torch.equal(fake_quantize(x, fmt, axis=axis, **kwargs), dequantize(qa))


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------

# x is [3, 5, 7] quantized along axis 1, so the layout is [3, 7, K_padded] with K = 5.
SHAPES = [
    # format, kwargs, codes shape, scales shape, scales dtype
    ("fp8_e4m3", {}, (3, 7, 5), (), torch.float32),
    ("fp8_e5m2", {"granularity": "tensor"}, (3, 7, 5), (), torch.float32),
    ("fp4_e2m1", {}, (3, 7, 3), (), torch.float32),  # K padded to 6 for packing
    ("fp6_e2m3", {"granularity": "channel"}, (3, 7, 5), (3, 7, 1), torch.float32),
    ("fp4_e2m1", {"granularity": "channel"}, (3, 7, 3), (3, 7, 1), torch.float32),
    ("fp6_e3m2", {"granularity": ("block", 2)}, (3, 7, 6), (3, 7, 3), torch.float32),
    ("fp8_e4m3", {"granularity": ("block", 16)}, (3, 7, 16), (3, 7, 1), torch.float32),
    ("fp4_e2m1", {"granularity": ("block", 4)}, (3, 7, 4), (3, 7, 2), torch.float32),
    ("mxfp8_e4m3", {}, (3, 7, 32), (3, 7, 1), torch.uint8),
    ("mxfp6_e3m2", {}, (3, 7, 32), (3, 7, 1), torch.uint8),
    ("mxint8", {}, (3, 7, 32), (3, 7, 1), torch.uint8),
    ("mxfp4", {}, (3, 7, 16), (3, 7, 1), torch.uint8),
    ("nvfp4", {}, (3, 7, 8), (3, 7, 1), torch.uint8),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt,kwargs,codes_shape,scales_shape,scales_dtype", SHAPES, ids=lambda v: str(v))
def test_codes_and_scales_shapes(fmt, kwargs, codes_shape, scales_shape, scales_dtype, dtype):
    x = sample(3, 5, 7, seed=5).to(dtype)
    qt = quantize(x, fmt, axis=1, **kwargs)
    assert qt.codes.dtype == torch.uint8
    assert tuple(qt.codes.shape) == codes_shape
    assert tuple(qt.scales.shape) == scales_shape
    assert qt.scales.dtype == scales_dtype
    assert qt.shape == x.shape and qt.axis == 1 and qt.dtype == dtype
    if fmt == "nvfp4":
        assert qt.tensor_scale.shape == () and qt.tensor_scale.dtype == torch.float32
    assert dequantize(qt).shape == x.shape


@pytest.mark.parametrize(
    "fmt,length,codes_last,scales_last",
    [
        ("mxfp8_e5m2", 40, 64, 2),
        ("mxfp4", 40, 32, 2),
        ("mxfp4", 64, 32, 2),
        ("nvfp4", 40, 24, 3),
        ("nvfp4", 16, 8, 1),
    ],
)
def test_block_count_is_ceil_of_length(fmt, length, codes_last, scales_last):
    qt = quantize(sample(2, length, seed=6), fmt)
    assert tuple(qt.codes.shape) == (2, codes_last)
    assert tuple(qt.scales.shape) == (2, scales_last)


@pytest.mark.parametrize("fmt,expected", [("mxfp4", 4.25), ("mxfp6_e2m3", 6.25), ("mxfp8_e4m3", 8.25)])
@pytest.mark.parametrize("length", [32, 64, 96])
def test_bits_per_element_of_mx(fmt, expected, length):
    # One 8-bit E8M0 scale per 32 elements: 8 / 32 = 0.25 bits on top of the element width.
    qt = quantize(sample(4, length, seed=7), fmt)
    assert qt.bits_per_element() == expected
