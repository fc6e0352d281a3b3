"""Site discovery: every matmul pattern is found exactly once, with its name, kind and roles."""

import pytest
import torch
import torch.nn.functional as F
from graphs import Wrap, capture
from torch import nn

from qpass.passes import find_sites


def sites_of(fn, x=None):
    x = torch.randn(2, 8, 64) if x is None else x
    gm, parameters, _ = capture(Wrap(fn), x)
    return find_sites(gm.graph, parameters)


# (pattern, expected kind, expected roles, expected name)
PATTERNS = [
    (lambda m, x: m.linear(x), "linear", ("input", "weight"), "linear"),
    (lambda m, x: F.linear(x, m.w), "linear", ("input", "weight"), "linear"),
    (lambda m, x: x @ m.w, "matmul", ("input", "weight"), "matmul"),
    (lambda m, x: m.w @ x.mT, "matmul", ("weight", "input"), "matmul"),
    (lambda m, x: torch.matmul(x, m.w.t()), "matmul", ("input", "weight"), "matmul"),
    (lambda m, x: x[0].mm(m.w), "mm", ("input", "weight"), "mm"),
    (lambda m, x: torch.mm(x[0], m.w), "mm", ("input", "weight"), "mm"),
    (lambda m, x: torch.bmm(x, x.mT), "bmm", ("input", "input"), "bmm"),
    (lambda m, x: torch.addmm(m.linear.bias, x[0], m.w), "addmm", ("input", "weight"), "addmm"),
    (lambda m, x: torch.baddbmm(x[:, :, :8], x, x.mT[:, :, :8]), "baddbmm", ("input", "input"), "baddbmm"),
    (lambda m, x: torch.einsum("btk,nk->btn", x, m.w), "einsum", ("input", "weight"), "einsum"),
    (lambda m, x: torch.einsum("bik,bjk->bij", x, x), "einsum", ("input", "input"), "einsum"),
    (lambda m, x: F.scaled_dot_product_attention(x[None], x[None], x[None]), "sdpa", ("q", "k", "v"), "sdpa"),
]


@pytest.mark.parametrize("fn, kind, roles, name", PATTERNS,
                         ids=[f"{p[1]}-{i}" for i, p in enumerate(PATTERNS)])
def test_each_pattern_is_found_once(fn, kind, roles, name):
    (site,) = sites_of(fn)
    assert (site.kind, site.roles, site.name) == (kind, roles, name)
    assert site.unsupported is None


def test_linear_module_is_named_by_its_path():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(64, 64), nn.ReLU()) for _ in range(2)])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    gm, parameters, _ = capture(Block(), torch.randn(3, 64))
    assert [s.name for s in find_sites(gm.graph, parameters)] == ["layers.0.0", "layers.1.0"]


def test_several_ops_in_one_module_get_numbered_suffixes():
    sites = sites_of(lambda m, x: (x @ m.w) @ m.w + torch.bmm(x, x.mT) @ x)
    assert [s.name for s in sites] == ["matmul", "matmul_1", "bmm", "matmul_2"]


def hand_written_attention(m, x):
    q, k, v = m.linear(x), x @ m.w, x
    mask = torch.ones(8, 8, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-2, -1)) / 8.0
    probabilities = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return F.dropout(probabilities, 0.0).to(x.dtype) @ v


def test_hand_written_attention_is_found():
    sites = {s.name: s for s in sites_of(hand_written_attention)}
    assert sites["attention_qk"].kind == "attention_qk" and sites["attention_qk"].roles == ("q", "k")
    assert sites["attention_pv"].kind == "attention_pv" and sites["attention_pv"].roles == ("p", "v")
    assert sites["linear"].kind == "linear" and sites["matmul"].kind == "matmul"
    assert sites["attention_pv"].reduction == 8  # the key length
    assert len(sites) == 4


def test_softmax_of_a_weight_product_is_not_attention():
    # softmax(x·W)·x: the first product has a weight operand, so it is a plain matmul.
    sites = sites_of(lambda m, x: torch.softmax(x @ m.w, -1) @ x.mT)
    assert [s.kind for s in sites] == ["matmul", "matmul"]


def test_integer_matmul_is_found_and_marked():
    (site,) = sites_of(lambda m, x: (x > 0).long() @ (x > 0).long().mT)
    assert "integer" in site.traits


def test_einsum_that_is_not_a_matmul_is_found_and_says_why():
    (site,) = sites_of(lambda m, x: torch.einsum("bij,bjk->bk", x, x.mT))
    assert site.kind == "einsum" and "sums over" in site.unsupported
    (site,) = sites_of(lambda m, x: torch.einsum("bij,bkl->bijkl", x[:, :2, :2], x[:, :2, :2]))
    assert "contracts no index" in site.unsupported
    (site,) = sites_of(lambda m, x: torch.einsum("bii->bi", x[:, :, :8]))
    assert "two-operand" in site.unsupported


def test_vector_operand_is_unsupported():
    (site,) = sites_of(lambda m, x: x @ m.w[0])
    assert site.unsupported == "a vector operand (matrix-vector product)"


def test_reduction_length_is_recorded():
    (site,) = sites_of(lambda m, x: torch.einsum("bkt,nkt->bn", x[:, :4, :8], m.w[:, :32].reshape(64, 4, 8)))
    assert site.reduction == 32  # two contracted indices: 4 x 8


def test_tied_and_untied_output_projections():
    class LM(nn.Module):
        def __init__(self, tied):
            super().__init__()
            self.embed = nn.Embedding(100, 64)
            self.body = nn.Linear(64, 64)
            self.head = nn.Linear(64, 100, bias=False)
            if tied:
                self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.body(self.embed(ids)))

    for tied in (True, False):
        gm, parameters, _ = capture(LM(tied), torch.randint(0, 100, (2, 5)))
        sites = {s.name: s for s in find_sites(gm.graph, parameters)}
        assert sites["embed"].kind == "embedding"
        assert "output_projection" in sites["head"].traits
        assert "output_projection" not in sites["body"].traits


def test_router_is_marked():
    class MoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.router = nn.Linear(64, 8)
            self.expert = nn.Linear(64, 64)

        def forward(self, x):
            weights, chosen = torch.topk(torch.softmax(self.router(x), -1), 2)
            return self.expert(x) * weights.sum(-1, keepdim=True) + chosen.sum()

    gm, parameters, _ = capture(MoE(), torch.randn(4, 64))
    sites = {s.name: s for s in find_sites(gm.graph, parameters)}
    assert sites["router"].traits == {"router"} and not sites["expert"].traits


def test_a_graph_without_matmuls_has_no_sites():
    assert sites_of(lambda m, x: torch.relu(x) * 2) == []


def test_batched_dot_product_einsum_is_a_matmul():
    (site,) = sites_of(lambda m, x: torch.einsum("bij,bij->bi", x, x))
    assert site.unsupported is None and site.reduction == 64


class _Experts(nn.Module):
    """Capacity-style experts (each expert's tokens a row of [E, C, K]), or a loop over the experts."""

    def __init__(self, loop: bool):
        super().__init__()
        self.loop = loop
        self.w1 = nn.Parameter(torch.randn(4, 64, 96))  # [E, K, N]
        self.w2 = nn.Parameter(torch.randn(4, 96, 64))

    def forward(self, x):
        if self.loop:  # a static loop: Dynamo unrolls it, one expert_linear per expert ([E, N, K] weights)
            return torch.stack([F.linear(x[e], self.w2[e]) for e in range(4)])
        return torch.bmm(torch.relu(torch.bmm(x, self.w1)), self.w2)


@pytest.mark.parametrize("loop", [False, True])
def test_expert_sites_are_named_by_their_weight(loop):
    from qpass.passes import ModelContext

    layer = nn.Sequential(_Experts(loop))
    gm, parameters, _ = capture(layer, torch.randn(4, 6, 64))
    found = [(s.name, s.kind, s.reduction) for s in find_sites(gm.graph, parameters, ModelContext.of(layer))]
    if loop:
        assert found == [(name, "expert_linear", 64) for name in ("0.w2", "0.w2_1", "0.w2_2", "0.w2_3")]
    else:
        assert found == [("0.w1", "expert_bmm", 64), ("0.w2", "expert_bmm", 96)]
