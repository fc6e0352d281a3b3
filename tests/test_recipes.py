"""Recipes: the built-ins of SPEC section 8, overrides, and clear errors for bad ones."""

import copy
import pickle

import pytest

import qpass
from qpass import Quantizer, Recipe, get_recipe
from qpass.recipes import GemmOverrides

SPEC_RECIPES = ["fp8-train", "fp8-rowwise-train", "mxfp8-train", "mxfp6-train", "fp4-train", "nvfp4-train",
                "mxfp4-train", "fp8-infer", "mxfp8-infer", "mxfp6-infer", "mxfp4-infer", "nvfp4-infer",
                "mxfp4-weight-only"]


def test_builtin_recipes_are_the_spec_ones():
    assert qpass.recipes() == SPEC_RECIPES


@pytest.mark.parametrize("name, roles", [
    ("fp8-train", {"input": "fp8_e4m3", "weight": "fp8_e4m3", "grad_output": "fp8_e5m2"}),
    ("mxfp8-train", dict.fromkeys(("input", "weight", "grad_output"), "mxfp8_e4m3(rceil)")),
    ("mxfp6-train", dict.fromkeys(("input", "weight", "grad_output"), "mxfp6_e3m2")),
    ("fp8-infer", {"input": "fp8_e4m3(channel)", "weight": "fp8_e4m3(channel)", "grad_output": "None"}),
    ("nvfp4-infer", {"input": "nvfp4", "weight": "nvfp4", "grad_output": "None"}),
    ("mxfp4-weight-only", {"input": "None", "weight": "mxfp4", "grad_output": "None"}),
    ("fp4-train", {"input": "fp4_e2m1(channel)", "weight": "fp4_e2m1(channel)", "grad_output": "fp8_e5m2"}),
    ("nvfp4-train", {"input": "nvfp4", "weight": "nvfp4(16x16)", "grad_output": "nvfp4(stochastic)"}),
    ("mxfp4-train", dict.fromkeys(("input", "weight", "grad_output"), "mxfp4(rceil)")),
])
def test_recipe_roles(name, roles):
    recipe = get_recipe(name)
    assert {role: str(getattr(recipe, role)) for role in roles} == roles
    assert recipe.quantizes_backward == (roles["grad_output"] != "None")


def test_inference_recipes_leave_the_backward_gemms_alone():
    recipe = get_recipe("fp8-infer")
    assert recipe.quantizer("dgrad", "weight") is None and recipe.quantizer("fprop", "weight") is not None


def test_get_recipe_returns_a_copy_to_edit():
    recipe = get_recipe("fp8-train")
    recipe.exclude.append("lm_head")
    assert get_recipe("fp8-train").exclude == []


def test_overrides():
    recipe = get_recipe("mxfp8-train").with_overrides(
        rounding="stochastic", scale_mode="floor", attention=True, **{"wgrad.input": "mxfp4"}
    )
    assert recipe.input == Quantizer("mxfp8_e4m3", scale_mode="floor", rounding="stochastic")
    assert recipe.quantizer("wgrad", "input") == Quantizer("mxfp4", rounding="stochastic")
    assert recipe.quantizer("dgrad", "weight") == recipe.weight and recipe.attention


def test_scale_mode_leaves_non_mx_quantizers_alone():
    recipe = get_recipe("fp8-train").with_overrides(input="mxfp8_e4m3", scale_mode="even")
    assert recipe.input.scale_mode == "even" and recipe.weight.scale_mode is None


def test_scale_mode_4over6_goes_to_the_nvfp4_quantizers():
    recipe = get_recipe("nvfp4-infer").with_overrides(scale_mode="4over6")
    assert str(recipe.input) == str(recipe.weight) == "nvfp4(4over6)"
    train = get_recipe("nvfp4-train").with_overrides(scale_mode="4over6")
    assert [str(q) for q in (train.input, train.weight, train.grad_output)] == [
        "nvfp4(4over6)", "nvfp4(16x16, 4over6)", "nvfp4(4over6, stochastic)"]
    # Each family gets its own modes: an MX mode leaves nvfp4 alone and 4over6 leaves MX alone.
    mixed = get_recipe("nvfp4-infer").with_overrides(input="mxfp8_e4m3", scale_mode="rceil")
    assert (mixed.input.scale_mode, mixed.weight.scale_mode) == ("rceil", None)
    mx = get_recipe("mxfp8-infer")
    mixed = mx.with_overrides(weight="nvfp4", scale_mode="4over6")
    assert (mixed.input, mixed.weight.scale_mode) == (mx.input, "4over6")
    ruled = get_recipe("nvfp4-infer").with_overrides(rules=[("mlp.*", {"scale_mode": "4over6"})])
    assert ruled.input.scale_mode is None  # the rule's site gets it when planned


@pytest.mark.parametrize("recipe, mode, message", [
    ("fp8-train", "4over6", r"scale_mode='4over6' applies to nvfp4; recipe 'fp8-train' has none"),
    ("mxfp8-train", "4over6", r"applies to nvfp4; recipe 'mxfp8-train' has none"),
    ("nvfp4-infer", "rceil", r"scale_mode='rceil' applies to MX formats; recipe 'nvfp4-infer' has none"),
    ("nvfp4-infer", "4/6", r"unknown scale_mode '4/6'"),
    ("mxfp4-train", "six", r"unknown scale_mode 'six'"),
])
def test_bad_scale_modes_list_the_accepted_ones_per_family(recipe, mode, message):
    with pytest.raises(ValueError, match=message) as info:
        get_recipe(recipe).with_overrides(scale_mode=mode)
    assert "floor, ceil, even, rceil for the MX formats" in str(info.value)
    assert "4over6 for nvfp4" in str(info.value)
    with pytest.raises(ValueError, match=message):  # in a rule too, when the recipe is built
        get_recipe(recipe).with_overrides(rules=[("*", {"scale_mode": mode})])


def test_compile_applies_4over6_to_nvfp4_quantizers():
    torch = pytest.importorskip("torch")
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    qm = qpass.compile(linear, "nvfp4-infer", backend="aot_eager", scale_mode="4over6")
    with torch.no_grad():
        y = qm(x)
    formats = qpass.report(qm)["linear"]["formats"]
    assert formats["fprop.input"] == formats["fprop.weight"] == "nvfp4(4over6)"
    q = Quantizer("nvfp4", scale_mode="4over6")
    expected = torch.nn.functional.linear(q(x, -1), q(linear.weight.detach(), -1), linear.bias.detach())
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    assert not torch.equal(q(x, -1), Quantizer("nvfp4")(x, -1))


def test_delayed_scaling_settings():
    recipe = get_recipe("fp8-train").with_overrides(scaling="delayed", history_len=32, margin=1)
    assert (recipe.scaling, recipe.history_len, recipe.margin) == ("delayed", 32, 1)


def test_a_custom_recipe():
    recipe = Recipe("mine", input="mxfp6_e2m3", weight={"format": "mxfp4", "scale_mode": "rceil"},
                    grad_output=Quantizer("fp8_e5m2", granularity="channel"))
    assert recipe.weight == Quantizer("mxfp4", scale_mode="rceil") and recipe.quantizes_backward


def test_fp4_train_is_dge_occ_and_the_forwards_operands_in_backward():
    recipe = get_recipe("fp4-train")
    assert (recipe.dge, recipe.occ, recipe.reuse_forward) == (qpass.DGE(k=5, clamp=3), 0.99, True)
    assert str(recipe.quantizer("fprop", "weight")) == "fp4_e2m1(channel, dge)"
    assert recipe.quantizer("dgrad", "weight") == recipe.quantizer("fprop", "weight")
    assert recipe.quantizer("wgrad", "input") == recipe.input
    assert recipe.quantizer("wgrad", "grad_output") == Quantizer("fp8_e5m2")
    ablation = recipe.with_overrides(dge=False, occ=None)
    assert ((ablation.dge, ablation.occ) == (None, None)
            and str(ablation.quantizer("fprop", "weight")) == "fp4_e2m1(channel)")
    assert recipe.with_overrides(dge=qpass.DGE(k=3)).quantizer("fprop", "weight").dge.k == 3


def test_nvfp4_and_mxfp4_train_rotations():
    nvfp4 = get_recipe("nvfp4-train").hadamard
    assert nvfp4.fprop is nvfp4.dgrad is None
    assert nvfp4.wgrad.signs == (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)
    mxfp4 = get_recipe("mxfp4-train")
    assert mxfp4.hadamard.fprop == qpass.Rotation(32, seed=0)
    assert mxfp4.hadamard.dgrad == mxfp4.hadamard.wgrad == qpass.Rotation(32, resample=True)
    backward = [mxfp4.quantizer(gemm, role) for gemm, role in
                [("dgrad", "grad_output"), ("dgrad", "weight"), ("wgrad", "grad_output"), ("wgrad", "input")]]
    assert {str(q) for q in backward} == {"mxfp4(rceil, stochastic)"}
    assert mxfp4.quantizer("fprop", "input").rounding == "rne"


@pytest.mark.parametrize("make, error, message", [
    (lambda: get_recipe("fp4-train").with_overrides(occ=0.3), ValueError, r"quantile alpha in \(0.5, 1\]"),
    (lambda: get_recipe("mxfp4-weight-only").with_overrides(occ=0.99), ValueError, "quantizes no input"),
    (lambda: get_recipe("fp8-train").with_overrides(weight=None, dge=True), ValueError, "needs weight="),
    (lambda: get_recipe("fp8-train").with_overrides(scaling="delayed", dge=True), ValueError,
     "scaling='current'"),
    (lambda: get_recipe("fp4-train").with_overrides(dge="yes"), TypeError, "dge= takes"),
    (lambda: get_recipe("mxfp4-train").with_overrides(dge=True), ValueError, "forward rotation"),
    (lambda: get_recipe("fp4-train").with_overrides(**{"dgrad.weight": "mxfp4"}), ValueError, "cannot set"),
    (lambda: get_recipe("fp4-train").with_overrides(hadamard="block32", dge=False), ValueError,
     "reuse_forward"),
    (lambda: get_recipe("fp8-train").with_overrides(hadamard=qpass.Rotation(32, resample=True)), ValueError,
     "backward GEMMs"),
    (lambda: qpass.DGE(k=0.5), ValueError, "k must be >= 1"),
    (lambda: get_recipe("fp4"), ValueError,
     "unknown recipe 'fp4'; expected one of fp8-train, fp8-rowwise-train, mxfp8-train"),
    (lambda: get_recipe("fp8-train").with_overrides(atention=True), ValueError,
     r"'atention'; valid keys: input"),
    (lambda: get_recipe("fp8-train").with_overrides(hadamard="block48"), ValueError,
     "unknown rotation 'block48'; expected one of block16"),
    (lambda: get_recipe("fp8-train").with_overrides(hadamard=["block16", "full"]), ValueError,
     "one rotation"),
    (lambda: get_recipe("fp8-train").with_overrides(hadamard={"bprop": "full"}), ValueError,
     "unknown hadamard keys"),
    (lambda: get_recipe("fp8-train").with_overrides(scaling="delayed", hadamard="block16"), ValueError,
     "rotation"),
    (lambda: get_recipe("fp8-train").with_overrides(ocs=1.5), ValueError, r"expand ratio in \(0, 1\]"),
    (lambda: get_recipe("fp8-train").with_overrides(rules=[("*", {"hadamard": "residual"})]), ValueError,
     "whole-model"),
    (lambda: get_recipe("mxfp8-train").with_overrides(scaling="delayed"), ValueError, "per-tensor absmax"),
    (lambda: get_recipe("fp8-train").with_overrides(scaling="lazy"), ValueError, "current, delayed"),
    (lambda: get_recipe("fp8-train").with_overrides(scale_mode="rceil"), ValueError, "MX formats"),
    (lambda: get_recipe("fp8-train").with_overrides(input="fp7"), ValueError, "unknown format 'fp7'"),
    (lambda: get_recipe("mxfp4-weight-only").with_overrides(attention=True), ValueError, "has none"),
    (lambda: get_recipe("fp8-train").with_overrides(rules=[("x", {"bogus": 1})]), ValueError, "rule key"),
    (lambda: get_recipe("fp8-train").with_overrides(rules=["x"]), TypeError, "a rule is"),
    (lambda: get_recipe("fp8-train").with_overrides(scaling="delayed", rules=[("x", {"input": "mxfp4"})]),
     ValueError, "per-tensor absmax"),
    (lambda: Recipe(per_gemm={"fprop.grad": None}), ValueError, "unknown per_gemm keys"),
    (lambda: Quantizer("mxfp4", granularity="channel"), ValueError, "fixes its own scaling"),
    (lambda: Quantizer("fp8_e4m3", rounding="down"), ValueError, "rounding"),
])
def test_bad_recipes_are_named(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_typed_per_gemm_overrides_are_the_keyed_ones():
    overrides = GemmOverrides(wgrad_input="mxfp8_e4m3", dgrad_weight=None)
    typed = get_recipe("fp8-train").with_overrides(per_gemm=overrides)
    keyed = get_recipe("fp8-train").with_overrides(**{"wgrad.input": "mxfp8_e4m3", "dgrad.weight": None})
    assert typed.per_gemm == keyed.per_gemm
    assert typed.quantizer("wgrad", "input") == Quantizer("mxfp8_e4m3")
    assert typed.quantizer("dgrad", "weight") is None
    assert typed.quantizer("wgrad", "grad_output") == Quantizer("fp8_e5m2")  # unset: the role's own
    for twin in (copy.deepcopy(typed), pickle.loads(pickle.dumps(typed))):  # UNSET stays itself
        assert twin.per_gemm == typed.per_gemm and list(twin.per_gemm) == ["dgrad.weight", "wgrad.input"]
