"""Capture: installing, removing, copying, pickling and re-capturing a compiled model."""

import copy
import io
import warnings

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
    assert torch.equal(loaded.state_dict()["_qpass.0.input.amax_history"],
                       qm.state_dict()["_qpass.0.input.amax_history"])
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


class UpDown(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(64, 64), nn.Linear(64, 64)


class Disabled(UpDown):
    """A block whose second linear Dynamo never compiles."""

    @torch._dynamo.disable
    def _down(self, x):
        return self.down(x)

    def forward(self, x):
        return self._down(torch.relu(self.up(x)))


def qpass_warnings(call) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if "qpass" in str(w.message)]


def test_a_disabled_frame_warns_at_every_call_naming_the_model_and_the_cause():
    qm = qpass.compile(Disabled(), "fp8-infer", backend="eager")
    x = torch.randn(4, 64)
    for _ in range(2):  # the first call decides, the second only runs: both warn
        (message,) = qpass_warnings(lambda: qm(x))
        assert message.startswith("qpass: Disabled ran down eagerly, so they are NOT quantized")
    assert [row["site"] for row in qpass.report(qm).quantized] == ["up"]


def test_a_recompile_limit_warns_at_every_call():
    qm = qpass.compile(two_linears(), "fp8-infer", backend="eager")
    with torch._dynamo.config.patch(recompile_limit=0):
        messages = qpass_warnings(lambda: qm(torch.randn(4, 64)))
        assert any("ran 0, 2 eagerly" in m and "recompile limit" in m for m in messages), messages
        assert any("captured no graph of Sequential" in m for m in messages), messages
        assert any("ran 0, 2 eagerly" in m for m in qpass_warnings(lambda: qm(torch.randn(4, 64))))


def test_a_suppressed_compile_error_warns(monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("a pass failed")

    qm = qpass.compile(two_linears(), "fp8-infer", backend="eager")
    monkeypatch.setattr(capture, "quantize_captured", fail)
    with torch._dynamo.config.patch(suppress_errors=True):
        messages = qpass_warnings(lambda: qm(torch.randn(4, 64)))
    assert any("ran 0, 2 eagerly" in m and "failed to compile" in m for m in messages), messages


def test_graph_breaks_alone_do_not_warn():
    qm = qpass.compile(Broken(), "fp8-infer", backend="eager")
    assert qpass_warnings(lambda: qm(torch.randn(4, 64))) == []
    assert [row["site"] for row in qpass.report(qm).quantized] == ["up", "down"]


class BreaksInside(nn.Module):
    """Two layers whose forward breaks the graph: Dynamo resumes in the layer's own frame."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Broken(), Broken()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class Broken(UpDown):
    def forward(self, x):
        x = self.up(x)
        torch._dynamo.graph_break()
        return self.down(x)


def test_sites_of_a_frame_resumed_inside_a_submodule_are_marked_and_warned():
    qm = qpass.compile(BreaksInside(), "fp8-infer", backend="eager")
    messages = qpass_warnings(lambda: qm(torch.randn(4, 64)))
    warned = [m for m in messages if "graph broke inside a submodule" in m and "blocks=" in m]
    assert warned, messages
    report = qpass.report(qm)
    shared = [row["site"] for row in report.rows if any("every instance" in note for note in row["notes"])]
    # Named by the module each was traced for, and marked: the graph also runs the other layer.
    assert shared and set(shared) <= {"layers.0.up", "layers.0.down", "layers.1.up", "layers.1.down"}


def test_blocks_compile_each_layer_on_its_own():
    qm = qpass.compile(BreaksInside(), "fp8-infer", backend="eager", blocks="layers.*")
    assert qpass_warnings(lambda: qm(torch.randn(4, 64))) == []
    report = qpass.report(qm)
    assert [row["site"] for row in report.quantized] == [
        "layers.0.up", "layers.0.down", "layers.1.up", "layers.1.down"]
    assert all(not row["notes"] for row in report.rows)


def test_a_block_whose_last_linear_projects_onto_the_vocabulary_size_is_no_lm_head():
    # The block's graph ends with down_proj (out 64, the vocabulary's size): the model names lm_head.
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    qm = qpass.compile(model, "fp8-train", backend="eager", blocks="model.layers.*")
    qm(torch.randint(0, 64, (1, 8)))
    report = qpass.report(qm)
    assert report["model.layers.1.mlp.down_proj"]["quantized"]
    assert report["lm_head"]["reason"].startswith("final output projection")
    assert len(report.quantized) == 14
