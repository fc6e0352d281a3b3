"""The generated quantize, fake-quantize and dequantize kernels (:mod:`qpass.codegen.quantize`)
against qpass's plain-torch reference (:mod:`qpass.formats`, itself checked against independent
oracles in tests/formats), bit for bit, in Triton's interpreter on the CPU (on a GPU where there is one).

What "the same" means here: element codes, E8M0/E4M3 scale codes and fp32 scales, NVFP4's tensor
scale, fake-quantized and dequantized values all compare as bits. NaNs compare by position only:
SPEC section 3 says a group with a non-finite value dequantizes to NaN, not which NaN, and the sign
of a NaN that comes out of a multiply is whichever operand the hardware propagates (a GPU gives a
canonical NaN). The stored NaN *codes* (E4M3/E5M2 0x7F, E8M0 0xFF) do compare exactly.

Covered: every named format with every option that changes its numerics (absmax granularity and
pow2, each MX scale_mode, NVFP4 1x16 blocks and 16x16 tiles, each with its default block scales and
with 4over6's), rounding rne and away, along axis -1
and (through a transposed view) axis 0, on inputs built to hit the corners: exact ties, saturation
under floor scales, fp32 subnormals and extremes, NaN/Inf, zero blocks and -0.0; ragged lengths, 0-d
to 4-d tensors along every kind of axis, strided views, bf16 and fp16. Stochastic rounding draws
Philox numbers (``tl.rand``), not torch's stream, so it is checked by its contract instead:
reproducible per seed, always one of the two grid neighbours, unbiased. The fused block Hadamard is
bit-exact: on small integers, where the rotation is exact in any summation order (16- and 64-point
blocks, whose 1/sqrt(b) is a power of two), and on any input, since it sums in the reference's order.

Shapes stay small (the interpreter runs each 16 x 128 tile as numpy code, ~20 ms a program).
"""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")  # the qpass[triton] extra

from triton.runtime.errors import InterpreterError  # noqa: E402

import qpass  # noqa: E402
from qpass import codegen  # noqa: E402
from qpass.codegen.spec import kernel_spec, unsupported  # noqa: E402
from qpass.codegen.tuning import INTERPRETING  # noqa: E402
from qpass.formats import NAMED_FORMATS, FormatSpec, nvfp4  # noqa: E402
from qpass.formats.element import decode  # noqa: E402
from qpass.formats.grouping import to_groups  # noqa: E402
from qpass.formats.packing import unpack_codes  # noqa: E402
from qpass.formats.rounding import grid_step  # noqa: E402
from qpass.formats.scaling import compute_scales  # noqa: E402
from qpass.quantizer import Quantizer  # noqa: E402
from qpass.rotation import Rotation  # noqa: E402

# The interpreter evaluates both sides of every tl.where in numpy, warning about the branch not taken
# (0 / 0 for an all-zero group's scale, casts of NaN to int).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

ABSMAX = [name for name, spec in NAMED_FORMATS.items() if spec.scaling == "absmax"]
MX = [name for name, spec in NAMED_FORMATS.items() if spec.scaling == "mx"]
GRANULARITIES = ["tensor", "channel", ("block", 32)]
SCALE_MODES = ["floor", "ceil", "even", "rceil"]


def every_quantizer(rounding: str) -> list[Quantizer]:
    """Every named format with each option that changes its numerics."""
    return (
        [
            Quantizer(f, granularity=g, pow2=p, rounding=rounding)
            for f in ABSMAX for g in GRANULARITIES for p in (False, True)
        ]
        + [Quantizer(f, scale_mode=m, rounding=rounding) for f in MX for m in SCALE_MODES]
        + [
            Quantizer("nvfp4", granularity=g, scale_mode=m, rounding=rounding)
            for g in (None, ("tile", 16)) for m in (None, "4over6")
        ]
    )


RNE = every_quantizer("rne")
ALL = RNE + every_quantizer("away")
# One of each scaling and granularity, for the tests that vary the input's layout rather than the format.
FAMILIES = [
    Quantizer("mxfp4"), Quantizer("mxfp8_e4m3", scale_mode="rceil"), Quantizer("mxint8"),
    Quantizer("nvfp4"), Quantizer("nvfp4", granularity=("tile", 16)),
    Quantizer("fp8_e4m3"), Quantizer("fp8_e5m2", granularity="channel"),
    Quantizer("fp4_e2m1", granularity=("block", 16)),
    Quantizer("nvfp4", scale_mode="4over6"),
    Quantizer("nvfp4", granularity=("tile", 16), scale_mode="4over6"),
]


# ---- comparisons ---------------------------------------------------------------------------------


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def assert_same_values(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype, shape and bits; NaNs in the same places (any NaN)."""
    assert (got.dtype, got.shape) == (expected.dtype, expected.shape)
    if not expected.is_floating_point():
        assert torch.equal(got, expected)
        return
    nan = expected.isnan().reshape(-1)
    assert torch.equal(got.isnan().reshape(-1), nan), "NaN in different places"
    different = (bits(got) != bits(expected)) & ~nan
    if different.any():
        first = different.nonzero()[0].item()
        raise AssertionError(f"{int(different.sum())} of {nan.numel()} values differ, the first at {first}")


def assert_same_qtensor(got: qpass.QTensor, expected: qpass.QTensor) -> None:
    assert (got.shape, got.axis, got.dtype) == (expected.shape, expected.axis, expected.dtype)
    assert got.format == expected.format
    differ = int((got.codes != expected.codes).sum()) if got.codes.shape == expected.codes.shape else "all"
    assert torch.equal(got.codes, expected.codes), f"{differ} code bytes differ"
    assert_same_values(got.scales, expected.scales)
    assert (got.tensor_scale is None) == (expected.tensor_scale is None)
    if expected.tensor_scale is not None:
        assert_same_values(got.tensor_scale, expected.tensor_scale)


def assert_kernels_match(x: torch.Tensor, quantizer: Quantizer, axis: int = -1) -> None:
    """quantize, fake_quantize and dequantize (of the reference's QTensor) give the reference's bits."""
    expected = qpass.quantize(x, quantizer.spec, axis, rounding=quantizer.rounding)
    assert_same_qtensor(codegen.quantize(x, quantizer, axis), expected)
    assert_same_values(codegen.fake_quantize(x, quantizer, axis), quantizer(x, axis))
    assert_same_values(codegen.dequantize(expected), qpass.dequantize(expected))


def element_values(qt: qpass.QTensor, like: torch.Tensor) -> torch.Tensor:
    """A QTensor's elements (decoded codes, element units) shaped like the groups ``like``."""
    element = qt.format.element
    return decode(unpack_codes(qt.codes, element), element).reshape(like.shape)


def scaled_groups(x: torch.Tensor, spec: FormatSpec, axis: int = -1) -> torch.Tensor:
    """``x`` in element units as the reference scales it, ``[..., G, B]``: what rounding rounds."""
    length = x.shape[axis]
    groups = to_groups(x.float(), axis % x.ndim, spec.padded_length(length), spec.group_size(length))
    return groups * compute_scales(groups, spec).encode


# ---- inputs --------------------------------------------------------------------------------------


def anchor(spec: FormatSpec) -> float:
    """A group amax for which every scaling's encode factor is 1 (MX: e = 0; absmax: max normal /
    amax). NVFP4: s_b = 1 where the tensor amax is 2688 (g = 1); alone, g = 6 / 2688 and s_b = 448
    (4over6: 1536, and s_b = 1 or 1.5; alone, s_b = 256 or 384)."""
    if spec.scaling == "nvfp4":
        return 6.0
    return 1.0 if spec.element.is_int else spec.element.max_normal


def corner_cases(spec: FormatSpec, exponent: int = 3, seed: int = 0) -> torch.Tensor:
    """16 x 100 fp32 (100: a ragged last block of 16 and of 32).

    Rows 0-7: exact ties. Every 16th element is ``anchor * 2^exponent``, the amax of every group
    (tensor, row, block, tile), so every encode factor is the power of two 2^-exponent (also after
    MX ceil/even/rceil, which move it by at most one binade) and the other elements, odd multiples
    of half a grid step times 2^exponent, land exactly halfway between two grid points (in the
    normal binades and the subnormal one; int8: k/128 for odd k). NVFP4 gets a 2688 * 2^exponent
    (4over6: 1536 * 2^exponent) too, so that g = 2^exponent. Rows 8-15, all below half the anchor
    (so the tensor amax stays the anchor): a wide dynamic range, block maxima with a mantissa of
    nearly 2 (saturation under floor scales), fp32 subnormals, a normal/subnormal mix, zero blocks
    with -0.0, an all -0.0 row, values just above fp32's smallest normal (the E8M0 exponent's clamp
    at -127), plain randn.
    """
    gen = torch.Generator().manual_seed(seed)
    element = spec.element
    top = anchor(spec) * 2.0**exponent
    emax = math.floor(math.log2(anchor(spec)))  # the anchor's binade
    x = torch.empty(16, 100)
    signs = torch.randint(0, 2, (16, 100), generator=gen).float() * 2 - 1

    mbits = element.mbits
    if element.is_int:
        ties = (torch.randint(0, 64, (8, 100), generator=gen) * 2 + 1).float() / 128
    else:
        # In binade b >= emin the step is 2^(b - mbits): midpoints are odd multiples of 2^(b - mbits - 1)
        # in [2^b, 2^(b + 1)); below 2^emin (binade emin - 1 here) the step stays 2^(emin - mbits).
        binade = torch.randint(element.emin - 1, emax, (8, 100), generator=gen)
        odd = torch.randint(2 ** (mbits + 1), 2 ** (mbits + 2), (8, 100), generator=gen) | 1
        normal = odd.float() * torch.exp2((binade - mbits - 1).float())
        odd_subnormal = torch.randint(0, 2**mbits, (8, 100), generator=gen) * 2 + 1
        subnormal = odd_subnormal.float() * 2.0 ** (element.emin - mbits - 1)
        ties = torch.where(binade < element.emin, subnormal, normal)
    x[:8] = ties * 2.0**exponent
    x[:8, ::16] = top
    if spec.scaling == "nvfp4":
        x[0, 1] = nvfp4.global_divisor(spec.scale_mode) * 2.0**exponent

    half = top / 2
    x[8] = half * torch.rand(100, generator=gen) * 2.0 ** -torch.randint(0, 25, (100,), generator=gen).float()
    mantissa = 1 + torch.rand(100, generator=gen)
    mantissa[::16] = 2 - 2.0**-7  # block maxima above any max normal's mantissa (int8: 1.984), bf16-exact
    block_exponent = torch.randint(-12, 1, (7,), generator=gen).repeat_interleave(16)[:100]
    x[9] = mantissa * torch.exp2((block_exponent + exponent + emax - 2).float())
    x[10] = torch.randint(1, 2**23, (100,), generator=gen).float() * 2.0**-149  # fp32 subnormals
    x[10, ::7] = 2.0**-149
    x[11] = torch.randn(100, generator=gen) * 1e-30
    x[11, 1::2] = torch.randint(1, 2**20, (50,), generator=gen).float() * 2.0**-149
    x[12] = torch.randn(100, generator=gen).clamp(-2, 2) * half / 2
    x[12, :64] = 0.0
    x[12, 3:64:5] = -0.0
    x[13] = -0.0
    x[14] = (1 + torch.rand(100, generator=gen)) * 2.0**-126
    x[15] = torch.randn(100, generator=gen).clamp(-2, 2) * half / 2
    x = x * signs
    x[13] = -0.0  # signs may have flipped it
    return x


def fp32_extremes() -> torch.Tensor:
    """One range per row: near fp32's max, fp32's max itself, only 2^-149, fp32's smallest normal,
    deep subnormals among zeros, 1e-30 next to 1e30 in every block, 2^127 * 1.5 (E8M0's top
    exponent), and a few random rows."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 100, generator=gen)
    f32_max = torch.finfo(torch.float32).max
    x[0] = (0.5 + torch.rand(100, generator=gen) / 2) * f32_max
    x[1, ::2], x[1, 1::2] = f32_max, -f32_max
    x[2] = 2.0**-149
    x[3] = 2.0**-126
    x[4] = 0.0
    x[4, ::3] = torch.randint(1, 8, (34,), generator=gen).float() * 2.0**-149
    x[5] = 1e-30
    x[5, ::16] = 1e30
    x[6] = 1.5 * 2.0**127
    x[7] = torch.randn(100, generator=gen) * 2.0**-140
    return x * (torch.randint(0, 2, (16, 100), generator=gen).float() * 2 - 1)


def with_non_finite() -> torch.Tensor:
    """NaN, +Inf, -Inf and -NaN in different rows and blocks (one in the ragged last block), NaN
    next to Inf in one block, and finite rows."""
    x = torch.randn(16, 100, generator=torch.Generator().manual_seed(2))
    x[0, 5] = math.nan
    x[1, 40] = math.inf
    x[2, 70] = -math.inf
    x[3, 99] = -math.nan
    x[4, 33], x[4, 35] = math.nan, math.inf
    return x


def nan_groups(x: torch.Tensor, spec: FormatSpec) -> torch.Tensor:
    """Where a fake-quantized ``x`` (2-d, along axis -1) must be NaN: SPEC section 3, worked out here
    from the groups' definitions rather than from the reference."""
    bad = ~x.isfinite()
    if spec.granularity == "tensor" or spec.scaling == "nvfp4":  # NVFP4's g is NaN for the whole tensor
        return bad.any().expand_as(x)
    if spec.granularity == "channel":
        return bad.any(dim=-1, keepdim=True).expand_as(x)
    k = spec.block_size
    padded = torch.nn.functional.pad(bad, (0, -x.shape[-1] % k))
    blocks = padded.reshape(x.shape[0], -1, k).any(dim=-1, keepdim=True)
    return blocks.expand(-1, -1, k).reshape(x.shape[0], -1)[:, : x.shape[-1]]


# ---- every format, bit for bit -------------------------------------------------------------------


@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("quantizer", ALL, ids=str)
def test_every_format_gives_the_reference_bits_on_ties_saturation_subnormals_and_zeros(quantizer, axis):
    x = corner_cases(quantizer.spec)
    rne = qpass.fake_quantize(x, quantizer.spec, rounding="rne")
    away = qpass.fake_quantize(x, quantizer.spec, rounding="away")
    # The ties are real: rne and away differ on them (each of the two goes the other way on half).
    # (Not under 4over6: a block of ties errs the most at its map-to-6 scale, so it takes the
    # map-to-4 one, where they are no ties; its own are in test_nvfp4_4over6_picks_...)
    assert (rne[:8] != away[:8]).float().mean() > 0.05 or quantizer.spec.scale_mode == "4over6"
    assert_kernels_match(x if axis == -1 else x.t(), quantizer, axis)  # axis 0: a transposed view


@pytest.mark.parametrize("quantizer", RNE, ids=str)
def test_every_format_gives_the_reference_bits_at_the_ends_of_fp32(quantizer):
    assert_kernels_match(fp32_extremes(), quantizer)


@pytest.mark.parametrize("quantizer", RNE, ids=str)
def test_a_non_finite_value_makes_its_whole_group_nan(quantizer):
    x = with_non_finite()
    assert_kernels_match(x, quantizer)
    assert torch.equal(codegen.fake_quantize(x, quantizer).isnan(), nan_groups(x, quantizer.spec))
    if quantizer.spec.scaling == "mx":  # the OCP E8M0 NaN
        codes = codegen.quantize(x, quantizer).scales
        assert (codes[nan_groups(x, quantizer.spec)[:, ::32][:, : codes.shape[-1]]] == 0xFF).all()


@pytest.mark.parametrize("block", [1, 2, 8, 16, 64, 128])
@pytest.mark.parametrize("fmt", ["fp4_e2m1", "fp8_e4m3", "fp6_e3m2"])
def test_absmax_blocks_of_every_power_of_two(fmt, block):
    for pow2 in (False, True):
        quantizer = Quantizer(fmt, granularity=("block", block), pow2=pow2)
        assert_kernels_match(corner_cases(quantizer.spec), quantizer)
        assert_kernels_match(with_non_finite(), quantizer)


@pytest.mark.xfail(
    INTERPRETING, strict=True, raises=InterpreterError,
    reason="with one config under the interpreter the autotuner never calls prune_elementwise, so a "
    "block wider than the 128-column tile reaches the kernel (GROUPS = 0); on a GPU the pruner picks "
    "a 256-wide tile",
)
def test_absmax_blocks_wider_than_a_tile():
    quantizer = Quantizer("fp8_e4m3", granularity=("block", 256))
    assert_kernels_match(torch.randn(4, 300), quantizer)


def four_over_six_cases() -> torch.Tensor:
    """40 x 120 fp32 with g = 1 under 4over6 (amax 1536): in tile row 0, one hand-worked block per
    tile, in row j of tile j (so that the block is also the tile's content). With amax 12, s6 = 2
    and s4 = 3: both candidates' errors 0 (a tie: map-to-6), both 1 (7 rounds up at s6, down at
    s4: a tie), map-to-4 wins (9.5); s6 saturates (56.4 / 9; s4 = 14 wins); fp32 subnormals (the
    errors underflow to 0: a tie); ratios below the 2^-6 clamp (one scale); map-to-6 wins (the
    ones) with an E2M1 tie in it (5 / 2 = 2.5: rne and away differ). Then random rows, and a
    partial tile of 8 rows with the 4-wins block; the last block is 8 long."""
    gen = torch.Generator().manual_seed(12)
    x = torch.zeros(40, 120)
    cases = [[12.0, 6.0, 3.0, 0.0, -3.0, -12.0], [12.0, 7.0], [12.0, 9.5], [56.4], [1e-40, -3e-41],
             [0.05, -0.02, 0.001], [12.0, 5.0] + [1.0] * 14]
    for j, case in enumerate(cases):
        x[j, 16 * j:16 * j + len(case)] = torch.tensor(case)
    x[8, 115] = 1536.0
    x[16:32] = torch.randn(16, 120, generator=gen) * torch.logspace(-1, 2, 120)
    x[35, 80:82] = torch.tensor([12.0, 9.5])
    return x


@pytest.mark.parametrize("rounding", ["rne", "away"])
@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("granularity", [None, ("tile", 16)], ids=["1x16", "16x16"])
def test_nvfp4_4over6_picks_the_reference_candidate_on_ties(granularity, axis, rounding):
    quantizer = Quantizer("nvfp4", granularity=granularity, scale_mode="4over6", rounding=rounding)
    x = four_over_six_cases()
    assert_kernels_match(x if axis == -1 else x.t(), quantizer, axis)  # axis 0: a transposed view
    qt = qpass.quantize(x, quantizer.spec, rounding=rounding)
    diagonal = qt.scales[:7, :7].diagonal().tolist()  # tie, tie, 4 (s4 = 3), 4 (s4 = 14), tie, one, 6
    assert diagonal == [0x40, 0x40, 0x44, 0x56, 0x08, 0x08, 0x40] and qt.scales[35, 5] == 0x44
    assert qpass.dequantize(qt)[6, 97].item() == (4.0 if rounding == "rne" else 6.0)  # 2.5: the E2M1 tie


# ---- layouts, shapes and dtypes ------------------------------------------------------------------


def _strided_batch():
    return torch.randn(2, 30, 12)[:, ::2, 1::3]  # [2, 15, 4], strides (360, 24, 3)


# name: (tensor, axis). Small in what the interpreter pays for, programs: (product of the dims other
# than the last two of x.movedim(axis, -1)) x (its rows / 16) x (its length / 128).
LAYOUTS = {
    **{f"length {k} axis -1": (lambda k=k: torch.randn(5, k), -1) for k in (1, 17, 33, 100)},
    **{f"length {k} axis 0": (lambda k=k: torch.randn(k, 5), 0) for k in (1, 17, 33, 100)},
    "1-d": (lambda: torch.randn(37), -1),
    "1-d axis 0": (lambda: torch.randn(37), 0),
    "0-d": (lambda: torch.tensor(2.7), -1),
    "0-d axis 0": (lambda: torch.tensor(-0.3), 0),
    "3-d axis -1": (lambda: torch.randn(2, 5, 36), -1),
    "3-d axis -2": (lambda: torch.randn(2, 36, 5), -2),
    "3-d axis 0": (lambda: torch.randn(36, 2, 5), 0),
    "4-d axis -1": (lambda: torch.randn(2, 1, 5, 36), -1),
    "4-d axis -2": (lambda: torch.randn(1, 2, 36, 5), -2),
    "4-d axis 0": (lambda: torch.randn(36, 1, 2, 5), 0),
    "4-d inner axis": (lambda: torch.randn(2, 36, 2, 3), 1),  # the result has no [B, R, L] view: via a copy
    "transposed": (lambda: torch.randn(40, 20).t(), -1),
    "transposed axis 0": (lambda: torch.randn(40, 20).t(), 0),
    "strided slice": (lambda: torch.randn(30, 90)[::2, 1::3], -1),
    "strided slice axis 0": (lambda: torch.randn(30, 90)[::2, 1::3], 0),
    "strided 3-d inner axis": (_strided_batch, 1),
    "permuted 4-d": (lambda: torch.randn(1, 2, 36, 3).permute(0, 3, 1, 2), -1),
    "permuted 4-d inner axis": (lambda: torch.randn(1, 2, 3, 36).permute(0, 3, 1, 2), 1),
}


def tiles_apply(x: torch.Tensor, axis: int) -> bool:
    """NVFP4 16x16 tiles need two dims and the axis among the last two (else the reference refuses)."""
    return x.ndim >= 2 and axis % x.ndim >= x.ndim - 2


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shapes_axes_and_strided_views(layout):
    make, axis = LAYOUTS[layout]
    torch.manual_seed(0)
    x = make()
    for quantizer in FAMILIES:
        if quantizer.spec.granularity == "tile" and not tiles_apply(x, axis):
            continue
        assert_kernels_match(x, quantizer, axis)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("quantizer", FAMILIES, ids=str)
def test_half_precision_inputs_give_the_reference_bits_in_their_dtype(quantizer, dtype):
    # exponent 0: e5m2's anchor (57344) and everything else stays in fp16's range.
    x = corner_cases(quantizer.spec, exponent=0).to(dtype)
    assert_kernels_match(x, quantizer)
    assert codegen.fake_quantize(x, quantizer).dtype == dtype
    x = with_non_finite().to(dtype)
    assert_kernels_match(x, quantizer)


# ---- stochastic rounding -------------------------------------------------------------------------

STOCHASTIC = [
    Quantizer("mxfp4", rounding="stochastic"),
    Quantizer("mxfp8_e5m2", scale_mode="rceil", rounding="stochastic"),
    Quantizer("mxint8", rounding="stochastic"), Quantizer("nvfp4", rounding="stochastic"),
    Quantizer("nvfp4", granularity=("tile", 16), rounding="stochastic"),
    Quantizer("fp8_e4m3", granularity="channel", rounding="stochastic"),
    Quantizer("fp6_e3m2", granularity=("block", 32), pow2=True, rounding="stochastic"),
    Quantizer("nvfp4", scale_mode="4over6", rounding="stochastic"),
]


@pytest.mark.parametrize("quantizer", STOCHASTIC, ids=str)
def test_stochastic_rounding_is_reproducible_per_seed(quantizer):
    x = torch.randn(16, 100, generator=torch.Generator().manual_seed(3))
    first = codegen.fake_quantize(x, quantizer, seed=7)
    assert torch.equal(bits(first), bits(codegen.fake_quantize(x, quantizer, seed=7)))
    assert not torch.equal(first, codegen.fake_quantize(x, quantizer, seed=8))
    # Codes and fake quantization draw the same number for an element: one is the other dequantized.
    qt = codegen.quantize(x, quantizer, seed=7)
    assert torch.equal(bits(codegen.dequantize(qt)), bits(first))
    # Without a seed, one is drawn from torch's generator: reproducible under torch.manual_seed.
    torch.manual_seed(11)
    drawn = codegen.fake_quantize(x, quantizer)
    torch.manual_seed(11)
    assert torch.equal(bits(drawn), bits(codegen.fake_quantize(x, quantizer)))


@pytest.mark.parametrize("quantizer", STOCHASTIC, ids=str)
def test_stochastic_rounding_picks_one_of_the_two_grid_neighbours(quantizer):
    spec = quantizer.spec
    x = corner_cases(spec, seed=4)[8:].repeat(2, 1)  # the wide rows: saturation, subnormals, zeros
    x[8:] = torch.randn(8, 100, generator=torch.Generator().manual_seed(5))
    got = codegen.quantize(x, quantizer, seed=3)
    reference = qpass.quantize(x, spec)  # the scales do not depend on the rounding
    assert_same_values(got.scales, reference.scales)
    if reference.tensor_scale is not None:
        assert_same_values(got.tensor_scale, reference.tensor_scale)

    scaled = scaled_groups(x, spec)  # exactly what is rounded
    values = element_values(got, scaled)
    step = grid_step(scaled.abs(), spec.element)  # a power of two: the divisions below are exact
    down = torch.floor(scaled / step) * step
    top = spec.element.max_normal
    down, up = down.clamp(-top, top), (down + step).clamp(-top, top)
    assert ((values == down) | (values == up)).all()
    on_grid = down == scaled
    assert torch.equal(values[on_grid], scaled[on_grid])  # nothing to round: no randomness either
    rne = element_values(reference, scaled)
    assert (values != rne).float().mean() > 0.1  # and it is not round-to-nearest in disguise


@pytest.mark.parametrize("quantizer", STOCHASTIC, ids=str)
def test_stochastic_rounding_is_unbiased(quantizer):
    """Row r repeats one value c_r (random, between two grid points), and every 16th element is an
    anchor, the amax of each of its groups: every group of the row has the same encode factor, so
    the element being rounded is one value t_r = c_r * encode and E[element] = t_r exactly. Each
    row's sum over its n = 240 draws must be within 5 sigma of n t_r, sigma^2 = n step^2 p (1 - p)
    (a two-point distribution: up with probability p, the fraction of the step above the lower
    neighbour); so must the sum over all 32 rows."""
    spec = quantizer.spec
    element = spec.element
    gen = torch.Generator().manual_seed(6)
    exponent = torch.empty(32, 1).uniform_(element.emin, math.log2(element.max_normal) - 0.1, generator=gen)
    sign = torch.randint(0, 2, (32, 1), generator=gen) * 2 - 1
    x = (torch.exp2(exponent) * sign).expand(32, 256).clone()
    x[:, ::16] = anchor(spec)
    groups = scaled_groups(x, spec)
    values = element_values(codegen.quantize(x, quantizer, seed=5), groups).reshape(32, 256)
    repeated = torch.arange(256) % 16 != 0
    scaled, values = groups.reshape(32, 256)[:, repeated], values[:, repeated].double()
    assert (scaled == scaled[:, :1]).all()  # one t_r per row
    target = scaled[:, 0].double()
    assert (target.abs() < element.max_normal).all()  # nothing saturates
    step = grid_step(scaled[:, 0].abs(), element).double()
    p = (target - torch.floor(target / step) * step) / step
    n = values.shape[1]
    variance = n * step**2 * p * (1 - p)
    deviation = values.sum(dim=1) - n * target
    assert (deviation.abs() <= 5 * variance.sqrt()).all()
    assert deviation.sum().abs() <= 5 * variance.sum().sqrt()


def test_stochastic_rounding_keeps_non_finite_groups_nan():
    x = with_non_finite()
    for quantizer in STOCHASTIC[:4]:
        assert torch.equal(codegen.fake_quantize(x, quantizer, seed=1).isnan(), nan_groups(x, quantizer.spec))


# ---- fused Hadamard rotation ---------------------------------------------------------------------

ROTATED = [
    Quantizer("mxfp4"), Quantizer("nvfp4"), Quantizer("fp8_e4m3", granularity="channel"),
    Quantizer("mxint8"), Quantizer("fp6_e3m2", granularity=("block", 32), pow2=True),
]


def rotations(block: int) -> dict[str, Rotation]:
    signs = torch.randint(0, 2, (block,), generator=torch.Generator().manual_seed(block)) * 2 - 1
    signed = Rotation(block, signs=tuple(signs.tolist()))
    return {"unsigned": Rotation(block), "seeded": Rotation(block, seed=0), "signs": signed}


@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("kind", ["unsigned", "seeded", "signs"])
@pytest.mark.parametrize("block", [16, 64])
def test_fused_hadamard_gives_the_reference_bits_where_the_rotation_is_exact(block, kind, axis):
    """H_b / sqrt(b) has entries ±1/4 (b = 16) or ±1/8 (b = 64): on integers in [-8, 8] every
    partial sum is exact, whatever the order, so rotated-then-quantized must match bit for bit.
    The length (200) is not a multiple of the block: the rotation zero-pads it."""
    rotation = rotations(block)[kind]
    x = torch.randint(-8, 9, (16, 200), generator=torch.Generator().manual_seed(7)).float()
    x = x if axis == -1 else x.t()
    rotated = rotation(x, axis)
    for quantizer in ROTATED:
        expected = qpass.quantize(rotated, quantizer.spec, axis)
        assert_same_qtensor(codegen.quantize(x, quantizer, axis, rotation=rotation), expected)
        fake = codegen.fake_quantize(x, quantizer, axis, rotation=rotation)
        assert_same_values(fake, quantizer(rotated, axis))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fused_hadamard_of_half_precision_rotates_in_fp32(dtype):
    """The kernel rotates the upcast input in fp32 and rounds only the fake-quantized result to the
    input's dtype, as qpass.ops does (it quantizes ``x.float()``); unfused ``rotation(x)`` of a bf16
    tensor would round the rotated values to bf16 first. Inputs k/16 (exact in bf16 and fp16) rotate
    to multiples of 2^-6 that are exact in fp32 in any order but mostly not in bf16."""
    rotation = Rotation(16, seed=0)
    k = torch.randint(-128, 128, (16, 96), generator=torch.Generator().manual_seed(8))
    x = (k.float() / 16).to(dtype)
    for quantizer in ROTATED:
        expected = quantizer(rotation(x.float(), -1), -1).to(dtype)
        assert_same_values(codegen.fake_quantize(x, quantizer, rotation=rotation), expected)


@pytest.mark.parametrize("block", [32, 128])
def test_fused_hadamard_gives_the_reference_bits_with_an_irrational_scale(block):
    """With ±1/sqrt(32) or ±1/sqrt(128) in every entry the rotated values depend on the order of
    the fp32 sums: the kernel's butterfly sums in the reference's order (qpass.hadamard's), so
    every code, scale and fake-quantized value is still the reference's, on inputs spanning four
    decades (a ``tl.dot`` by the matrix would sum in the backend's order)."""
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(9)) * torch.logspace(-2, 2, 256)
    for rotation in (Rotation(block, seed=0), rotations(block)["signs"]):
        rotated = rotation(x, -1)
        for quantizer in [*ROTATED, Quantizer("mxfp8_e4m3"), FAMILIES[-1]]:
            expected = qpass.quantize(rotated, quantizer.spec)
            assert_same_qtensor(codegen.quantize(x, quantizer, rotation=rotation), expected)
            assert_same_values(codegen.fake_quantize(x, quantizer, rotation=rotation), quantizer(rotated, -1))


# ---- what the kernels refuse ---------------------------------------------------------------------


def test_a_block_that_is_not_a_power_of_two_is_refused_by_name():
    quantizer = Quantizer("fp8_e4m3", granularity=("block", 48))
    assert "blocks of 48" in unsupported(quantizer)
    with pytest.raises(ValueError, match="blocks of 48"):
        kernel_spec(quantizer.spec)
    for run in (codegen.quantize, codegen.fake_quantize):
        with pytest.raises(ValueError, match="blocks of 48"):
            run(torch.randn(4, 96), quantizer)
    assert unsupported(Quantizer("fp8_e4m3", granularity=("block", 64))) is None


def test_what_the_kernels_cannot_run_is_named_before_any_launch():
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="float64"):
        codegen.quantize(x.double(), Quantizer("mxfp4"))
    with pytest.raises(ValueError, match="full-size"):
        codegen.fake_quantize(x, Quantizer("mxfp4"), rotation=Rotation(None))
    # The reference's own argument errors come first, with its messages.
    with pytest.raises(ValueError, match="empty"):
        codegen.fake_quantize(x[:, :0], Quantizer("mxfp4"))
    with pytest.raises(IndexError, match="axis 2"):
        codegen.quantize(x, Quantizer("mxfp4"), axis=2)
    with pytest.raises(ValueError, match="tile"):
        codegen.quantize(torch.randn(64), Quantizer("nvfp4", granularity=("tile", 16)))
