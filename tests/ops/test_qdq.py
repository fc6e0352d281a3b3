"""QDQ and rotation ops, and the one function every op quantizes an operand with."""

import pytest
import torch
from spec6 import adversarial, assert_same

from qpass import Quantizer, Rotation
from qpass.formats import DelayedScaling
from qpass.ops import qdq
from qpass.ops.registry import DELAYED_STATES


def test_rotate_is_the_rotation_and_its_gradient_the_inverse():
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(0), requires_grad=True)  # padded to 48
    rotation = Rotation(16, seed=1)
    y = torch.ops.qpass.rotate(x, rotation.to_json(), -1)
    assert_same(y, rotation(x.detach(), -1))
    grad = torch.randn(3, 48, generator=torch.Generator().manual_seed(2))
    y.backward(grad)
    assert_same(x.grad, rotation(grad, -1, inverse=True)[:, :40])


def test_an_operand_is_rotated_then_quantized_in_fp32():
    x = adversarial(4, 64, seed=3).bfloat16()
    quantizer, rotation = Quantizer("mxfp4"), Rotation(32, seed=0)
    out = qdq.quantize_operand(quantizer, x, -1, rotation=rotation)
    assert out.dtype == torch.float32
    assert_same(out, quantizer(rotation(x.float(), -1), -1))
    assert_same(qdq.quantize_operand(None, x, -1), x.float())  # high precision: fp32, unquantized


def test_a_delayed_state_is_found_by_key_and_moved_to_the_tensor():
    assert qdq.delayed_state("", torch.device("cpu")) is None
    state = DelayedScaling(4, 0)
    key = DELAYED_STATES.register(state)
    assert qdq.delayed_state(key, torch.device("cpu")) is state
    with pytest.raises(RuntimeError, match="no longer exists"):
        qdq.delayed_state("no such state", torch.device("cpu"))


def test_resampled_signs_are_drawn_once_per_gemm():
    assert qdq.draw_signs(None, 64) is None and qdq.draw_signs(Rotation(32, seed=0), 64) is None
    signs = qdq.draw_signs(Rotation(32, resample=True), 64)
    assert signs.shape == (32,) and set(signs.tolist()) <= {-1.0, 1.0}


def test_quantize_dequantize_is_fake_quantize_with_a_straight_through_gradient():
    x = adversarial(3, 70, seed=6).requires_grad_()
    y = torch.ops.qpass.quantize_dequantize(x, Quantizer("nvfp4").to_json(), -1, "")
    assert_same(y, Quantizer("nvfp4")(x.detach(), -1))
    y.backward(torch.full_like(y, 2.0))
    assert torch.equal(x.grad, torch.full_like(x, 2.0))
