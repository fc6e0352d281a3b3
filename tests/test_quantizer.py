"""Quantizer: one operand's format and options, applied with fake_quantize, carried as JSON."""

import pytest
import torch

from qpass import Quantizer, fake_quantize

QUANTIZERS = [
    Quantizer("fp8_e4m3"),
    Quantizer("fp8_e5m2", granularity=("block", 16), pow2=True),
    Quantizer("mxfp4", scale_mode="rceil", rounding="stochastic"),
    Quantizer("nvfp4", rounding="away"),
    Quantizer("nvfp4", scale_mode="4over6"),
    Quantizer("nvfp4", granularity=("tile", 16), scale_mode="4over6", rounding="stochastic"),
]


@pytest.mark.parametrize("quantizer", QUANTIZERS, ids=str)
def test_json_round_trip(quantizer):
    assert Quantizer.from_json(quantizer.to_json()) == quantizer


def test_applies_fake_quantize_with_its_options():
    x = torch.randn(4, 48)
    q = Quantizer("fp6_e3m2", granularity="channel", pow2=True)
    assert torch.equal(q(x, 0), fake_quantize(x, "fp6_e3m2", 0, granularity="channel", pow2=True))


def test_names():
    assert [str(q) for q in QUANTIZERS] == [
        "fp8_e4m3", "fp8_e5m2(block16, pow2)", "mxfp4(rceil, stochastic)", "nvfp4(away)", "nvfp4(4over6)",
        "nvfp4(16x16, 4over6, stochastic)",
    ]


def test_per_tensor():
    assert Quantizer("fp8_e4m3").per_tensor and not Quantizer("fp8_e4m3", granularity="channel").per_tensor
    assert not Quantizer("mxfp8_e4m3").per_tensor
