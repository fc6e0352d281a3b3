"""GPTQ on each format's own grid (qpass.gptq) and through qpass.calibrate(method="gptq").

The oracle is the textbook algorithm in float64 numpy, column after column with no lazy batches,
on a grid built from the SPEC's scale formulas with ml_dtypes' casts: independent of qpass's
reference code. It follows the same documented rules (static group scales, codes within the range
of the group's amax, the amax's element kept at its code)."""

import copy

import ml_dtypes
import numpy as np
import pytest
import torch
from torch import nn

import qpass
from qpass.gptq import GPTQ, gptq_weight

FP8_CHANNEL = qpass.Quantizer("fp8_e4m3", granularity="channel")
MXFP4 = qpass.Quantizer("mxfp4")
NVFP4 = qpass.Quantizer("nvfp4")


def _cast(values: np.ndarray, dtype, limit: float) -> np.ndarray:
    return np.clip(values, -limit, limit).astype(dtype).astype(np.float32)


def oracle_grid(w: np.ndarray, quantizer: qpass.Quantizer):
    """Per element: encode and decode factors, and a function rounding scaled values to the grid."""
    n, k = w.shape
    a = np.abs(w)
    if quantizer is FP8_CHANNEL:
        amax = np.repeat(a.max(1, keepdims=True), k, 1)
        encode = np.float32(448) / amax
        return encode, np.float32(1) / encode, amax, lambda v: _cast(v, ml_dtypes.float8_e4m3fn, 448)
    block = 32 if quantizer is MXFP4 else 16
    amax = np.repeat(a.reshape(n, k // block, block).max(-1), block, 1)
    fp4 = lambda v: _cast(v, ml_dtypes.float4_e2m1fn, 6)  # noqa: E731
    if quantizer is MXFP4:
        exponent = np.floor(np.log2(amax)) - 2  # floor scales: emax of E2M1 is 2
        return (2.0 ** -exponent).astype(np.float32), (2.0 ** exponent).astype(np.float32), amax, fp4
    g = np.float32(a.max()) / np.float32(2688)
    ratio = np.clip((amax / np.float32(6)) / g, 2.0**-6, 448).astype(np.float32)
    s_b = _cast(ratio, ml_dtypes.float8_e4m3fn, 448)
    return (np.float32(1) / g) / s_b, s_b * g, amax, fp4


def oracle_gptq(w: np.ndarray, h: np.ndarray, quantizer: qpass.Quantizer, damp: float = 0.01) -> np.ndarray:
    """The dequantized GPTQ weight: what the site computes with."""
    encode, decode, amax, to_grid = oracle_grid(w, quantizer)
    top = to_grid(amax * encode)
    pinned = (np.abs(w) == amax) & (amax > 0)
    h = h + damp * np.mean(np.diag(h)) * np.eye(len(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # the upper factor U of H⁻¹ = UᵀU
    current = w.astype(np.float64).copy()
    out = np.zeros_like(w, dtype=np.float32)
    for j in range(w.shape[1]):
        codes = np.clip(to_grid(current[:, j].astype(np.float32) * encode[:, j]), -top[:, j], top[:, j])
        codes = np.where(pinned[:, j], np.sign(w[:, j]) * top[:, j], codes).astype(np.float32)
        out[:, j] = codes * decode[:, j]
        error = (current[:, j] - out[:, j]) / u[j, j]
        current[:, j:] -= np.outer(error, u[j, j:])
    return out


def problem(n: int = 24, k: int = 64, samples: int = 256, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, k, generator=generator) * torch.linspace(0.2, 3.0, k)
    x[:, 5] += 4 * torch.randn(samples, generator=generator)  # an outlier channel
    w = torch.randn(n, k, generator=generator)
    w[2, 7] = 6.0  # a group whose amax stands out
    w[4, 16:32] = 0.0  # an all-zero block
    return x, w, (x.double().T @ x.double()) / samples


@pytest.mark.parametrize("quantizer", [FP8_CHANNEL, MXFP4, NVFP4], ids=str)
def test_gptq_equals_the_float64_oracle_and_the_site_quantizes_to_it(quantizer):
    x, w, h = problem()
    solved = gptq_weight(w, h, quantizer, GPTQ(block_size=16))  # lazy batches change no result
    expected = torch.from_numpy(oracle_gptq(w.numpy(), h.numpy(), quantizer))
    torch.testing.assert_close(solved.values, expected, rtol=0, atol=0)
    # The stored weight quantizes to GPTQ's values, bit for bit.
    torch.testing.assert_close(quantizer(solved.weight, -1), expected, rtol=0, atol=0)
    assert not torch.equal(quantizer(w, -1), expected)  # GPTQ did change codes


@pytest.mark.parametrize("quantizer", [
    FP8_CHANNEL, qpass.Quantizer("fp8_e4m3"), qpass.Quantizer("fp6_e2m3", granularity=("block", 32)),
    qpass.Quantizer("mxfp8_e4m3"), qpass.Quantizer("mxfp8_e4m3", scale_mode="rceil"), MXFP4,
    qpass.Quantizer("mxfp4", scale_mode="rceil"), qpass.Quantizer("mxint8"), NVFP4,
    qpass.Quantizer("nvfp4", granularity=("tile", 16)), qpass.Quantizer("nvfp4", scale_mode="4over6"),
    qpass.Quantizer("nvfp4", granularity=("tile", 16), scale_mode="4over6")], ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_never_loses_to_round_to_nearest_and_its_grid_is_the_quantizers(quantizer, act_order):
    for seed in range(3):
        x, w, h = problem(seed=seed)
        solved = gptq_weight(w, h, quantizer, GPTQ(act_order=act_order))
        quantized = quantizer(solved.weight, -1)
        assert torch.equal(quantized, solved.values)  # a fixed point: the site computes with GPTQ's values
        # Uncorrelated inputs leave no error to feed back: GPTQ is then round-to-nearest, bit for bit,
        # which holds only if its scales, code range and stored weight are exactly the quantizer's.
        identity = torch.eye(w.shape[1], dtype=torch.float64)
        assert torch.equal(gptq_weight(w, identity, quantizer, GPTQ(act_order=act_order)).values,
                           quantizer(w, -1))
        error = lambda weight: ((x @ (weight - w).T) ** 2).sum().item()  # noqa: E731
        assert error(quantized) <= error(quantizer(w, -1)), (seed, error(quantized), error(quantizer(w, -1)))


def test_gptq_refuses_what_it_cannot_solve():
    x, w, h = problem()
    with pytest.raises(ValueError, match="nearest"):
        gptq_weight(w, h, qpass.Quantizer("mxfp4", rounding="stochastic"))
    with pytest.raises(ValueError, match="finite"):
        gptq_weight(torch.full_like(w, float("nan")), h, MXFP4)
    with pytest.raises(ValueError, match="damp"):
        GPTQ(damp=0)


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(64, 128), nn.Linear(128, 64)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("recipe", ["fp8-infer", "mxfp4-weight-only", "nvfp4-infer"])
def test_calibrate_gptq_replaces_the_weights_in_the_same_graph(recipe):
    torch.manual_seed(0)
    model = TwoLinears()
    batches = [torch.randn(64, 64) * torch.linspace(0.1, 3.0, 64) for _ in range(4)]
    qm = qpass.compile(copy.deepcopy(model), recipe, backend="aot_eager")
    qm(batches[0])
    sites = [row["site"] for row in qpass.report(qm).rows]
    qpass.calibrate(qm, batches, method="gptq")
    qm(batches[0])  # captured again, with the new weights
    report = qpass.report(qm)
    assert [row["site"] for row in report.rows] == sites
    assert all("quantizes it to GPTQ's values exactly" in str(row) for row in report.rows), str(report)
    # Each new weight is GPTQ's solution for the inputs its site saw (the up projection's own).
    inputs = torch.cat(batches)
    h = (inputs.double().T @ inputs.double()) / len(inputs)
    weight = qpass.get_recipe(recipe).weight
    expected = gptq_weight(model.up.weight.detach(), h, weight).weight
    assert torch.equal(qm.up.weight.detach(), expected)
    assert not torch.equal(qm.down.weight.detach(), model.down.weight.detach())


def test_calibrate_gptq_under_a_rotation_solves_the_rotated_weight():
    torch.manual_seed(0)
    qm = qpass.compile(TwoLinears(), "mxfp4-infer", backend="aot_eager")
    batches = [torch.randn(64, 64) for _ in range(2)]
    before = copy.deepcopy(qm.up.weight.detach())
    qpass.calibrate(qm, batches, method=qpass.GPTQ(act_order=True))
    qm(batches[0])
    assert not torch.equal(qm.up.weight.detach(), before)
    assert all("gptq: weight replaced" in str(row) for row in qpass.report(qm).rows)


def test_calibrate_refuses_training_recipes_and_unknown_methods():
    with pytest.raises(ValueError, match="inference recipes"):
        qpass.calibrate(qpass.compile(TwoLinears(), "fp8-train", backend="aot_eager"), [], method="gptq")
    with pytest.raises(ValueError, match="unknown calibration method"):
        qpass.calibrate(qpass.compile(TwoLinears(), "fp8-infer", backend="aot_eager"), [], method="awq")
    with pytest.raises(ValueError, match="does not combine with ocs"):
        qpass.calibrate(qpass.compile(TwoLinears(), "mxfp4-infer", backend="aot_eager", ocs=0.02), [],
                        method="gptq")
