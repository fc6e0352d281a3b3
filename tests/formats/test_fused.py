"""fake_quantize(fused=True), the Inductor-compiled path, gives the reference's bits."""

import pytest
import torch

import qpass

pytestmark = pytest.mark.slow  # each format compiles a kernel with Inductor (seconds on 2 cores)


def adversarial(rows: int = 6, cols: int = 70) -> torch.Tensor:
    """Random blocks plus ties, saturation, subnormals, zeros, NaN and Inf in their own rows."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 3, cols)
    x[1, :32] = 0.0
    x[2, 5] = float("nan")
    x[3, 40] = float("inf")
    x[4, :8] = torch.tensor([1e-40, -1e-40, 2.5, -3.5, 448.0, 464.0, -0.0, 5.0])
    return x


@pytest.mark.parametrize(
    "fmt, kwargs",
    [
        ("mxfp8_e4m3", {}),
        ("mxfp4", {"scale_mode": "rceil", "rounding": "away"}),
        ("nvfp4", {}),
        ("fp8_e5m2", {"granularity": "channel", "axis": 0}),
    ],
)
def test_fused_matches_reference_bits(fmt, kwargs):
    x = adversarial()
    eager = qpass.fake_quantize(x, fmt, **kwargs)
    fused = qpass.fake_quantize(x, fmt, fused=True, **kwargs)
    assert torch.equal(fused.view(torch.int32), eager.view(torch.int32))


def test_fused_rejects_what_it_cannot_do():
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="fused"):
        qpass.fake_quantize(x, "mxfp4", rounding="stochastic", fused=True)
    with pytest.raises(ValueError, match="fused"):
        qpass.fake_quantize(x, "fp8_e4m3", delayed=qpass.DelayedScaling(), fused=True)
