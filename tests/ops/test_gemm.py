"""The scaled GEMM (qpass.ops.gemm): routes, the cuBLASLt constraints checked on the CPU, and the
CPU's _scaled_mm against the reference (dequantize, fp32 matmul), bit for bit."""

import pytest
import torch
from spec6 import adversarial, assert_same

from qpass import Quantizer
from qpass.gemm_operand import empty_tensors, quantize_for_gemm, transposed
from qpass.ops import gemm

E4M3, E5M2 = Quantizer("fp8_e4m3"), Quantizer("fp8_e5m2")
ROWWISE = Quantizer("fp8_e4m3", granularity="channel")
MX8 = Quantizer("mxfp8_e4m3", scale_mode="rceil")


def reference(x, y):
    return x.dequantize() @ y.dequantize().mT.contiguous()


@pytest.mark.parametrize("qx, qy", [(E4M3, E4M3), (E4M3, E5M2), (E5M2, E4M3), (ROWWISE, ROWWISE)])
@pytest.mark.parametrize("m, k, n", [(5, 8, 3), (7, 40, 24), (33, 72, 50), (1, 64, 16), (128, 200, 130)])
def test_scaled_mm_equals_the_reference(qx, qy, m, k, n, monkeypatch):
    calls = []
    scaled_mm = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: calls.append(1) or scaled_mm(*a, **kw))
    x = quantize_for_gemm(adversarial(m + 3, k, seed=m)[3:] if m < 3 else adversarial(m, k, seed=m), qx, -1)
    y = quantize_for_gemm(adversarial(n + 3, k, seed=n)[:n], qy, -1)
    assert gemm.route(qx, qy) == ("scaled_mm rowwise" if qx is ROWWISE else "scaled_mm tensorwise")
    assert_same(gemm.scaled_gemm(x, y, torch.float32), reference(x, y))
    assert calls == [1]
    assert_same(gemm.scaled_gemm(x, y, torch.bfloat16), reference(x, y).bfloat16())


def test_a_leading_batch_is_flattened_into_rows(monkeypatch):
    calls = []
    scaled_mm = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: calls.append(a[0].shape) or scaled_mm(*a, **kw))
    x = quantize_for_gemm(torch.randn(2, 5, 32), ROWWISE, -1)
    y = quantize_for_gemm(torch.randn(24, 32), ROWWISE, -1)
    out = gemm.scaled_gemm(x, y, torch.float32)
    assert calls == [(10, 32)]  # one GEMM of all the rows
    assert out.shape == (2, 5, 24)
    assert_same(out, reference(x, y))


@pytest.mark.parametrize("qx, qy, why", [
    (MX8, MX8, "no scaled GEMM on cpu"),  # e8m0 block scales: no CPU kernel
    (Quantizer("mxfp6_e3m2"), Quantizer("mxfp6_e3m2"), "no scaled GEMM on cpu"),
    (E4M3, ROWWISE, "mixed tensorwise and rowwise"),
    (E5M2, E5M2, "e5m2 x e5m2"),  # on the CPU too, which decides as a GPU would
    (None, E4M3, "high-precision operand"),
])
def test_what_no_gemm_takes_runs_the_reference_and_says_why(qx, qy, why):
    chosen = gemm.route(qx, qy)
    assert chosen.startswith("reference: ") and why in chosen
    x = torch.randn(6, 64) if qx is None else quantize_for_gemm(torch.randn(6, 64), qx, -1)
    y = quantize_for_gemm(torch.randn(8, 64), qy, -1)
    values = x if qx is None else x.dequantize()
    assert_same(gemm.scaled_gemm(x, y, torch.float32), values @ y.dequantize().mT.contiguous())


def test_on_cuda_the_routes_avoid_what_cublaslt_rejects():
    assert gemm.route(MX8, MX8, "cuda") == "triton"
    assert gemm.route(E4M3, E4M3, "cuda", batched=True).startswith("reference: batched")


def _fp8(*shape, dtype=torch.float8_e4m3fn):
    return torch.zeros(shape).to(dtype)


def test_the_validator_rejects_on_the_cpu_what_cuda_rejects():
    one = torch.tensor(1.0)
    a, b = _fp8(32, 64), _fp8(48, 64)
    assert gemm.cuda_rejects(a, b.t(), one, one, torch.bfloat16) is None
    assert "column-major" in gemm.cuda_rejects(a, b.t().contiguous(), one, one, torch.bfloat16)
    e5m2 = _fp8(32, 64, dtype=torch.float8_e5m2), _fp8(48, 64, dtype=torch.float8_e5m2)
    assert "e5m2 x e5m2" in gemm.cuda_rejects(e5m2[0], e5m2[1].t(), one, one, torch.bfloat16)
    assert "multiples of 16" in gemm.cuda_rejects(_fp8(32, 40), _fp8(48, 40).t(), one, one, torch.bfloat16)
    assert "multiples of 16" in gemm.cuda_rejects(a, _fp8(50, 64).t(), one, one, torch.bfloat16)
    bias = torch.zeros(48, dtype=torch.float32)
    assert "bias" in gemm.cuda_rejects(a, b.t(), one, one, torch.float32, bias=bias)
    assert gemm.cuda_rejects(a, b.t(), one, one, torch.bfloat16, bias=bias.bfloat16()) is None
    assert "rowwise scales" in gemm.cuda_rejects(a, b.t(), torch.ones(32, 1), torch.ones(48, 1),
                                                 torch.bfloat16)
    assert "sm89" in gemm.cuda_rejects(a, b.t(), one, one, torch.bfloat16, capability=(8, 0))


def test_a_misaligned_call_is_checked_as_cuda_gets_it_padded(monkeypatch):
    """K = 40, N = 50: the CPU multiplies as they are; the call checked is CUDA's, padded to 48 x 64."""
    checked = []
    rejects = gemm.cuda_rejects
    monkeypatch.setattr(gemm, "cuda_rejects",
                        lambda *args, **kw: checked.append(args) or rejects(*args, **kw))
    x, y = (quantize_for_gemm(torch.randn(7, 40), ROWWISE, -1),
            quantize_for_gemm(torch.randn(50, 40), ROWWISE, -1))
    assert_same(gemm.scaled_gemm(x, y, torch.float32), reference(x, y))
    (codes, codes_t, scale_x, scale_y, _), = checked
    assert codes.shape == (7, 48) and codes_t.shape == (48, 64) and scale_y.shape == (1, 64)
    # The padding itself (CUDA's path) changes no sum: zeros along K, rows cut off along N.
    padded_x, _ = gemm._padded(x, 7, 48)
    padded_y, padded_scales = gemm._padded(y, 64, 48)
    out = torch._scaled_mm(padded_x, padded_y.t(), scale_a=x.scales, scale_b=padded_scales.reshape(1, -1),
                           out_dtype=torch.float32)[:, :50]
    torch.testing.assert_close(out, reference(x, y), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("quantizer", [E4M3, Quantizer("fp4_e2m1"), Quantizer("fp6_e3m2")])
def test_a_per_tensor_operand_serves_the_other_orientation(quantizer):
    x = adversarial(7, 40, seed=0)
    op = quantize_for_gemm(x, quantizer, -1)
    assert_same(transposed(op).dequantize(), quantize_for_gemm(x, quantizer, 0).dequantize())
    with pytest.raises(ValueError, match="per-tensor"):
        transposed(quantize_for_gemm(x, ROWWISE, -1))


@pytest.mark.parametrize("quantizer", [E4M3, ROWWISE, MX8, Quantizer("mxfp4"), Quantizer("nvfp4"),
                                       Quantizer("nvfp4", granularity=("tile", 16)), Quantizer("mxint8")])
def test_fake_tensors_of_an_operand_are_shaped_as_the_real_ones(quantizer):
    x = torch.randn(3, 40, 72)
    real = quantize_for_gemm(x, quantizer, -2).tensors()
    fake = empty_tensors(quantizer, x.movedim(-2, -1).shape, None, x.device)
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]
