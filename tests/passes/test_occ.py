"""The outlier clamping pass on tiny graphs: where it clamps, what it inserts, that the split is exact."""

import copy

import torch
from graphs import capture, count_calls
from no_quantization import quantization_off
from torch import nn

import qpass
from qpass.ops.clamping import clamp_outliers
from qpass.passes import find_sites, plan_sites
from qpass.passes.occ import clamp_inputs, compensate

F64 = dict(dtype=torch.float64)


class Mixed(nn.Module):
    """A linear, a matmul with a weight on the right, and a matmul of two activations."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 96)
        self.proj = nn.Parameter(torch.randn(96, 64) / 10)

    def forward(self, x):
        h = torch.relu(self.up(x)) @ self.proj
        return h @ h.mT @ x


def clamped_graph(module, x, recipe="fp4-train", **overrides):
    gm, parameters, inputs = capture(module, x)
    plans = plan_sites(
        find_sites(gm.graph, parameters), qpass.get_recipe(recipe).with_overrides(**overrides), set())
    clamp_inputs(gm, plans)
    return gm, plans, inputs


def test_inputs_times_weights_are_clamped_and_compensated():
    module = Mixed().double()
    x = torch.randn(2, 8, 64, **F64) * torch.linspace(0.1, 8, 64, **F64)
    gm, plans, inputs = clamped_graph(module, x)
    assert count_calls(gm, clamp_outliers) == count_calls(gm, compensate) == 2
    assert {p.name: p.occ for p in plans if p.occ} == {"up": 0.99, "matmul": 0.99}
    (out,) = gm(*inputs)  # nothing quantized yet: the split alone, exact up to fp64 rounding
    torch.testing.assert_close(out, module(x), atol=1e-10, rtol=1e-12)


def test_nothing_is_inserted_without_occ_or_at_excluded_sites():
    module, x = Mixed(), torch.randn(2, 8, 64)
    gm, _, _ = clamped_graph(module, x, occ=None)
    assert count_calls(gm, clamp_outliers) == 0
    gm, _, _ = clamped_graph(module, x, exclude=["up"])
    assert count_calls(gm, clamp_outliers) == 1


def test_training_gradients_match_the_unclamped_model_without_quantization():
    module = Mixed().double()
    x = torch.randn(2, 8, 64, **F64) * torch.linspace(0.1, 8, 64, **F64)
    x_ref = x.clone().requires_grad_()
    qm = qpass.compile(copy.deepcopy(module), "fp4-train", backend="aot_eager", dge=False)
    x.requires_grad_()
    with quantization_off():
        qm(x).sum().backward()
    module(x_ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-10, rtol=1e-10)
    for (name, p), q in zip(module.named_parameters(), qm.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-10, rtol=1e-10, msg=name)


def test_occ_with_ocs_still_preserves_the_function():
    module = Mixed().double()
    x = torch.randn(2, 8, 64, **F64)
    qm = qpass.compile(copy.deepcopy(module), "fp4-train", backend="aot_eager", ocs=0.05)
    with quantization_off():
        out = qm(x)
    torch.testing.assert_close(out, module(x), atol=1e-10, rtol=1e-12)
    assert qpass.report(qm)["up"]["extra_channels"] == 4
