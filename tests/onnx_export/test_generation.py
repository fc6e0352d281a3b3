"""ONNX for generation: Hugging Face causal LMs as configured (``use_cache`` on) are exported as
their decoder with the KV cache as inputs and outputs, and ONNX Runtime generates with the file
token by token (:func:`qpass.onnx.generate`).

Under a weight-only recipe nothing in the graph rounds to a coarse grid, so the greedy tokens equal
``generate``'s exactly. Under an activation recipe the runtimes' summation orders may flip a
rounding (tests/onnx_export/test_export.py says why); there the file's quantizers are held to
qpass's bits on the values they receive, with the past in the cache.
"""

from __future__ import annotations

import warnings

import onnx
import pytest
import torch

import qpass
from qpass.onnx import check, export_onnx, generate

from .models import VOCAB, make

STEPS = 8


def cached(model: str, recipe: str):
    torch.compiler.reset()
    module = make(model)
    module.config.use_cache = True
    return qpass.compile(module, recipe, backend="aot_eager")


def prompt() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 5 tokens, the first left-padded to 3 (as a batch of unequal prompts is)."""
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    return ids, torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])


@pytest.mark.slow
@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_greedy_generation_in_onnx_runtime_gives_generates_tokens(model, tmp_path):
    qm = cached(model, "mxfp4-weight-only")
    ids, mask = prompt()
    with torch.no_grad():
        want = qm.generate(ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export_onnx(qm, (ids,), tmp_path / "decoder.onnx")
    assert not [w for w in caught if "quantized differently" in str(w.message)]  # the sites qpass.compile ran
    got = generate(path, ids, STEPS, attention_mask=mask)
    assert got.shape == (2, 5 + STEPS)
    assert torch.equal(got, want)
    assert qm.config.use_cache  # the export left the model as configured


def shape(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.mark.slow
def test_the_file_has_the_generation_layout_and_its_quantizers_give_qpass_bits(tmp_path):
    qm = cached("llama", "nvfp4-infer")
    ids, _ = prompt()
    path = export_onnx(qm, (ids,), tmp_path / "decoder.onnx")
    graph = onnx.load(str(path)).graph
    heads, head_size = 2, 64  # the tiny Llama's key/value heads and head size
    assert {i.name: shape(i) for i in graph.input} == {
        "input_ids": ["batch", "sequence"],
        "attention_mask": ["batch", "total_sequence"],
        "position_ids": ["batch", "sequence"],
        "past_key_values.0.key": ["batch", heads, "past_sequence", head_size],
        "past_key_values.0.value": ["batch", heads, "past_sequence", head_size],
    }
    assert {o.name: shape(o) for o in graph.output} == {
        "logits": ["batch", "sequence", VOCAB],
        "present.0.key": ["batch", heads, "past_sequence + sequence", head_size],
        "present.0.value": ["batch", heads, "past_sequence + sequence", head_size],
    }
    # The next 5 tokens after a past of 5, against qpass in PyTorch with the same cache.
    result = check(path, qm, (ids,))
    assert result.quantizers_checked > 0 and result.quantizer_mismatches == []
    assert result.max_rel_error < 0.1  # a flipped rounding at most (test_export.FLIP_BOUND)
    # And generation runs from an empty past.
    assert generate(path, ids, 2).shape == (2, 7)


@pytest.mark.slow
def test_use_cache_false_exports_the_plain_forward(tmp_path):
    qm = cached("gpt2", "mxfp4-weight-only")
    ids, _ = prompt()
    path = export_onnx(qm, (ids,), tmp_path / "plain.onnx", use_cache=False)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["input_ids"] and len(graph.output) == 1
    assert check(path, qm, (ids,)).max_rel_error < 1e-5
    assert qm.config.use_cache


def test_a_cache_export_takes_input_ids_only(tmp_path):
    qm = cached("llama", "mxfp4-weight-only")
    ids, mask = prompt()
    with pytest.raises(ValueError, match="takes \\(input_ids,\\) and no kwargs"):
        export_onnx(qm, (ids,), tmp_path / "x.onnx", kwargs={"attention_mask": mask})


def test_generate_refuses_a_file_without_a_cache(tmp_path):
    qm = qpass.compile(make("mlp"), "mxfp4-weight-only", backend="aot_eager")
    path = export_onnx(qm, (torch.randn(2, 3, 256),), tmp_path / "mlp.onnx")
    with pytest.raises(ValueError, match="not a decoder exported with its KV cache"):
        generate(path, torch.ones(2, 3, dtype=torch.long), 1)
