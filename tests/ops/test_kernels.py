"""The kernel ops of a lowered graph: the reference where the lowering chose it, the Triton kernels
(here in Triton's interpreter) otherwise, with the same values."""

import torch
from spec6 import adversarial, assert_same

from qpass import Quantizer, Rotation
from qpass.formats import dequantize, quantize
from qpass.ops.kernels import register_packed_weight


def packed(weight, quantizer, rotation=None):
    w = weight if rotation is None else rotation(weight, -1)
    qt = quantize(w, quantizer.spec, axis=-1)
    return qt, register_packed_weight(qt)


def test_packed_linear_by_the_reference_is_the_unlowered_product():
    x, w, bias = adversarial(2, 5, 64, seed=0), adversarial(24, 64, seed=1), torch.randn(24)
    weight_q, input_q, rotation = Quantizer("mxfp4"), Quantizer("mxfp4"), Rotation(32, seed=0)
    qt, key = packed(w, weight_q, rotation)
    out = torch.ops.qpass.packed_linear(x, bias, key, weight_q.to_json(), 24, input_q.to_json(),
                                        rotation.to_json(), False)
    expected = input_q(rotation(x, -1), -1) @ dequantize(qt).mT.contiguous() + bias
    assert_same(out, expected)


NVFP4 = Quantizer("nvfp4").to_json()


def test_packed_fp8_weights_run_on_scaled_mm(monkeypatch):
    """fp8-infer: per-token input x per-channel weight is a rowwise scaled GEMM, kernels or not."""
    calls = []
    scaled_mm = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: calls.append(1) or scaled_mm(*a, **kw))
    rowwise = Quantizer("fp8_e4m3", granularity="channel")
    x, w, bias = adversarial(2, 5, 64, seed=5), adversarial(24, 64, seed=6), torch.randn(24)
    qt, key = packed(w, rowwise)
    expected = rowwise(x, -1) @ dequantize(qt).mT.contiguous() + bias
    for kernels in (False, True):
        out = torch.ops.qpass.packed_linear(x, bias, key, rowwise.to_json(), 24, rowwise.to_json(),
                                            "", kernels)
        assert_same(out, expected)
    assert calls == [1, 1]


def test_packed_linear_by_the_kernel_is_within_fp32_accumulation():
    x, w = adversarial(3, 64, seed=2), adversarial(16, 64, seed=3)
    qt, key = packed(w, Quantizer("nvfp4"))
    kernel = torch.ops.qpass.packed_linear(x, None, key, NVFP4, 16, NVFP4, "", True)
    reference = torch.ops.qpass.packed_linear(x, None, key, NVFP4, 16, NVFP4, "", False)
    torch.testing.assert_close(kernel, reference, rtol=1e-5, atol=1e-5)  # another order of summation


def test_fake_quantize_kernel_gives_the_reference_bits():
    x = adversarial(4, 96, seed=4)
    quantizer, rotation = Quantizer("mxfp8_e4m3", scale_mode="rceil"), Rotation(32, seed=1)
    out = torch.ops.qpass.fake_quantize_kernel(x, quantizer.to_json(), -1, rotation.to_json())
    assert_same(out, quantizer(rotation(x, -1), -1))
