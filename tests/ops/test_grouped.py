"""``qpass::grouped_matmul``: each expert's rows times its matrix, quantized exactly as the dense
product of those operands (``qpass.quantized.product``), forward and both gradients, bit for bit;
experts without tokens, rows past the last offset, and a NaN that stays in its own expert."""

import pytest
import torch
from spec6 import adversarial, assert_same

import qpass
from qpass.passes.plan import product_plan
from qpass.quantized import grouped_mm, product

K, N = 64, 48
# Deterministic recipes (stochastic rounding draws in another order expert by expert than a loop of
# dense products, whose backward runs the experts in reverse).
RECIPES = ["fp8-train", "fp8-rowwise-train", "mxfp8-train", "mxfp6-train", "fp4-train", "fp8-infer",
           "mxfp8-infer", "mxfp4-infer", "nvfp4-infer", "mxfp4-weight-only"]


def config(recipe: str):
    plan, _ = product_plan(qpass.get_recipe(recipe), ("input", "weight"), (None, K, N))
    return plan.config


def leaves(*tensors):
    return [t.clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("counts", [(5, 0, 1, 34), (40, 0, 0, 0)], ids=["empty-one-many", "one-expert"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_each_expert_is_its_dense_product(recipe, counts):
    rows = sum(counts) + 3  # 3 rows past the last offset: no expert's
    a = adversarial(rows, K, seed=0)
    b = torch.randn(len(counts), K, N, generator=torch.Generator().manual_seed(1))
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    dy = torch.randn(rows, N, generator=torch.Generator().manual_seed(2))

    a1, b1 = leaves(a, b)
    y = grouped_mm(a1, b1, offs, config(recipe))
    y.backward(dy)

    a2, b2 = leaves(a, b)
    pieces, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            pieces.append(product(a2[start:start + count], b2[expert], config(recipe)))
        start += count
    expected = torch.cat([*pieces, a2.new_zeros(3, N)])
    expected.backward(dy)

    assert_same(y, expected)
    assert_same(a1.grad, a2.grad)
    assert_same(b1.grad, b2.grad)
    assert (y[-3:] == 0).all() and (a1.grad[-3:] == 0).all()
    assert (b1.grad[[e for e, c in enumerate(counts) if c == 0]] == 0).all()


def test_a_nan_makes_only_its_own_experts_per_tensor_scale_nan():
    # Per-tensor scales are per expert: another expert's tokens never share them.
    a, b = torch.randn(12, K), torch.randn(2, K, N)
    a[2, 5] = float("nan")
    y = grouped_mm(a, b, torch.tensor([6, 12], dtype=torch.int32), config("fp8-train"))
    assert y[:6].isnan().all() and torch.isfinite(y[6:]).all()


def test_compiles_as_one_node_without_graph_breaks():
    a, b = torch.randn(12, K), torch.randn(3, K, N)
    offs = torch.tensor([4, 4, 12], dtype=torch.int32)
    product_config = config("mxfp8-train")
    eager = grouped_mm(a, b, offs, product_config)
    compiled = torch.compile(lambda *args: grouped_mm(*args, product_config), backend="aot_eager",
                             fullgraph=True)
    assert_same(compiled(a, b, offs), eager)
