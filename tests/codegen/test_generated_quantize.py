"""The generated quantize, fake-quantize and dequantize kernels against qpass.formats, bit for bit
(in Triton's interpreter on the CPU): every format family, both axes, special values, ragged K."""

import pytest
import torch

import qpass
from qpass import codegen
from qpass.quantizer import Quantizer

QUANTIZERS = [
    Quantizer("mxfp4"), Quantizer("mxfp8_e4m3", scale_mode="rceil"), Quantizer("mxfp8_e5m2", scale_mode="ceil"),
    Quantizer("mxfp6_e3m2", scale_mode="even"), Quantizer("mxfp6_e2m3"), Quantizer("mxint8"),
    Quantizer("nvfp4"), Quantizer("nvfp4", granularity=("tile", 16)),
    Quantizer("fp8_e4m3"), Quantizer("fp8_e5m2", granularity="channel"), Quantizer("fp6_e2m3", granularity=("block", 32), pow2=True),
    Quantizer("fp4_e2m1", granularity="channel", rounding="away"),
]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def adversarial(rows=20, length=100) -> torch.Tensor:
    x = torch.randn(rows, length) * torch.logspace(-3, 3, length)
    x[1, :7] = torch.tensor([0.25, 0.75, 1.25, -2.5, 5.0, 448.0, 1e-40])  # ties, large, an fp32 subnormal
    x[2, 40:72] = 0.0  # a zero block
    x[3, 3], x[4, 70], x[5, 0] = float("nan"), float("inf"), -float("inf")
    x[6, 10] = -0.0
    return x


@pytest.mark.parametrize("quantizer", QUANTIZERS, ids=str)
@pytest.mark.parametrize("axis", [-1, 0])
def test_kernels_give_the_reference_bits(quantizer, axis):
    x = adversarial()
    reference = qpass.quantize(x, quantizer.spec, axis=axis, rounding=quantizer.rounding)
    got = codegen.quantize(x, quantizer, axis=axis)
    assert torch.equal(got.codes, reference.codes)
    assert torch.equal(bits(got.scales), bits(reference.scales))
    if reference.tensor_scale is not None:
        assert torch.equal(bits(got.tensor_scale), bits(reference.tensor_scale))
    assert torch.equal(bits(codegen.fake_quantize(x, quantizer, axis)), bits(quantizer(x, axis)))
    assert torch.equal(bits(codegen.dequantize(reference)), bits(qpass.dequantize(reference)))


@pytest.mark.parametrize("length", [1, 17, 33])
def test_ragged_lengths_and_a_transposed_view(length):
    x = torch.randn(length, 24).t()  # strided: quantized along its last axis in place
    for quantizer in (Quantizer("mxfp4"), Quantizer("nvfp4")):
        assert torch.equal(bits(codegen.fake_quantize(x, quantizer)), bits(quantizer(x, -1)))


def test_stochastic_rounding_is_seeded_and_lands_on_grid_neighbours():
    quantizer = Quantizer("mxfp4", rounding="stochastic")
    x = torch.randn(16, 128)
    first, again = (codegen.fake_quantize(x, quantizer, seed=7) for _ in range(2))
    assert torch.equal(first, again) and not torch.equal(first, codegen.fake_quantize(x, quantizer, seed=8))
    step = qpass.formats.api.quantization_step(x, quantizer.spec, -1)  # the grid step at each element
    assert ((first - x).abs() < step).all()


def test_stochastic_rounding_is_unbiased():
    quantizer = Quantizer("mxfp4", rounding="stochastic")
    x = torch.full((64, 256), 0.3)  # one scale for all: 0.3 lies between two grid points
    x[:, ::32] = 6.0  # each block's max: amax 6 gives the scale 2^0, so the elements are x itself
    values = codegen.fake_quantize(x, quantizer, seed=1)[x == 0.3].double()
    # 0.3 sits between 0 and 0.5 (steps of 0.5 below 1): 0.5 with probability 0.6
    sigma = 0.5 * (0.6 * 0.4 / values.numel()) ** 0.5
    mean = values.mean()
    assert abs(mean - 0.3) < 5 * sigma


def test_fused_hadamard_of_an_exact_rotation_gives_the_reference_bits():
    rotation = qpass.Rotation(16, seed=0)
    x = torch.randint(-8, 9, (16, 64)).float()  # H16 / 4: exact in any summation order
    quantizer = Quantizer("mxfp8_e4m3")
    assert torch.equal(codegen.fake_quantize(x, quantizer, rotation=rotation), quantizer(rotation(x, -1), -1))


def test_non_power_of_two_blocks_are_refused_by_name():
    with pytest.raises(ValueError, match="blocks of 48"):
        codegen.quantize(torch.randn(4, 96), Quantizer("fp8_e4m3", granularity=("block", 48)))
