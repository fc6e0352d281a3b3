"""The residual-stream rotation: found from the graph, function-preserving, left alone when the
pattern does not hold (and saying so)."""

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers
from graphs import capture
from no_quantization import quantization_off
from torch import nn

import qpass
from qpass.passes import find_sites, plan_sites
from qpass.passes.residual import find_stream, plan_residual, rotate_residual_stream
from qpass.rotation import Rotation

F64 = dict(dtype=torch.float64)
D, VOCAB = 64, 50


class RMSNorm(nn.Module):
    """Written like Hugging Face's LlamaRMSNorm, without its float32 cast: in float64 the cast alone
    would differ at 1e-7 between a rotated and an unrotated stream."""

    def __init__(self, fused=False):
        super().__init__()
        self.weight = nn.Parameter(1 + torch.rand(D))
        self.fused = fused

    def forward(self, x):
        if self.fused:
            return F.rms_norm(x, (D,), self.weight, 1e-6)
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class Block(nn.Module):
    def __init__(self, fused):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(fused), RMSNorm(fused)
        self.qkv, self.out = nn.Linear(D, 3 * D, bias=False), nn.Linear(D, D, bias=True)
        self.gate, self.up, self.down = (nn.Linear(D, 96, bias=False), nn.Linear(D, 96, bias=False),
                                         nn.Linear(96, D))

    def forward(self, h):
        q, k, v = self.qkv(self.norm1(h)).unflatten(-1, (3, 4, 16)).unbind(-3)
        attention = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        h = h + self.out(attention.transpose(1, 2).flatten(-2))
        x = self.norm2(h)
        return h + self.down(F.silu(self.gate(x)) * self.up(x))


class TinyLlama(nn.Module):
    def __init__(self, fused=False, tied=False):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList([Block(fused), Block(fused)])
        self.norm = RMSNorm(fused)
        self.head = nn.Linear(D, VOCAB, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def ids(seed=0):
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def assert_preserved(model, recipe, tokens, output=lambda out: out, **overrides):
    """With quantization off, the transformed model's output equals the original's to 1e-12."""
    expected = output(model(tokens))
    qm = qpass.compile(copy.deepcopy(model), recipe, backend="aot_eager", **overrides)
    with quantization_off():
        actual = output(qm(tokens))
    scale = expected.abs().max()
    assert (actual - expected).abs().max() <= 1e-12 * scale, ((actual - expected).abs().max() / scale).item()
    return qpass.report(qm)


@pytest.mark.parametrize("fused", [False, True], ids=["hand-written-norm", "F.rms_norm"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_stream_found_and_rotated(fused, tied):
    model = TinyLlama(fused, tied).double()
    gm, parameters, inputs = capture(model, ids())
    plans = plan_sites(find_sites(gm.graph, parameters), qpass.get_recipe("mxfp4-infer"), set())
    stream, why = find_stream(plans, parameters)
    assert why is None
    assert [p.name for p in stream.writers] == ["blocks.0.out", "blocks.0.down",
                                                "blocks.1.out", "blocks.1.down"]
    assert [p.name for p, _ in stream.readers] == ["blocks.0.qkv", "blocks.0.gate", "blocks.0.up",
                                                     "blocks.1.qkv", "blocks.1.gate", "blocks.1.up", "head"]
    assert len(stream.norms) == 5 and stream.width == D
    assert [p.name for p in stream.mlp_writers] == ["blocks.0.down", "blocks.1.down"]

    (expected,) = gm(*inputs)
    plans, residual, note = plan_residual(plans, Rotation(None, seed=0), parameters)
    assert "5 RMSNorms folded, 7 readers, 4 writers" in note
    rotate_residual_stream(gm, residual)
    rotations = [n for n in gm.graph.nodes if n.target is torch.ops.qpass.rotate]
    # the table, 4 writer weights and their 4 biases (out and down have one), 7 reader weights
    assert len(rotations) == 1 + 4 + 4 + 7
    (actual,) = gm(*inputs)
    torch.testing.assert_close(actual, expected, atol=1e-12 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize("overrides", [
    dict(hadamard="residual"), dict(ocs=0.05), dict(hadamard="block16"), dict(hadamard="full"),
    dict(hadamard=["residual", "block16"], ocs=0.05),
], ids=str)
def test_every_transform_preserves_the_function(overrides):
    report = assert_preserved(TinyLlama().double(), "mxfp4-infer", ids(), **overrides)
    if "residual" in str(overrides.get("hadamard")):
        assert "online" in " ".join(report["blocks.0.down"]["notes"])


def test_training_recipes_keep_the_function_and_the_gradients():
    model = TinyLlama().double()
    qm = qpass.compile(copy.deepcopy(model), "mxfp8-train", backend="aot_eager",
                       hadamard=["residual", "block32"], ocs=0.02)
    with quantization_off():
        qm(ids()).square().mean().backward()
    model(ids()).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), qm.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-10, rtol=1e-9, msg=name)


# ---- Hugging Face models ---------------------------------------------------------------------------


def hf_llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).double().eval()
    with torch.no_grad():  # norms that are not all ones, so that folding them is tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture
def float64_llama_norm(monkeypatch):
    """HF's LlamaRMSNorm computes in float32 whatever the input: a float64 comparison to 1e-12
    needs it in the input's dtype (the same arithmetic otherwise)."""
    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(transformers.models.llama.modeling_llama.LlamaRMSNorm, "forward", forward)


@pytest.mark.parametrize(
    "overrides", [dict(hadamard="residual"), dict(hadamard=["residual", "block16"], ocs=0.05)], ids=str)
def test_hf_llama_is_preserved(float64_llama_norm, overrides):
    report = assert_preserved(hf_llama(), "mxfp4-infer", ids(), lambda out: out.logits, **overrides)
    assert any("residual stream of width 64 rotated" in note for note in report.notes)
    # QuaRot's online rotation before down_proj: full size (176 = 4 · 44), unless OCS made K 185,
    # which no Hadamard matrix fits: then 32-point blocks of the zero-padded axis.
    online = "hadamard-block32" if "ocs" in overrides else "hadamard-full"
    assert report["model.layers.0.mlp.down_proj"]["formats"]["fprop.input"] == f"mxfp4+{online}"


def test_gpt2_layernorm_is_left_alone_and_says_so():
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, use_cache=False)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    report = assert_preserved(model, "mxfp4-infer", ids(), lambda out: out.logits,
                              hadamard=["residual", "block32"], ocs=0.05)
    (note,) = [n for n in report.notes if "residual" in n]
    assert (note.startswith("residual-stream rotation not applied: the residual stream feeds")
            and "layer_norm" in note)
    assert report["transformer.h.0.mlp.c_fc"]["extra_channels"] == 4  # GPT-2's Conv1D (addmm) is split


def test_a_stream_that_leaves_the_graph_is_left_alone():
    class ReturnsHidden(TinyLlama):
        def forward(self, ids):
            h = self.embed(ids)
            for block in self.blocks:
                h = block(h)
            return self.head(self.norm(h)), h

    report = assert_preserved(
        ReturnsHidden().double(), "mxfp4-infer", ids(), lambda out: out[0], hadamard="residual")
    assert "not applied: the residual stream feeds return (linear_10, h_4)" in report.notes[0]


def test_the_export_path_runs_the_same_passes():
    model = TinyLlama().double()
    program = qpass.export(model, (ids(),), recipe="mxfp4-infer", hadamard=["residual", "block32"], ocs=0.05)
    targets = [n.target for n in program.graph.nodes]
    assert torch.ops.qpass.rotate.default in targets and torch.ops.aten.index_select.default in targets
    with quantization_off():
        torch.testing.assert_close(program.module()(ids()), model(ids()), atol=1e-12, rtol=1e-12)
