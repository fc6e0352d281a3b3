"""The lowering pass on tiny graphs: which sites it packs or hands to the kernels, what it inserts,
and that a lowered graph computes what the unlowered one does (on the CPU its ops run the reference;
with the CPU among the kernel devices, the Triton kernels themselves, in the interpreter)."""

import copy
import warnings

import pytest
import torch
from graphs import capture, count_calls
from torch import nn

import qpass
from qpass import quantized
from qpass.execution import Execution
from qpass.passes import find_sites, insert_quantizers, plan_sites
from qpass.passes.lower import KERNELS, PACKED, Target, pack_weights, plan_lowering

PACKED_LINEAR = torch.ops.qpass.packed_linear.default


class Block(nn.Module):
    """Two linears (one without bias) around a matmul of two activations."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 96)
        self.down = nn.Linear(96, 64, bias=False)

    def forward(self, x):
        h = torch.relu(self.up(x))
        return self.down(h) + (h @ h.mT) @ x


def planned_graph(recipe, **overrides):
    module, x = Block(), torch.randn(2, 8, 64)
    gm, parameters, _ = capture(module, x)
    plans = plan_sites(
        find_sites(gm.graph, parameters), qpass.get_recipe(recipe).with_overrides(**overrides), set())
    return gm, plans, parameters


def lower_to_kernels(gm, plans, parameters, frozen):
    """The lowering's planning and rewrites, as qpass.compile runs them on a CUDA graph."""
    target = Target("auto", on_cuda=True, frozen=frozen)
    plans = plan_lowering(plans, parameters, target)
    pack_weights(gm, plans, parameters, target)
    insert_quantizers(gm, plans)
    return plans


def lowering(plans, parameters, target):
    """Site name -> how the lowering runs each quantized site."""
    return {p.name: p.lowering for p in plan_lowering(plans, parameters, target) if p.excluded is None}


def lowered_configs(gm):
    """The execution of every product the rewritten graph calls."""
    return [
        Execution.from_json(n.args[-1][1]) for n in gm.graph.nodes
        if n.op == "call_function" and n.target in (quantized.linear, quantized.product)
    ]


@pytest.mark.parametrize("recipe", ["mxfp4-weight-only", "fp8-infer", "nvfp4-infer", "mxfp4-infer"])
def test_frozen_inference_linears_are_packed(recipe):
    gm, plans, parameters = planned_graph(recipe)
    decisions = lowering(plans, parameters, Target("auto", on_cuda=True, frozen=True))
    assert decisions["up"] == decisions["down"] == PACKED
    assert decisions.get("matmul", KERNELS) == KERNELS  # two activations: nothing to pack
    plans = lower_to_kernels(gm, plans, parameters, frozen=True)
    assert count_calls(gm, PACKED_LINEAR) == 2
    assert count_calls(gm, quantized.linear) == 0
    assert all(q.kernels for q in lowered_configs(gm))  # the activation product: kernels, not packed
    assert len(gm._qpass_packed_weights) == 2  # the graph module keeps its packed weights alive
    assert all("packed" in " ".join(p.notes) for p in plans if p.name in ("up", "down"))  # for qpass.report


def test_weights_that_train_are_not_packed():
    gm, plans, parameters = planned_graph("fp8-infer")
    assert set(lowering(plans, parameters, Target("auto", on_cuda=True, frozen=False)).values()) == {KERNELS}
    lower_to_kernels(gm, plans, parameters, frozen=False)
    assert count_calls(gm, PACKED_LINEAR) == 0
    assert count_calls(gm, quantized.linear) == 2
    assert len(lowered_configs(gm)) == 3 and all(q.kernels for q in lowered_configs(gm))


@pytest.mark.parametrize("recipe", ["fp8-train", "mxfp4-train"])
def test_training_sites_keep_their_structure_with_kernels_on(recipe):
    unlowered, plans, parameters = planned_graph(recipe)
    insert_quantizers(unlowered, plans)
    gm, plans, parameters = planned_graph(recipe)
    lower_to_kernels(gm, plans, parameters, frozen=True)
    assert [n.target for n in gm.graph.nodes] == [n.target for n in unlowered.graph.nodes]
    assert lowered_configs(gm) and all(q.kernels for q in lowered_configs(gm))


def test_kernels_triton_on_the_cpu_warns():
    qm = qpass.compile(nn.Linear(64, 64), "fp8-train", backend="aot_eager", kernels="triton")
    with pytest.warns(UserWarning, match="reference implementations"):
        qm(torch.randn(4, 64))


def test_compile_rejects_unknown_kernels():
    with pytest.raises(ValueError, match="unknown kernels 'cuda'.*auto, triton, interpret, reference"):
        qpass.compile(nn.Linear(4, 4), "fp8-train", kernels="cuda")


def run(model, recipe, kernels, x, grad):
    torch.compiler.reset()
    torch.manual_seed(0)
    qm = qpass.compile(copy.deepcopy(model), recipe, backend="aot_eager", kernels=kernels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kernels='triton' on the CPU
        if not grad:
            with torch.no_grad():
                return qm(x), None
        out = qm(x)
        out.square().sum().backward()
        return out, [p.grad for p in qm.parameters()]


@pytest.mark.parametrize(
    "recipe, grad",
    [("mxfp4-weight-only", False), ("fp8-infer", False), ("nvfp4-infer", False), ("mxfp4-infer", False),
     ("fp8-infer", True), ("mxfp8-train", True), ("nvfp4-train", True), ("mxfp4-train", True),
     ("fp8-train", True)],
)
def test_lowered_graph_on_cpu_computes_the_reference(recipe, grad):
    model, x = Block(), torch.randn(2, 8, 64)
    reference, reference_grads = run(model, recipe, "reference", x, grad)
    lowered, lowered_grads = run(model, recipe, "triton", x, grad)
    assert torch.equal(lowered, reference)
    for a, b in zip(lowered_grads or [], reference_grads or []):
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["mxfp4-weight-only", "nvfp4-infer", "mxfp4-infer"])
def test_lowered_inference_graph_runs_the_triton_kernels(recipe, monkeypatch):
    import qpass.codegen as codegen

    calls, weight_matmul = [], codegen.weight_matmul
    monkeypatch.setattr(
        codegen, "weight_matmul", lambda *args, **kwargs: calls.append(1) or weight_matmul(*args, **kwargs))
    model, x = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)), torch.randn(3, 64)
    lowered, _ = run(model, recipe, "interpret", x, grad=False)
    reference, _ = run(model, recipe, "reference", x, grad=False)
    assert len(calls) == 2  # both linears, packed
    # fp32 accumulation in another order than the reference's matmul
    torch.testing.assert_close(lowered, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_lowered_training_graph_runs_the_triton_kernels(monkeypatch):
    """mxfp8-train's operands quantized by the kernels in all three GEMMs: the same bits."""
    import qpass.codegen as codegen

    calls, quantize = [], codegen.quantize
    monkeypatch.setattr(
        codegen, "quantize", lambda *args, **kwargs: calls.append(1) or quantize(*args, **kwargs))
    model, x = nn.Sequential(nn.Linear(64, 32)), torch.randn(4, 64)
    reference, reference_grads = run(model, "mxfp8-train", "reference", x, grad=True)
    assert not calls
    lowered, lowered_grads = run(model, "mxfp8-train", "interpret", x, grad=True)
    assert len(calls) == 4  # two operands in fprop and in wgrad (x needs no gradient: no dgrad)
    assert torch.equal(lowered, reference)
    for a, b in zip(lowered_grads, reference_grads):
        assert torch.equal(a, b)


def test_a_copied_model_keeps_its_kernels_choice():
    qm = qpass.compile(nn.Linear(64, 64), "fp8-train", backend="aot_eager", kernels="triton")
    assert copy.deepcopy(qm)._qpass.kernels == "triton"


def test_packed_fp8_inference_runs_rowwise_scaled_mm(monkeypatch):
    calls = []
    scaled_mm = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: calls.append(1) or scaled_mm(*a, **kw))
    model, x = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)), torch.randn(3, 64)
    lowered, _ = run(model, "fp8-infer", "interpret", x, grad=False)
    reference, _ = run(model, "fp8-infer", "reference", x, grad=False)
    assert len(calls) == 2
    torch.testing.assert_close(lowered, reference, rtol=1e-5, atol=1e-5)  # fp32 sums in another order
