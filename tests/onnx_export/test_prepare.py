"""qpass.onnx.prepare on tiny graphs: what store_weights inserts and removes, and which sites
check_exportable rejects (naming them)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qpass
from qpass.onnx.prepare import (
    DEQUANTIZE_PACKED,
    QDQ,
    ROTATE,
    UnsupportedSite,
    check_exportable,
    fold_constants,
    store_weights,
)
from qpass.quantizer import Quantizer


def program_module(recipe: str, model: nn.Module | None = None, x: torch.Tensor | None = None, **overrides):
    torch.manual_seed(0)
    model = (model or nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32))).eval()
    x = torch.randn(3, 64) if x is None else x
    qm = qpass.compile(model, recipe, backend="aot_eager", **overrides)
    with torch.no_grad():
        return qpass.export(qm, (x,)).module(), x


def calls(gm, target) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def constant_inputs(gm, target) -> list:
    """Calls of ``target`` whose first input comes from a parameter (a get_attr, through any ops)."""
    def from_constant(node):
        return node.op == "get_attr" or (
            node.op == "call_function" and node.all_input_nodes
            and all(map(from_constant, node.all_input_nodes))
        )
    return [n for n in calls(gm, target) if from_constant(n.args[0])]


@pytest.mark.parametrize("dialect", ["portable", "qdq"])
@pytest.mark.parametrize(
    "recipe", ["fp8-infer", "mxfp4-infer", "nvfp4-infer", "mxfp6-infer", "mxfp4-weight-only"]
)
def test_each_weight_becomes_one_stored_weight_and_the_graph_computes_the_same(recipe, dialect):
    gm, x = program_module(recipe)
    expected = gm(x)
    activations = len(calls(gm, QDQ)) - 2
    store_weights(gm, dialect)
    assert len(calls(gm, DEQUANTIZE_PACKED)) == 2
    assert constant_inputs(gm, QDQ) == [] and constant_inputs(gm, ROTATE) == []
    assert len(calls(gm, QDQ)) == activations  # the inputs' quantizers stay
    # dequantize(quantize(w)) is fake_quantize(w): the same bits as before
    assert torch.equal(gm(x).view(torch.int32), expected.view(torch.int32))
    parameters = {name for name, _ in gm.named_parameters()}
    assert parameters == {"0.bias", "2.bias"}  # the fp32 weights are gone: only codes and scales remain


@pytest.mark.parametrize("recipe, codes, scales", [
    ("fp8-infer", torch.float8_e4m3fn, torch.float32),
    ("mxfp8-infer", torch.float8_e4m3fn, torch.uint8),
    ("mxfp4-infer", torch.float4_e2m1fn_x2, torch.uint8),
    ("nvfp4-infer", torch.float4_e2m1fn_x2, torch.float8_e4m3fn),
    ("mxfp6-infer", torch.uint8, torch.uint8),  # no ONNX FP6 type below opset 28
])
def test_the_qdq_dialect_stores_typed_codes_and_the_portable_one_bytes(recipe, codes, scales):
    for dialect, expected in (
        ("qdq", (codes, scales)),
        ("portable", (torch.uint8, scales if scales == torch.float32 else torch.uint8)),
    ):
        gm, _ = program_module(recipe)
        store_weights(gm, dialect)
        buffers = {
            name.removeprefix("0_weight_"): b
            for name, b in gm.named_buffers() if name.startswith("0_weight_")
        }
        scales = buffers.get("e8m0_scales", buffers.get("scales"))  # MX scales that qdq retypes to E8M0
        assert (buffers["codes"].dtype, scales.dtype) == expected
        assert ("e8m0_scales" in buffers) == (dialect == "qdq" and recipe in ("mxfp8-infer", "mxfp4-infer"))


def test_channel_splitting_is_folded_into_the_stored_weight():
    """OCS duplicates input channels (an index_select on the input) and splits weight columns (ops on
    the parameter): the weight side is evaluated once, the input side stays in the graph."""
    gm, x = program_module("fp8-infer", ocs=0.05)
    expected = gm(x)
    store_weights(gm, "portable")
    assert len(calls(gm, DEQUANTIZE_PACKED)) == 2
    assert calls(gm, torch.ops.aten.index_select.default)  # the inputs' channel duplication
    assert torch.equal(gm(x), expected)
    assert gm.get_buffer("0_weight_codes").shape[-1] > 64  # K grew by the split channels


def test_fold_constants_evaluates_what_the_graph_reads_from_parameters_but_keeps_stored_weights():
    """After store_weights, channel splitting's bookkeeping (bit views of the split weights' steps)
    and an asserted copy of a constant remain; fold_constants makes them buffers."""
    gm, x = program_module("fp8-infer", ocs=0.05)
    expected = gm(x)
    store_weights(gm, "portable")
    assert calls(gm, torch.ops.aten.view.dtype)  # ONNX has no form of a bit view
    fold_constants(gm)
    assert calls(gm, torch.ops.aten.view.dtype) == [] and len(calls(gm, DEQUANTIZE_PACKED)) == 2
    assert torch.equal(gm(x), expected)


def test_rotations_fold_into_weights_and_stay_online_on_inputs():
    gm, x = program_module("mxfp4-infer")
    assert len(constant_inputs(gm, ROTATE)) == 2
    store_weights(gm, "qdq")
    assert len(calls(gm, ROTATE)) == 2 and constant_inputs(gm, ROTATE) == []


def test_a_tied_weight_used_twice_is_stored_for_each_use():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(64, 64)
            self.b = nn.Linear(64, 64)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    gm, x = program_module("mxfp4-weight-only", Tied(), torch.randn(2, 64))
    expected = gm(x)
    store_weights(gm, "portable")
    assert len(calls(gm, DEQUANTIZE_PACKED)) == 2
    assert torch.equal(gm(x), expected)


@pytest.mark.parametrize("recipe, overrides, why", [
    ("fp8-train", {}, "training recipe"),
    ("fp8-infer", {"input": Quantizer("fp8_e4m3"), "weight": Quantizer("fp8_e4m3"), "scaling": "delayed"},
     "delayed scaling"),
    ("mxfp8-infer", {"rounding": "stochastic"}, "stochastic rounding"),
    ("nvfp4-infer", {"input": Quantizer("nvfp4", granularity=("tile", 16))},
     "16x16 tiles span a dynamic dimension"),
])
def test_what_onnx_cannot_express_fails_naming_the_site(recipe, overrides, why):
    gm, _ = program_module(recipe, **overrides)
    if recipe == "mxfp8-infer":  # a stochastic weight quantizer is refused before anything is stored
        with pytest.raises(UnsupportedSite, match=r"site 0 \(Linear\).*stochastic"):
            store_weights(gm, "portable")
        return
    store_weights(gm, "portable")
    with pytest.raises(UnsupportedSite, match=rf"site 0 \(Linear\): .*{why}") as error:
        check_exportable(gm)
    assert "site 2 (Linear)" in str(error.value)  # every site is listed, not only the first
