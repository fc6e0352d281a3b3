"""Rewriting: which qpass ops each recipe inserts, and that excluded sites are not touched."""

import pytest
import torch
from graphs import capture, count_calls
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode

import qpass
from qpass import get_recipe, quantized
from qpass.ops import matmul
from qpass.passes import quantize_graph

QDQ = torch.ops.qpass.quantize_dequantize.default
QMM = torch.ops.qpass.quantized_matmul.default
QMM_BACKWARD = torch.ops.qpass.quantized_matmul_backward.default


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def rewritten(module, recipe, *inputs, **overrides):
    gm, parameters, example_inputs = capture(module, *inputs)
    plans, _ = quantize_graph(gm, parameters, get_recipe(recipe).with_overrides(**overrides), set())
    return gm, example_inputs, plans


def traced_step(gm, example_inputs):
    """ATen graph of forward + backward (gradients of every input)."""
    def step(*args):
        out = gm(*args)[0]
        return torch.autograd.grad(out.sum(), [a for a in args if a.requires_grad])

    return make_fx(step)(*example_inputs)


# recipe -> (QDQ nodes, quantized matmuls, their backward ops) for two linear layers
EXPECTED = {
    "fp8-train": (0, 2, 2),  # per-tensor input and weight: quantized once each, inside the product
    "mxfp8-train": (0, 2, 2),  # MX blocks follow each GEMM's reduction axis: all inside the op
    "mxfp6-train": (0, 2, 2),
    "fp8-infer": (4, 0, 0),
    "mxfp8-infer": (4, 0, 0),
    "mxfp6-infer": (4, 0, 0),
    "mxfp4-infer": (4, 0, 0),
    "nvfp4-infer": (4, 0, 0),
    "mxfp4-weight-only": (2, 0, 0),
}


@pytest.mark.parametrize("recipe", EXPECTED)
def test_inserted_ops_per_recipe(recipe):
    gm, example_inputs, plans = rewritten(TwoLinears(), recipe, torch.randn(4, 64, requires_grad=True))
    assert [p.excluded for p in plans] == [None, None]
    assert count_calls(gm, quantized.linear) == 2
    aten = traced_step(gm, example_inputs)
    counts = (count_calls(aten, QDQ), count_calls(aten, QMM), count_calls(aten, QMM_BACKWARD))
    assert counts == EXPECTED[recipe]


def test_excluded_sites_are_not_touched():
    gm, example_inputs, plans = rewritten(TwoLinears(), "mxfp8-train", torch.randn(4, 64), exclude=["down"])
    assert [p.excluded is None for p in plans] == [True, False]
    assert count_calls(gm, quantized.linear) == 1
    assert count_calls(gm, torch._C._nn.linear) == 1


def test_sdpa_with_attention_becomes_two_quantized_products():
    class Attention(nn.Module):
        def forward(self, q):
            return torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)

    q = torch.randn(1, 2, 40, 32)
    gm, example_inputs, _ = rewritten(Attention(), "mxfp8-train", q, attention=True)
    assert count_calls(gm, quantized.scaled_dot_product_attention) == 1
    aten = make_fx(gm)(*example_inputs)
    assert count_calls(aten, QMM) == 2
    assert count_calls(aten, torch.ops.aten._softmax.default) == 1


def test_a_graph_without_sites_is_unchanged():
    gm, _, plans = rewritten(nn.ReLU(), "fp8-train", torch.randn(3))
    assert plans == [] and not any(n.target is quantized.product for n in gm.graph.nodes)


def test_delayed_scaling_gives_each_operand_a_state():
    made = []
    gm, parameters, example_inputs = capture(TwoLinears(), torch.randn(4, 64))
    recipe = get_recipe("fp8-train").with_overrides(scaling="delayed")
    recipe = recipe.with_overrides(weight=qpass.Quantizer("fp8_e4m3", pow2=True))

    def new_state(site, operand, quantizer):
        made.append((f"{site}.{operand}", quantizer.pow2))
        return ""

    quantize_graph(gm, parameters, recipe, set(), new_state)
    assert made == [(f"{s}.{o}", o == "weight")
                    for s in ("up", "down") for o in ("input", "weight", "grad_output")]


class GemmLog(TorchDispatchMode):
    """Records every ATen op, looking inside qpass's product ops (run by their Python implementations
    under this mode) rather than at them."""

    IMPLEMENTATIONS = {
        torch.ops.qpass.quantized_matmul.default: matmul.fprop,
        torch.ops.qpass.quantized_matmul_backward.default: matmul.backward_gemms,
        torch.ops.qpass.gemm_operand.default: matmul.operand_tensors,
    }

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        implementation = self.IMPLEMENTATIONS.get(func)
        if implementation is not None:
            with self:
                return implementation(*args, **(kwargs or {}))
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


GEMMS = (torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default,
         torch.ops.aten.baddbmm.default, torch.ops.aten.matmul.default)


@pytest.mark.parametrize("recipe", ["fp8-train", "fp8-rowwise-train"])
def test_every_gemm_of_a_quantized_site_is_a_scaled_gemm(recipe):
    """The rewritten graph run eagerly (Dynamo runs no compiled code under a dispatch mode): forward,
    dgrad and wgrad of both sites on _scaled_mm, and no fp32 GEMM anywhere."""
    gm, example_inputs, plans = rewritten(TwoLinears(), recipe, torch.randn(4, 64, requires_grad=True))
    assert [p.excluded for p in plans] == [None, None]
    log = GemmLog()
    with log:
        gm(*example_inputs)[0].sum().backward()
    assert log.ops.count(torch.ops.aten._scaled_mm.default) == 2 * 3
    assert [op for op in log.ops if op in GEMMS] == []
