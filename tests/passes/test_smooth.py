"""SmoothQuant (qpass.passes.smooth): the scales, what the pass inserts, function preservation in
float64 on Hugging Face Llama and GPT-2, and what it buys an input with an outlier channel."""

import copy
from collections import Counter

import pytest
import torch
import transformers
from graphs import capture
from no_quantization import quantization_off
from test_residual import VOCAB, float64_llama_norm, hf_llama, ids  # noqa: F401 -- a fixture among them
from torch import nn

import qpass
from qpass.passes import ModelContext, quantize_graph
from qpass.passes.smooth import smoothing_scales


def test_scales_follow_the_formula_and_leave_empty_channels_alone():
    x, w = torch.tensor([4.0, 0.0, 1.0, 9.0]), torch.tensor([1.0, 2.0, 0.0, 0.25])
    s = smoothing_scales(0.5, x, w)
    assert s == [2.0, 1.0, 1.0, 8.0]  # 4^.5 / 1^.5; no input; no weight; 9^.5 / .25^.5 = 6 -> 2^3
    assert smoothing_scales(0.75, x[:1], w[:1]) == [4.0]  # 4^.75 = 2^1.5, rounded (to even) to 2^2


def calibrated(model, recipe, batches, **overrides):
    qm = qpass.compile(copy.deepcopy(model), recipe, backend="aot_eager", **overrides)
    qpass.calibrate(qm, batches)
    return qm


def assert_preserved(model, qm, tokens):
    expected = model(tokens).logits
    with quantization_off():
        actual = qm(tokens).logits
    scale = expected.abs().max()
    assert (actual - expected).abs().max() <= 1e-12 * scale, ((actual - expected).abs().max() / scale).item()


@pytest.mark.parametrize("hadamard", [None, "block16"])
def test_hf_llama_is_preserved_and_its_norms_take_the_scales(float64_llama_norm, hadamard):  # noqa: F811
    model = hf_llama()
    qm = calibrated(model, "mxfp4-infer", [ids(1), ids(2)], smooth=0.5, hadamard=hadamard)
    assert_preserved(model, qm, ids())
    report = qpass.report(qm)
    for site in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj"):
        norm = "input_layernorm" if site.startswith("self_attn") else "post_attention_layernorm"
        assert f"1/s folded into model.layers.1.{norm}.weight" in str(report[f"model.layers.1.{site}"])
    for site in ("self_attn.o_proj", "mlp.down_proj"):  # no norm before them
        assert "online 1/s on its input" in str(report[f"model.layers.1.{site}"])


def test_gpt2_layernorm_takes_the_scales_in_weight_and_bias():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                     use_cache=False)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    qm = calibrated(model, "mxfp4-infer", [ids(1)], smooth=0.5)
    assert_preserved(model, qm, ids())
    report = qpass.report(qm)
    assert ("1/s folded into transformer.h.0.ln_1.weight, transformer.h.0.ln_1.bias"
            in str(report["transformer.h.0.attn.c_attn"]))


class NormThenLinears(nn.Module):
    """A LayerNorm read by two linears, then a linear with no norm before it."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        h = self.norm(x)
        return self.c(torch.relu(self.a(h) + self.b(h)))


def test_the_pass_inserts_one_norm_scale_per_norm_and_online_scales_elsewhere():
    module = NormThenLinears()
    gm, parameters, _ = capture(module, torch.randn(8, 64))
    recipe = qpass.get_recipe("fp8-infer").with_overrides(smooth=0.5)
    scales = {site: [2.0] * 64 for site in ("a", "b", "c")}
    plans, _ = quantize_graph(gm, parameters, recipe, set(), context=ModelContext.of(module),
                              smoothing=scales)
    inserted = Counter(getattr(n.target, "__name__", "") for n in gm.graph.nodes if n.op == "call_function")
    # γ and β of the norm once; c's input (no norm before it); every site's weight.
    assert (inserted["scale_norm"], inserted["scale_input"], inserted["scale_weight"]) == (2, 1, 3)
    assert [p.smooth_norm for p in plans] == [("norm.weight", "norm.bias")] * 2 + [()]


def test_smoothing_an_outlier_channel_helps_a_4_bit_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    x = torch.randn(256, 64)
    x[:, 3] *= 40.0  # one channel far larger than the rest, in every token
    y = model(x)
    plain = qpass.compile(copy.deepcopy(model), "nvfp4-infer", backend="aot_eager")
    smoothed = calibrated(model, "nvfp4-infer", [x], smooth=0.5)
    assert qpass.qsnr(y, smoothed(x)) > qpass.qsnr(y, plain(x)) + 3


def test_bad_smoothing_is_refused():
    with pytest.raises(ValueError, match="alpha in"):
        qpass.get_recipe("fp8-infer").with_overrides(smooth=1.5)
    with pytest.raises(ValueError, match="residual-stream rotation"):
        qpass.get_recipe("mxfp4-infer").with_overrides(smooth=0.5, hadamard="residual")


def test_gptq_after_smoothing_solves_the_smoothed_weight_exactly():
    torch.manual_seed(0)
    model = NormThenLinears()
    batches = [torch.randn(256, 64) * torch.linspace(0.1, 4.0, 64) for _ in range(2)]
    qm = qpass.compile(copy.deepcopy(model), "nvfp4-infer", backend="aot_eager", smooth=0.5)
    qpass.calibrate(qm, batches, method="gptq")
    qm(batches[0])
    report = qpass.report(qm)
    for site in ("a", "b", "c"):
        assert "smooth: alpha=0.5" in str(report[site])
        assert "quantizes it to GPTQ's values exactly" in str(report[site]), str(report[site])
