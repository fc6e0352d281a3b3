"""The op-kind table: each entry is found exactly once in a tiny graph made for it, binds its
operands, and is replaced by its quantized form (a new kind needs an example here)."""

import pytest
import torch
import torch.nn.functional as F
from graphs import Wrap, capture, count_calls

import qpass
from qpass.passes import find_sites, insert_quantizers, plan_sites
from qpass.passes.kinds import KINDS


def attention(m, x):
    scores = torch.softmax(x @ x.mT / 8, dim=-1)
    return scores @ x


# kind -> (a forward that computes it once, the operands' roles)
EXAMPLES = {
    "linear": (lambda m, x: F.linear(x, m.w), ("input", "weight")),
    "matmul": (lambda m, x: x @ m.w, ("input", "weight")),
    "mm": (lambda m, x: torch.mm(x[0], m.w), ("input", "weight")),
    "bmm": (lambda m, x: torch.bmm(x, x.mT), ("input", "input")),
    "addmm": (lambda m, x: torch.addmm(m.w[0], x[0], m.w), ("input", "weight")),
    "baddbmm": (lambda m, x: torch.baddbmm(x[:, :, :8], x, x.mT[:, :, :8]), ("input", "input")),
    "einsum": (lambda m, x: torch.einsum("btk,nk->btn", x, m.w), ("input", "weight")),
    "sdpa": (lambda m, x: F.scaled_dot_product_attention(x[None], x[None], x[None]), ("q", "k", "v")),
    "attention_qk": (attention, ("q", "k")),
    "attention_pv": (attention, ("p", "v")),
    "embedding": (lambda m, x: m.table(x[0, :, 0].long().abs() % 16), ("weight",)),
    # 8 tokens sorted by expert, 2 each (torch._grouped_mm takes bf16 only under Dynamo)
    "grouped_mm": (lambda m, x: torch._grouped_mm(x[0].bfloat16(), m.experts.bfloat16(),
                                                  offs=torch.tensor([2, 4, 6, 8], dtype=torch.int32)),
                   ("input", "weight")),
    "token_bmm": (lambda m, x: torch.bmm(m.experts[(x[0, :, 0] > 0).long()], x[0].unsqueeze(-1)),
                  ("input", "weight")),
    "expert_linear": (lambda m, x: F.linear(x, m.experts[1]), ("input", "weight")),
    "expert_matmul": (lambda m, x: x @ m.experts[2], ("input", "weight")),
    "expert_bmm": (lambda m, x: torch.bmm(x.reshape(4, 4, 64), m.experts), ("input", "weight")),
}


def test_every_kind_has_an_example():
    assert set(EXAMPLES) == set(KINDS)
    assert {kind.family for kind in KINDS.values()} == {"matmul", "experts", "attention", "embedding"}


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_is_found_exactly_once(kind):
    fn, roles = EXAMPLES[kind]
    gm, parameters, _ = capture(Wrap(fn), torch.randn(2, 8, 64))
    sites = [s for s in find_sites(gm.graph, parameters) if s.kind == kind]
    assert len(sites) == 1
    (site,) = sites
    assert site.roles == roles and site.op is KINDS[kind]
    assert site.operands == site.op.operand_nodes(site.node)  # the binding reads the operands found
    assert site.unsupported is None


@pytest.mark.parametrize("kind", [k for k, v in KINDS.items() if v.replacement is not None])
def test_each_kind_is_replaced_by_its_quantized_form(kind):
    fn, _ = EXAMPLES[kind]
    gm, parameters, inputs = capture(Wrap(fn), torch.randn(2, 8, 64))
    (expected,) = gm(*inputs)
    recipe = qpass.get_recipe("mxfp8-infer").with_overrides(attention=True, rules=[("*", {"exclude": False})])
    plans = [p for p in plan_sites(find_sites(gm.graph, parameters), recipe, set()) if p.site.kind == kind]
    assert [p.excluded for p in plans] == [None]
    insert_quantizers(gm, plans)
    assert count_calls(gm, KINDS[kind].replacement) == 1
    (actual,) = gm(*inputs)
    assert actual.shape == expected.shape and torch.isfinite(actual).all()
    # MXFP8 E4M3 with floor scales: 18-31 dB measured (18 where softmax probabilities are quantized,
    # whose floor-scaled blocks saturate); an unquantized or mangled product would be far off.
    assert qpass.qsnr(expected, actual) > 15
