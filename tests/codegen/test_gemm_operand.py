"""The GEMM-operand kernel (:mod:`qpass.codegen.gemm_operand`) against the reference
:func:`qpass.gemm_operand.quantize_for_gemm`, bit for bit, in both orientations, in Triton's
interpreter on the CPU.

"The same": codes as bytes (and the same dtype: float8 for the fp8 formats, uint8 otherwise), E8M0
and E4M3 scale codes exactly, fp32 scales and NVFP4's global scale as bits, except that a NaN scale
matches any NaN (SPEC section 3 says a non-finite group dequantizes to NaN, not which NaN).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # the qpass[triton] extra

from qpass.codegen.gemm_operand import quantize_for_gemm  # noqa: E402
from qpass.formats.swizzle import swizzle_scales  # noqa: E402
from qpass.gemm_operand import GemmOperand  # noqa: E402
from qpass.gemm_operand import quantize_for_gemm as reference  # noqa: E402
from qpass.quantizer import Quantizer  # noqa: E402

# The interpreter evaluates both sides of every tl.where (0 / 0 for a zero group, NaN to int casts).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

QUANTIZERS = [
    Quantizer("fp8_e4m3"), Quantizer("fp8_e5m2"), Quantizer("fp4_e2m1"),
    Quantizer("fp8_e4m3", granularity="channel"), Quantizer("fp8_e5m2", granularity="channel", pow2=True),
    Quantizer("mxfp8_e4m3"),
    Quantizer("mxfp8_e4m3", scale_mode="rceil"), Quantizer("mxfp8_e5m2", scale_mode="even"),
    Quantizer("mxfp4"), Quantizer("mxfp4", scale_mode="ceil"), Quantizer("mxfp6_e2m3"), Quantizer("mxint8"),
    Quantizer("nvfp4"), Quantizer("nvfp4", scale_mode="4over6"),
    Quantizer("fp4_e2m1", granularity=("block", 16)), Quantizer("fp6_e3m2", granularity="channel"),
]


def assert_same_operand(got: GemmOperand, expected: GemmOperand) -> None:
    assert got.codes.dtype == expected.codes.dtype and got.codes.shape == expected.codes.shape
    different = got.codes.view(torch.uint8) != expected.codes.view(torch.uint8)
    assert not different.any(), f"{int(different.sum())} of {different.numel()} code bytes differ"
    assert got.length == expected.length and got.quantizer == expected.quantizer
    assert_same_scales(got.scales, expected.scales)
    assert (got.global_scale is None) == (expected.global_scale is None)
    if expected.global_scale is not None:
        assert_same_scales(got.global_scale, expected.global_scale)


def assert_same_scales(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert (got.dtype, got.shape) == (expected.dtype, expected.shape)
    if expected.dtype == torch.uint8:
        assert torch.equal(got, expected), f"{int((got != expected).sum())} scale codes differ"
        return
    nan = expected.isnan()
    assert torch.equal(got.isnan(), nan), "NaN scales in different places"
    different = (got.view(torch.int32) != expected.view(torch.int32)) & ~nan
    assert not different.any(), f"{int(different.sum())} fp32 scales differ"


def assert_matches(x: torch.Tensor, quantizer: Quantizer, axis: int = -1) -> None:
    """One pass, both orientations, each equal to the reference's operand along its own axis."""
    along, other = quantize_for_gemm(x, quantizer, axis, transposed=True)
    assert_same_operand(along, reference(x, quantizer, axis))
    assert_same_operand(other, reference(x, quantizer, -1 if axis % x.ndim == x.ndim - 2 else -2))


# ---- inputs --------------------------------------------------------------------------------------


def ties(quantizer: Quantizer, rows: int, cols: int, exponent: int = -3, seed: int = 0) -> torch.Tensor:
    """Exact ties in both orientations. Where ``(r + c) % 16 == 0`` the element is ``max_normal *
    2^exponent`` (MX int8: 2^exponent), the amax of every row, column and block that holds one, so
    their encode factors are exactly 2^-exponent. NVFP4: one ``2688 * 2^exponent`` makes g =
    2^exponent, and block amaxes of ``6 * 2^exponent`` then have s_b = 1. The rest are odd
    multiples of half a grid step times 2^exponent: halfway between two elements, in the normal
    binades and the subnormal one."""
    gen = torch.Generator().manual_seed(seed)
    element = quantizer.spec.element
    if element.is_int:
        anchor = 1.0
        values = (torch.randint(0, 64, (rows, cols), generator=gen) * 2 + 1).float() / 128
    else:
        anchor, mbits = element.max_normal, element.mbits
        binade = torch.randint(element.emin - 1, element.emax, (rows, cols), generator=gen)
        odd = torch.randint(2 ** (mbits + 1), 2 ** (mbits + 2), (rows, cols), generator=gen) | 1
        normal = odd.float() * torch.exp2((binade - mbits - 1).float())
        subnormal = (torch.randint(0, 2**mbits, (rows, cols), generator=gen) * 2 + 1).float()
        values = torch.where(binade < element.emin, subnormal * 2.0 ** (element.emin - mbits - 1), normal)
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    values = torch.where((r + c) % 16 == 0, anchor, values)
    if quantizer.spec.scaling == "nvfp4":
        values[0, 1] = 2688.0
    signs = torch.randint(0, 2, (rows, cols), generator=gen).float() * 2 - 1
    return values * signs * 2.0**exponent


def hard_cases(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Wide dynamic range, block maxima with a mantissa of nearly 2 (saturation under floor
    scales), fp32 subnormals and values near fp32's smallest normal (E8M0's clamp), zero blocks
    with -0.0 in both orientations, an all -0.0 row."""
    gen = torch.Generator().manual_seed(seed)
    exponents = torch.randint(-30, 20, (rows, cols), generator=gen).float()
    x = torch.randn(rows, cols, generator=gen) * torch.exp2(exponents)
    # Saturating rows: every element's mantissa is nearly 2, above any max normal's.
    x[::5] = (2 - 2.0**-7) * torch.exp2(torch.randint(-20, 10, (cols,), generator=gen).float())
    x[1::7] = torch.randint(1, 2**23, (len(range(1, rows, 7)), cols), generator=gen).float() * 2.0**-149
    x[2::9] = (1 + torch.rand(len(range(2, rows, 9)), cols, generator=gen)) * 2.0**-126
    x[:, 32:64] = 0.0  # zero blocks along the rows
    x[:, 40:64:3] = -0.0
    x[3] = -0.0
    x[32:64, :] = torch.where(x[32:64, :] > 0, 0.0, -0.0)  # zero blocks along the columns
    return x


def with_specials(x: torch.Tensor) -> torch.Tensor:
    """NaN, +Inf and -Inf in a few groups."""
    x = x.clone()
    x[0, 1], x[4, 40], x[9, 3] = float("nan"), float("inf"), float("-inf")
    return x


# ---- bit for bit ---------------------------------------------------------------------------------


@pytest.mark.parametrize("quantizer", QUANTIZERS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ties_both_orientations(quantizer, dtype):
    assert_matches(ties(quantizer, 70, 45).to(dtype), quantizer)


@pytest.mark.parametrize("quantizer", QUANTIZERS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_hard_cases_both_orientations(quantizer, dtype):
    assert_matches(hard_cases(67, 97).to(dtype), quantizer)


@pytest.mark.parametrize("quantizer", QUANTIZERS, ids=str)
def test_nan_and_inf(quantizer):
    x = with_specials(hard_cases(40, 45))  # one tile: the NaN and Infs are what is tested here
    assert_matches(x, quantizer)
    assert_matches(x.bfloat16(), quantizer)


@pytest.mark.parametrize("quantizer", [Quantizer("fp8_e4m3", granularity="channel"), Quantizer("mxfp4")],
                         ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (3, 130), (130, 3), (33, 64)])
def test_odd_shapes(quantizer, shape):
    assert_matches(torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 100, quantizer)


@pytest.mark.parametrize("quantizer", [Quantizer("fp8_e5m2", granularity="channel"), Quantizer("mxfp8_e4m3")],
                         ids=str)
def test_axis_layouts(quantizer):
    """Along axis 0 (the primary operand then is ``xᵀ``), a strided fp16 view, a 3-d batch of
    matrices (each transposed on its own), a single orientation along an inner axis of a 3-d tensor."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(40, 75, generator=gen) * 3
    assert_matches(x, quantizer, axis=0)
    assert_matches(x.half().t(), quantizer, axis=-1)
    assert_matches(torch.randn(2, 20, 37, generator=gen), quantizer, axis=-1)
    assert_matches(torch.randn(2, 20, 37, generator=gen), quantizer, axis=1)
    y = torch.randn(3, 33, 4, generator=gen)
    assert_same_operand(quantize_for_gemm(y, quantizer, 1), reference(y, quantizer, 1))
    v = torch.randn(50, generator=gen)
    assert_same_operand(quantize_for_gemm(v, quantizer, 0), reference(v, quantizer, 0))


def test_per_tensor_codes_are_shared_transposed():
    x = ties(Quantizer("fp8_e4m3"), 70, 45)
    along, other = quantize_for_gemm(x, Quantizer("fp8_e4m3"), -1, transposed=True)
    assert torch.equal(along.codes.view(torch.uint8).t(), other.codes.view(torch.uint8))
    assert along.scales.data_ptr() == other.scales.data_ptr()  # one amax, one scale


@pytest.mark.parametrize("quantizer", [Quantizer("mxfp8_e4m3"), Quantizer("mxfp4"), Quantizer("nvfp4")],
                         ids=str)
def test_swizzled_scales(quantizer):
    x = hard_cases(150, 70)
    along, other = quantize_for_gemm(x, quantizer, -1, transposed=True, swizzle=True)
    for got, axis in ((along, -1), (other, 0)):
        expected = reference(x, quantizer, axis)
        assert torch.equal(got.scales, swizzle_scales(expected.scales))
        assert torch.equal(got.codes.view(torch.uint8), expected.codes.view(torch.uint8))
    plain = quantize_for_gemm(x, Quantizer("fp8_e4m3", granularity="channel"), -1, swizzle=True)
    assert plain.scales.shape == (150, 1)  # per-row scales have a single layout


# ---- what the kernel does not do -----------------------------------------------------------------


@pytest.mark.parametrize(("quantizer", "dtype", "match"), [
    (Quantizer("mxfp4", rounding="stochastic"), torch.float32, "mxfp4.*rounding='stochastic'"),
    (Quantizer("fp8_e4m3", rounding="away"), torch.float32, "fp8_e4m3.*rounding='away'"),
    (Quantizer("nvfp4", granularity=("tile", 16)), torch.float32, r"nvfp4\(16x16\).*tiles"),
    (Quantizer("fp8_e4m3", granularity=("block", 24)), torch.float32, "blocks of 24"),
    (Quantizer("fp8_e4m3"), torch.float64, "float64"),
], ids=str)
def test_unsupported_is_named(quantizer, dtype, match):
    with pytest.raises(NotImplementedError, match=match):
        quantize_for_gemm(torch.ones(4, 32, dtype=dtype), quantizer, -1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="transposed=True"):
        quantize_for_gemm(torch.ones(32), Quantizer("mxfp4"), 0, transposed=True)
    with pytest.raises(ValueError, match="transposed=True"):
        quantize_for_gemm(torch.ones(2, 3, 32), Quantizer("mxfp4"), 0, transposed=True)
    with pytest.raises(ValueError, match="swizzled"):
        quantize_for_gemm(torch.ones(4, 32), Quantizer("fp8_e4m3", granularity=("block", 32)), -1,
                          swizzle=True)
