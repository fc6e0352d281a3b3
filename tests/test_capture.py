"""Capture: installing, removing, copying, pickling and re-capturing a compiled model."""

import copy
import io

import torch
from torch import nn

import qpass
from qpass import capture


def two_linears():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))


def test_a_pickled_model_loads_quantized_with_the_same_report_and_histories():
    qm = qpass.compile(two_linears(), "fp8-train", backend="aot_eager", scaling="delayed")
    x = torch.randn(4, 64)
    for _ in range(2):
        qm(x).sum().backward()
    buffer = io.BytesIO()
    torch.save(qm, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)  # a whole module: not a weights-only load
    assert isinstance(loaded._qpass, type(qm._qpass)) and loaded._qpass is not qm._qpass
    # The histories travel, and the next step is the same on both.
    assert torch.equal(loaded.state_dict()["_qpass.0.input.amax_history"], qm.state_dict()["_qpass.0.input.amax_history"])
    assert torch.equal(loaded(x), qm(x))
    assert str(qpass.report(loaded)) == str(qpass.report(qm))
    assert qpass.report(loaded).quantized and loaded._qpass.graphs_captured >= 1


def test_a_copy_has_its_own_hooks_and_state():
    qm = qpass.compile(two_linears(), "fp8-train", backend="aot_eager", scaling="delayed")
    qm(torch.randn(4, 64))
    twin = copy.deepcopy(qm)
    capture.remove(twin)  # removing the copy's hooks leaves the original's
    assert "_qpass.0.input.amax_history" in qm.state_dict()
    assert not any(key.startswith("_qpass.") for key in twin.state_dict())
    assert twin._compiled_call_impl is None and isinstance(qm._compiled_call_impl, capture.CompiledCall)


def test_uncompiled_runs_plain_python_and_puts_the_call_back():
    qm = qpass.compile(two_linears(), "mxfp8-infer", backend="aot_eager")
    x = torch.randn(4, 64)
    with capture.uncompiled(qm):
        plain = qm(x)
    assert torch.equal(plain, two_linears()(x))
    assert not torch.equal(qm(x), plain)  # quantized again
