"""Training on real low-precision GEMMs: the FP8 recipes' GEMMs run on the CPU's _scaled_mm and equal
the SPEC section 6 oracle bit for bit; no fp32 GEMM is left at a quantized site; backward is saved
codes and scales, not the high-precision operands."""

import copy

import pytest
import torch
import transformers
from spec6 import Spec6Product, assert_same
from test_compile import run_and_compare
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

import qpass

E4M3, E5M2 = {"format": "fp8_e4m3"}, {"format": "fp8_e5m2"}
ROWWISE = {"format": "fp8_e4m3", "granularity": "channel"}
SPECS = {
    "fp8-train": {**dict.fromkeys(("a", "b", "da_b", "db_a"), E4M3),
                  **dict.fromkeys(("da_grad", "db_grad"), E5M2)},
    "fp8-rowwise-train": dict.fromkeys(("a", "b", "da_grad", "da_b", "db_grad", "db_a"), ROWWISE),
}


@pytest.fixture
def scaled_mm_calls(monkeypatch):
    calls = []
    scaled_mm = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *args, **kw: calls.append(1) or scaled_mm(*args, **kw))
    return calls


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("recipe", SPECS)
def test_a_block_on_scaled_mm_matches_spec6(recipe, backend, scaled_mm_calls):
    qm = run_and_compare(recipe, SPECS[recipe], backend=backend)
    assert {row["gemm"] for row in qpass.report(qm).quantized} == {f"scaled_mm {recipe_scaling(recipe)}"}
    # 4 linear sites x (fprop, dgrad, wgrad), less qkv's dgrad (x needs no gradient).
    assert len(scaled_mm_calls) == 4 * 3 - 1


def recipe_scaling(recipe):
    return "rowwise" if "rowwise" in recipe else "tensorwise"


def llama_layer():
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config)
    return model.model.layers[0], model.model.rotary_emb


class Oracle:
    """Every nn.Linear of a module computed by the SPEC section 6 oracle, eagerly."""

    def __init__(self, module, specs):
        for layer in module.modules():
            if isinstance(layer, nn.Linear):
                layer.forward = (lambda layer: lambda x: Spec6Product.apply(x, layer.weight.mT, specs)
                                 + (0 if layer.bias is None else layer.bias))(layer)


# aot_eager only: under Inductor the layer's RMSNorms and rotary embedding are fused kernels whose fp32
# sums differ from eager's (the oracle's) by an ulp; the GEMMs' bits under Inductor are the Block's test.
@pytest.mark.parametrize("recipe", SPECS)
def test_a_llama_decoder_layer_on_scaled_mm_matches_spec6(recipe, scaled_mm_calls):
    torch.manual_seed(0)
    layer, rotary = llama_layer()
    reference = copy.deepcopy(layer)
    Oracle(reference, SPECS[recipe])
    x = torch.randn(2, 24, 64)
    dy = torch.randn(2, 24, 64)
    position = rotary(x, torch.arange(24)[None])
    x_q, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    qm = qpass.compile(layer, recipe, backend="aot_eager")
    y = qm(x_q, position_embeddings=position)
    y = y[0] if isinstance(y, tuple) else y
    y.backward(dy)
    y_ref = reference(x_ref, position_embeddings=position)
    y_ref = y_ref[0] if isinstance(y_ref, tuple) else y_ref
    y_ref.backward(dy)
    assert_same(y, y_ref)
    assert_same(x_q.grad, x_ref.grad)
    for p, p_ref in zip(layer.parameters(), reference.parameters()):
        assert_same(p.grad, p_ref.grad)
    assert len(scaled_mm_calls) == 7 * 3  # q, k, v, o, gate, up, down: fprop, dgrad, wgrad each


# ---- memory ------------------------------------------------------------------------------------------


def saved_bytes(model, *args, **kwargs) -> int:
    """Bytes of the tensors autograd saves during a forward (torch.autograd.graph.saved_tensors_hooks),
    each storage once, less the model's parameters: a saved parameter costs no memory, a saved copy
    (an FP8 weight) does."""
    storages = {}
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in parameters:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        out = model(*args, **kwargs)
    (out[0] if isinstance(out, tuple) else out).float().sum().backward()
    return sum(storages.values())


# X along M for wgrad (M = 256 tokens): rowwise keeps one fp32 scale per 256-element row.
@pytest.mark.parametrize("recipe, element_bytes", [("fp8-train", 1), ("fp8-rowwise-train", 1 + 4 / 256),
                                                    ("mxfp8-train", 1 + 1 / 32), ("mxfp4-train", None)])
def test_backward_is_saved_the_input_codes_and_the_weight_itself(recipe, element_bytes):
    """A bf16 linear: backward keeps X's codes and scales (1 byte an element for FP8, plus 1/32 for
    MX's E8M0 scales) where the unquantized layer keeps X in bf16, and the weight parameter itself
    (no copy). mxfp4-train draws fresh signs and random roundings in backward: it keeps X."""
    layer = nn.Linear(128, 64).bfloat16()
    x = torch.randn(8, 32, 128, dtype=torch.bfloat16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    qm = qpass.compile(layer, recipe, backend="aot_eager", exclude=[])
    qm(x).sum().backward()  # compiled outside the hooks
    with saved_tensors_hooks(pack, lambda t: t):
        qm(x)
    weight = layer.weight.untyped_storage().data_ptr()
    assert any(t.untyped_storage().data_ptr() == weight for t in saved)
    activations = {ptr: t for t in saved if (ptr := t.untyped_storage().data_ptr()) != weight}
    total = sum(t.untyped_storage().nbytes() for t in activations.values())
    if element_bytes is None:
        assert total == x.nbytes
    else:
        assert total == pytest.approx(x.numel() * element_bytes, abs=16)
        assert all(t.dtype != torch.bfloat16 for t in activations.values())


def llama_block_saved_bytes(recipe):
    torch.manual_seed(0)
    layer, rotary = llama_layer()
    layer = layer.bfloat16()
    x = torch.randn(4, 128, 64, dtype=torch.bfloat16, requires_grad=True)
    position = tuple(t.bfloat16() for t in rotary(x, torch.arange(128)[None]))
    plain = saved_bytes(torch.compile(copy.deepcopy(layer), backend="aot_eager"), x,
                        position_embeddings=position)
    quantized = saved_bytes(qpass.compile(copy.deepcopy(layer), recipe, backend="aot_eager"), x,
                            position_embeddings=position)
    return quantized / plain


@pytest.mark.xfail(strict=True, reason=(
    "issue 16's goal (fp8-train at most 0.6x the unquantized block's saved bytes, mxfp8-train 0.65x) is "
    "out of reach of the GEMMs: measured 0.888x and 0.894x (4 x 128 tokens, bf16). Of the 877 KB the "
    "compiled unquantized block saves, 615 KB are not GEMM operands (SDPA's Q, K, V, output and "
    "logsumexp; the RMSNorms' inputs; SiLU's and the gate product's inputs; rotary cos/sin), and o_proj's "
    "input is SDPA's output, saved for SDPA anyway: with every GEMM operand free the block would still "
    "save 0.70x, and FP8 codes cost half of bf16's, not nothing."))
@pytest.mark.parametrize("recipe, goal", [("fp8-train", 0.6), ("mxfp8-train", 0.65)])
def test_a_llama_block_saves_at_most_the_issues_share(recipe, goal):
    assert llama_block_saved_bytes(recipe) <= goal


@pytest.mark.parametrize("recipe", ["fp8-train", "fp8-rowwise-train", "mxfp8-train"])
def test_a_llama_block_saves_codes_for_its_gemm_operands(recipe):
    """What FP8 GEMM operands can take off this block (measured 0.888-0.894x): its three activations
    that only GEMMs need stored at one byte an element, plus scales."""
    assert llama_block_saved_bytes(recipe) <= 0.9
