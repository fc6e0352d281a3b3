"""Planning: a recipe's quantizers per site, the default exclusions, rules and exclude globs."""

import pytest
import torch
import torch.nn.functional as F
from graphs import capture
from torch import nn

from qpass import Quantizer, get_recipe
from qpass.passes import find_sites, plan_sites


class Mixed(nn.Module):
    """One site of each kind that planning treats differently."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 64)
        self.proj = nn.Linear(64, 64)
        self.narrow = nn.Linear(16, 64)  # K = 16 < 32
        self.w = nn.Parameter(torch.randn(64, 64))
        self.head = nn.Linear(64, 100, bias=False)

    def forward(self, ids):
        x = self.proj(self.embed(ids))
        x = x + self.narrow(x[..., :16])
        q = x.unflatten(-1, (2, 32)).transpose(1, 2)
        x = x + F.scaled_dot_product_attention(q, q, q).transpose(1, 2).flatten(-2)
        x = self.w @ x.mT  # weight on the left
        x = x.mT + torch.bmm(x.mT, x)  # activation x activation, K = 64
        return self.head(x)


@pytest.fixture(scope="module")
def sites():
    gm, parameters, _ = capture(Mixed(), torch.randint(0, 100, (2, 64)))
    return find_sites(gm.graph, parameters)


def plans_for(sites, recipe="fp8-train", **overrides):
    globs = set()
    plans = plan_sites(sites, get_recipe(recipe).with_overrides(**overrides), globs)
    return {p.name: p for p in plans}, globs


def test_default_exclusions(sites):
    plans, _ = plans_for(sites)
    assert plans["embed"].excluded.startswith("embedding")
    assert "lm_head" in plans["head"].excluded
    assert plans["narrow"].excluded == "K=16 < 32, excluded by default"
    assert plans["sdpa"].excluded.startswith("attention stays in high precision")
    assert {n for n, p in plans.items() if p.excluded is None} == {"proj", "matmul", "bmm"}


def test_training_recipe_roles_per_gemm(sites):
    plans, _ = plans_for(sites)
    assert plans["proj"].products[0].formats() == {
        "fprop.input": "fp8_e4m3", "fprop.weight": "fp8_e4m3",
        "dgrad.grad_output": "fp8_e5m2", "dgrad.weight": "fp8_e4m3",
        "wgrad.grad_output": "fp8_e5m2", "wgrad.input": "fp8_e4m3",
    }


def test_weight_on_the_left_makes_the_gradient_of_a_the_wgrad(sites):
    plans, _ = plans_for(sites, "mxfp8-train", **{"wgrad.input": "mxfp6_e3m2"})
    product = plans["matmul"].products[0]
    assert product.roles == ("weight", "input") and product.grad_gemms == ("wgrad", "dgrad")
    # dA (the weight's gradient) is the wgrad: its A-side operand is B, the input, in mxfp6.
    assert product.quantizers.db_a == Quantizer("mxfp8_e4m3", scale_mode="rceil")  # dgrad's weight
    assert product.quantizers.da_b == Quantizer("mxfp6_e3m2")  # wgrad's input
    assert product.formats()["wgrad.input"] == "mxfp6_e3m2"


def test_inference_recipe_quantizes_forward_only(sites):
    plans, _ = plans_for(sites, "fp8-infer")
    assert plans["proj"].products[0].formats() == {
        "fprop.input": "fp8_e4m3(channel)", "fprop.weight": "fp8_e4m3(channel)"
    }
    assert not plans["proj"].products[0].quantizers.quantizes_backward


def test_weight_only_recipe_leaves_activation_products_alone(sites):
    plans, _ = plans_for(sites, "mxfp4-weight-only")
    assert plans["bmm"].excluded == "the recipe quantizes none of its operands (roles input, input)"
    assert plans["proj"].products[0].formats() == {"fprop.weight": "mxfp4"}


def test_attention_override_quantizes_sdpa_in_two_products(sites):
    plans, _ = plans_for(sites, "mxfp8-train", attention=True)
    qk, pv = plans["sdpa"].products
    assert qk.roles == ("q", "k") and pv.roles == ("p", "v")
    assert qk.formats()["fprop.q"] == pv.formats()["fprop.v"] == "mxfp8_e4m3(rceil)"


def test_rules_change_formats_and_can_undo_a_default_exclusion(sites):
    rules = [("pro*", {"weight": "mxfp4"}), ("narrow", {"exclude": False}), ("proj", {"rounding": "away"})]
    plans, globs = plans_for(sites, "mxfp8-train", rules=rules)
    assert plans["proj"].products[0].quantizers.b == Quantizer("mxfp4", rounding="away")
    assert plans["proj"].products[0].quantizers.a.rounding == "away"
    assert plans["narrow"].excluded is None
    assert plans["bmm"].products[0].quantizers.a == Quantizer("mxfp8_e4m3", scale_mode="rceil")
    assert globs == {"pro*", "narrow", "proj"}


def test_later_rules_win_and_exclude_globs_win_over_rules(sites):
    rules = [("proj", {"exclude": True}), ("p*", {"exclude": False})]
    plans, _ = plans_for(sites, rules=rules)
    assert plans["proj"].excluded is None
    plans, globs = plans_for(sites, rules=rules, exclude=["pr?j", "nothing.*"])
    assert plans["proj"].excluded == "excluded by exclude=['pr?j']"
    assert "nothing.*" not in globs


def test_a_rule_cannot_quantize_what_cannot_be_quantized(sites):
    plans, _ = plans_for(sites, rules=[("embed", {"exclude": False})])
    assert plans["embed"].excluded.startswith("embedding")
