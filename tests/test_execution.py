"""Execution: a product's backend choices, apart from its numerics."""

import pytest

from qpass import Quantizer
from qpass.execution import REFERENCE, Execution
from qpass.matmul_quantizers import MatmulQuantizers

FP8 = Quantizer("fp8_e4m3")


def test_round_trips_through_json():
    run = Execution(kernels=True, a_state="1/up.input", grad_state="1/up.grad_output")
    assert Execution.from_json(run.to_json()) == run
    assert REFERENCE == Execution() and not REFERENCE.kernels and not REFERENCE.has_states
    assert run.has_states


MX, E5M2 = Quantizer("mxfp8_e4m3"), Quantizer("fp8_e5m2")


@pytest.mark.parametrize("state, quantizers, allowed", [
    ("a_state", MatmulQuantizers(a=FP8, db_a=MX, da_grad=E5M2), False),  # A differs between its GEMMs
    ("a_state", MatmulQuantizers(a=FP8, db_a=FP8, da_grad=E5M2), True),
    ("b_state", MatmulQuantizers(b=FP8, da_b=MX, da_grad=E5M2), False),
    ("grad_state", MatmulQuantizers(a=FP8, da_grad=E5M2, db_grad=MX), False),  # dY differs
    ("grad_state", MatmulQuantizers(a=FP8, da_grad=E5M2, db_grad=E5M2), True),
])
def test_a_state_needs_its_operand_quantized_once(state, quantizers, allowed):
    run = Execution(**{state: "x"})
    if allowed:
        assert run.check(quantizers) is run
    else:
        with pytest.raises(ValueError, match=f"{state}: delayed scaling needs one per-tensor quantizer"):
            run.check(quantizers)


def test_inference_operands_are_quantized_once():
    assert MatmulQuantizers(a=FP8, b=FP8).quantized_once() == {"a": True, "b": True, "grad": False}
    Execution(a_state="x", b_state="y").check(MatmulQuantizers(a=FP8, b=FP8))
