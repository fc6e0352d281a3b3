"""The FP4 training recipes end to end: each one's forward and backward equal SPEC section 6 written out
by hand (with the recipe's transforms) bit for bit in fp32, random draws included under fixed seeds."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from spec6 import assert_same
from torch import nn

import qpass
from qpass import fake_quantize
from qpass.formats import dge_multiplier
from qpass.hadamard import hadamard_transform, random_signs

TE_SIGNS = torch.tensor([1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1], dtype=torch.float32)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 96)
        self.down = nn.Linear(96, 64)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def rotate(x, axis, signs):
    """``x`` times the block Hadamard ``diag(signs)·H`` along ``axis``, zero-padded to whole blocks."""
    x = x.movedim(axis, -1)
    x = F.pad(x, (0, -x.shape[-1] % len(signs)))
    return hadamard_transform(x, len(signs), signs).movedim(-1, axis)


def q(x, spec, axis, signs=None):
    x = x.detach().float()
    x = x if signs is None else rotate(x, axis, signs)
    return x if spec is None else fake_quantize(x, axis=axis, **spec)


@dataclass
class Gemms:
    """One recipe's operand specs (fake_quantize kwargs) and sign vectors per GEMM; ``resample``:
    backward signs drawn fresh per GEMM, as torch.randint(0, 2) on the default generator."""

    input: dict
    weight: dict
    grad: dict
    backward_input: dict
    backward_weight: dict
    fprop_signs: torch.Tensor | None = None
    dgrad_signs: torch.Tensor | None = None
    wgrad_signs: torch.Tensor | None = None
    resample: int | None = None  # the block size of freshly drawn backward signs

    def signs(self, fixed):
        return torch.randint(0, 2, (self.resample,)).float() * 2 - 1 if self.resample else fixed


class Spec6Linear(torch.autograd.Function):
    """``x · Wᵀ`` as ``A · B`` with ``B = Wᵀ``: each GEMM rotates and quantizes its operands along its
    own reduction axis, dY first (the order in which the random draws are made)."""

    @staticmethod
    def forward(ctx, x, w, gemms):
        ctx.save_for_backward(x, w)
        ctx.gemms = gemms
        return (q(x, gemms.input, -1, gemms.fprop_signs)
                @ q(w.mT, gemms.weight, -2, gemms.fprop_signs)).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        g = ctx.gemms
        signs = g.signs(g.dgrad_signs)
        dy_n = q(dy, g.grad, -1, signs)
        dx = dy_n @ q(w.mT, g.backward_weight, -1, signs).mT
        signs = g.signs(g.wgrad_signs)
        dy_m = q(dy.reshape(-1, dy.shape[-1]), g.grad, -2, signs)
        dw = q(x.reshape(-1, x.shape[-1]), g.backward_input, -2, signs).mT @ dy_m
        return dx, dw.mT, None


def reference_mlp(mlp, x, linear):
    return linear(mlp.down, F.gelu(linear(mlp.up, x)))


def compare(recipe, linear, seed=0, **overrides):
    """The compiled MLP against the hand-written one: output and every gradient, bit for bit."""
    torch.manual_seed(seed)
    mlp = MLP()
    reference = copy.deepcopy(mlp)
    x = (torch.randn(2, 8, 64) * torch.linspace(0.1, 4, 64)).requires_grad_()  # uneven channels
    x_ref = x.detach().clone().requires_grad_()
    dy = torch.randn(2, 8, 64)
    qm = qpass.compile(mlp, recipe, backend="aot_eager", **overrides)
    torch.manual_seed(seed + 1)
    y = qm(x)
    y.backward(dy)
    torch.manual_seed(seed + 1)
    y_ref = reference_mlp(reference, x_ref, linear)
    y_ref.backward(dy)
    assert_same(y, y_ref)
    assert_same(x.grad, x_ref.grad)
    for (name, p), p_ref in zip(mlp.named_parameters(), reference.parameters()):
        assert_same(p.grad, p_ref.grad)
    return qm


NVFP4 = {"format": "nvfp4"}
NVFP4_TILES = {"format": "nvfp4", "granularity": ("tile", 16)}
NVFP4_SR = {"format": "nvfp4", "rounding": "stochastic"}


def test_nvfp4_train_matches_spec6():
    gemms = Gemms(NVFP4, NVFP4_TILES, NVFP4_SR, NVFP4, NVFP4_TILES, wgrad_signs=TE_SIGNS)
    qm = compare("nvfp4-train", lambda layer, t: Spec6Linear.apply(t, layer.weight, gemms) + layer.bias)
    row = qpass.report(qm).quantized[0]
    assert row["formats"]["wgrad.input"].startswith("nvfp4+hadamard-block16")
    assert row["formats"]["fprop.weight"] == "nvfp4(16x16)"


MXFP4 = {"format": "mxfp4", "scale_mode": "rceil"}
MXFP4_SR = {**MXFP4, "rounding": "stochastic"}


def test_mxfp4_train_matches_spec6_with_fresh_signs_each_backward():
    gemms = Gemms(MXFP4, MXFP4, MXFP4_SR, MXFP4_SR, MXFP4_SR, fprop_signs=random_signs(32, 0), resample=32)
    compare("mxfp4-train", lambda layer, t: Spec6Linear.apply(t, layer.weight, gemms) + layer.bias)


def two_identical_steps(**overrides):
    torch.manual_seed(0)
    mlp = MLP()
    qm = qpass.compile(mlp, "mxfp4-train", backend="aot_eager", **overrides)
    x = torch.randn(2, 8, 64)
    grads = []
    for _ in range(2):
        qm(x).sum().backward()
        grads.append(mlp.up.weight.grad.clone())
        mlp.zero_grad()
    return grads


def test_mxfp4_train_backward_signs_change_every_step():
    # Rounding to nearest, so that the resampled signs are the only random draws left.
    assert not torch.equal(*two_identical_steps(rounding="rne"))
    fixed = qpass.Rotation(32, seed=1)
    assert torch.equal(
        *two_identical_steps(rounding="rne", hadamard={"fprop": fixed, "dgrad": fixed, "wgrad": fixed}))


def test_the_nvfp4_wgrad_rotation_is_orthogonal_with_transformer_engines_signs():
    rotation = qpass.get_recipe("nvfp4-train").hadamard.wgrad
    matrix = rotation(torch.eye(16, dtype=torch.float64), -1)  # row i: e_i · R
    torch.testing.assert_close(matrix @ matrix.T, torch.eye(16, dtype=torch.float64), rtol=0, atol=1e-15)
    sylvester = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(4):
        sylvester = torch.cat((torch.cat((sylvester, sylvester), 1), torch.cat((sylvester, -sylvester), 1)))
    torch.testing.assert_close(matrix, torch.diag(TE_SIGNS.double()) @ sylvester / 4, rtol=0, atol=1e-15)


@pytest.mark.parametrize("recipe, gemm, role",
                         [("nvfp4-train", "dgrad", "grad_output"), ("mxfp4-train", "wgrad", "input")])
def test_the_recipes_stochastic_rounding_is_unbiased(recipe, gemm, role):
    quantizer = qpass.get_recipe(recipe).quantizer(gemm, role)
    assert quantizer.rounding == "stochastic"
    torch.manual_seed(0)
    # Per block, the largest magnitude on the grid at its scale: no element saturates (rceil MX
    # scales never clip; for NVFP4 a block max that is 448/2^j of the tensor's puts s_b on E4M3).
    block_max = 6.0 * 2.0 ** -torch.arange(4.0).unsqueeze(1)
    x = (torch.rand(4, 64) * 2 - 1) * block_max
    x[:, ::16] = block_max
    draws = 4000
    mean = quantizer(x.repeat(draws, 1), -1).view(draws, 4, 64).double().mean(0)
    step = qpass.formats.api.quantization_step(x, quantizer.spec, -1).double()
    # Each draw lands on one of the two neighbours: its standard deviation is at most step/2.
    assert ((mean - x.double()).abs() <= 5 * step / 2 / draws**0.5).all()
    rne = qpass.fake_quantize(x, quantizer.spec, -1).double()
    assert (mean - x.double()).abs().mean() < (rne - x.double()).abs().mean() / 10


FP4_CHANNEL = {"format": "fp4_e2m1", "granularity": "channel"}
E5M2 = {"format": "fp8_e5m2"}


class OutlierClamp(torch.autograd.Function):
    """Rows clamped at their (1 − α, α) quantiles (widened to include 0) and the residual; the
    gradient goes to the clamped part inside the bounds and to the residual outside them."""

    @staticmethod
    def forward(ctx, x, alpha):
        bounds = torch.quantile(x, torch.tensor([1 - alpha, alpha]), dim=-1, keepdim=True)
        residual = x - x.clamp(bounds[0].clamp(max=0), bounds[1].clamp(min=0))
        ctx.save_for_backward(residual == 0)
        return x - residual, residual

    @staticmethod
    def backward(ctx, grad_clamped, grad_residual):
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad_clamped, grad_residual), None


class FP4Product(torch.autograd.Function):
    """``x · Wᵀ`` in per-row FP4; backward on the forward's FP4 operands with per-tensor E5M2 dY,
    and the weight's gradient times the DGE multiplier when ``dge``."""

    @staticmethod
    def forward(ctx, x, w, dge):
        xq, wq = q(x, FP4_CHANNEL, -1), q(w.mT, FP4_CHANNEL, -2)
        ctx.save_for_backward(xq, wq, w)
        ctx.dge = dge
        return (xq @ wq).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        xq, wq, w = ctx.saved_tensors
        dyq = q(dy, E5M2, -1)
        dw = xq.reshape(-1, xq.shape[-1]).mT @ dyq.reshape(-1, dyq.shape[-1])
        if ctx.dge:
            dw = dw * dge_multiplier(w.mT, "fp4_e2m1", -2, granularity="channel")
        return dyq @ wq.mT, dw.mT, None


def fp4_linear(dge, occ):
    def linear(layer, t):
        clamped, residual = OutlierClamp.apply(t, occ) if occ else (t, None)
        y = FP4Product.apply(clamped, layer.weight, dge) + layer.bias
        if residual is None:
            return y
        return y + (residual.flatten(0, -2) @ layer.weight.mT).reshape(*residual.shape[:-1], -1)

    return linear


@pytest.mark.parametrize("dge, occ", [(True, 0.99), (False, 0.99), (True, None), (False, None), (True, 0.9)])
def test_fp4_train_matches_spec6_with_dge_and_occ(dge, occ, monkeypatch):
    # The residual product's sparse path sums in another order than the dense one written here
    # (tests/ops/test_clamping.py shows the two paths equal where sums are exact in any order).
    monkeypatch.setattr(qpass.ops.clamping, "_use_sparse", lambda r: False)
    qm = compare("fp4-train", fp4_linear(dge, occ), dge=dge, occ=occ)
    row = qpass.report(qm)["up"]
    assert row["formats"]["dgrad.weight"] == "fprop.weight" and row["formats"]["wgrad.input"] == "fprop.input"
    assert any("occ" in note for note in row["notes"]) == (occ is not None)
