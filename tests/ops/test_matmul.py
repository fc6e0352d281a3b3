"""The quantized matmul against SPEC section 6 written by hand: forward and both backward GEMMs,
bit for bit."""

import pytest
import torch
from spec6 import Spec6Product, adversarial, assert_same

from qpass import Quantizer
from qpass.execution import Execution
from qpass.matmul_quantizers import MatmulQuantizers
from qpass.ops.matmul import quantized_matmul

FIELDS = ("a", "b", "da_grad", "da_b", "db_grad", "db_a")
MX8 = {"format": "mxfp8_e4m3", "scale_mode": "rceil"}
# Every operand of every GEMM with its own format, so a wrong axis or role cannot hide.
MIXED = dict(zip(FIELDS, (
    {"format": "mxfp4"}, {"format": "nvfp4"}, {"format": "fp8_e5m2", "granularity": ("block", 16)},
    {"format": "mxfp6_e2m3", "scale_mode": "even"}, {"format": "mxint8"},
    {"format": "fp8_e4m3", "granularity": "channel"},
)))
CASES = {
    "mxfp8": dict.fromkeys(FIELDS, MX8),
    "mixed": MIXED,
    "fp8-per-tensor": {**dict.fromkeys(("a", "b", "da_b", "db_a"), {"format": "fp8_e4m3"}),
                       "da_grad": {"format": "fp8_e5m2"}, "db_grad": {"format": "fp8_e5m2"}},
    "weight-only-backward-hp": {"a": None, "b": {"format": "mxfp4"}, "da_grad": None, "da_b": None,
                                "db_grad": {"format": "fp8_e5m2"}, "db_a": None},
}


def op_config(specs) -> tuple[str, str]:
    """The op's quantizers and execution (the reference) as JSON."""
    return (MatmulQuantizers(**{k: v and Quantizer(**v) for k, v in specs.items()}).to_json(),
            Execution().to_json())


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("k", [64, 40])  # 40: the blocks of 32 (and 16) along K are padded
def test_linear_product_matches_spec6(case, k):
    specs = CASES[case]
    a = adversarial(2, 5, k, seed=0).requires_grad_()
    w = adversarial(24, k, seed=1).requires_grad_()
    dy = adversarial(2, 5, 24, seed=2)
    a_ref, w_ref = a.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()

    y = quantized_matmul(a, w.mT, *op_config(specs))
    y.backward(dy)
    y_ref = Spec6Product.apply(a_ref, w_ref.mT, specs)
    y_ref.backward(dy)
    assert_same(y, y_ref)
    assert_same(a.grad, a_ref.grad)
    assert_same(w.grad, w_ref.grad)


def test_batched_product_matches_spec6():
    specs = CASES["mixed"]
    a = adversarial(3, 6, 48, seed=3).requires_grad_()
    b = adversarial(3, 48, 40, seed=4).requires_grad_()
    dy = adversarial(3, 6, 40, seed=5)
    a_ref, b_ref = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    quantized_matmul(a, b, *op_config(specs)).backward(dy)
    Spec6Product.apply(a_ref, b_ref, specs).backward(dy)
    assert_same(a.grad, a_ref.grad)
    assert_same(b.grad, b_ref.grad)


def test_a_non_finite_value_makes_its_groups_nan():
    a = torch.randn(4, 64)
    a[1, 3] = float("inf")
    y = quantized_matmul(a, torch.randn(64, 8), *op_config(CASES["mxfp8"]))
    assert y[1].isnan().all() and y[[0, 2, 3]].isfinite().all()


def test_gradients_not_needed_are_not_computed():
    a, w = torch.randn(4, 64), torch.randn(8, 64, requires_grad=True)
    quantized_matmul(a, w.mT, *op_config(CASES["mxfp8"])).sum().backward()
    assert w.grad.shape == w.shape and a.grad is None
    nothing = []
    da, db = torch.ops.qpass.quantized_matmul_backward(
        torch.ones(4, 8), a, w.mT, nothing, nothing, [4, 64], [64, 8], torch.float32, torch.float32,
        *op_config(CASES["mxfp8"]), False, True)
    assert da.numel() == 0 and db.shape == (64, 8)


def test_bf16_operands_accumulate_in_fp32():
    a, w = torch.randn(4, 64), torch.randn(8, 64)
    config = op_config(CASES["mxfp8"])
    y16 = quantized_matmul(a.bfloat16(), w.bfloat16().mT, *config)
    # MX E4M3 values are exact in bf16, so the only difference is the output's rounding.
    assert y16.dtype == torch.bfloat16
    assert torch.equal(y16, quantized_matmul(
        a.bfloat16().float(), w.bfloat16().float().mT, *config).bfloat16())


def test_delayed_state_must_be_used_once_per_step():
    fp8 = Quantizer("fp8_e4m3")
    with pytest.raises(ValueError, match="a_state"):
        Execution(a_state="x").check(MatmulQuantizers(a=fp8, db_a=Quantizer("mxfp8_e4m3"), da_grad=fp8))
    Execution(a_state="x").check(MatmulQuantizers(a=fp8, db_a=fp8, da_grad=fp8))  # quantized once: allowed
