"""The einsum parser: a two-operand einsum read as a batched matmul, or why it is not one."""

import pytest
import torch

from qpass import quantized
from qpass.einsum import einsum_layout
from qpass.execution import Execution
from qpass.matmul_quantizers import MatmulQuantizers


@pytest.mark.parametrize("equation, groups", [
    ("btk,nk->btn", ("", "bt", "k", "n")),
    ("bhqd,bhkd->bhqk", ("bh", "q", "d", "k")),
    ("ij , jk -> ik", ("", "i", "j", "k")),
    ("bij,bjk->bki", ("b", "i", "j", "k")),
])
def test_indices_are_batch_m_k_and_n(equation, groups):
    layout = einsum_layout(equation)
    assert (layout.batch, layout.free_a, layout.contracted, layout.free_b) == groups


@pytest.mark.parametrize("equation, num_operands, why", [
    ("ii,ij->ij", 2, "diagonal"),
    ("ij,kl->ijkl", 2, "contracts no index"),
    ("ij,jk->i", 2, "sums over or invents"),
    ("ij,jk,kl->il", 3, "not a two-operand"),
    ("...ij,jk->...ik", 2, "not a two-operand"),
    ("ij,jk", 2, "explicit output"),
])
def test_what_is_not_a_batched_matmul_says_why(equation, num_operands, why):
    layout = einsum_layout(equation, num_operands)
    assert isinstance(layout, str) and why in layout


@pytest.mark.parametrize("equation", ["btk,nk->btn", "bhqd,bhkd->bhqk", "bij,bjk->bki"])
def test_the_rearranged_product_is_the_einsum(equation):
    a_term, b_term = equation.split("->")[0].split(",")
    sizes = dict(b=2, t=3, h=2, q=3, d=5, k=4, n=6, i=3, j=4)
    generator = torch.Generator().manual_seed(0)
    # Small integers: every order of summation gives the same exact result.
    a = torch.randint(-4, 5, [sizes[i] for i in a_term], generator=generator).float()
    b = torch.randint(-4, 5, [sizes[i] for i in b_term], generator=generator).float()
    config = (MatmulQuantizers().to_json(), Execution().to_json())  # nothing quantized
    assert torch.equal(quantized.einsum(equation, a, b, config), torch.einsum(equation, a, b))
