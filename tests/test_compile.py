"""qpass.compile end to end on small modules: numerics (SPEC section 6, bit for bit), capture, state."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from spec6 import Spec6Product, assert_same, fq
from torch import nn

import qpass


class Block(nn.Module):
    """A pre-norm attention + MLP block, as in a Llama layer (hidden 64, 2 heads of 32)."""

    def __init__(self, hidden=64, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.up = nn.Linear(hidden, 2 * hidden)
        self.down = nn.Linear(2 * hidden, hidden)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        x = x + self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(-2))
        return x + self.down(torch.relu(self.up(x)))


def reference_block(block, x, specs, attention_specs=None):
    """The block written by hand with fake_quantize: each product through the SPEC section 6 oracle."""
    def linear(layer, t):
        return Spec6Product.apply(t, layer.weight.mT, specs) + layer.bias

    q, k, v = linear(block.qkv, x).unflatten(-1, (3, block.heads, -1)).permute(2, 0, 3, 1, 4)
    if attention_specs is None:
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        scores = Spec6Product.apply(q, k.mT, attention_specs) * (q.shape[-1] ** -0.5)
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        attended = Spec6Product.apply(
            torch.softmax(scores.masked_fill(~keep, float("-inf")), -1), v, attention_specs)
    x = x + linear(block.out, attended.transpose(1, 2).flatten(-2))
    return x + linear(block.down, torch.relu(linear(block.up, x)))


MX8 = {"format": "mxfp8_e4m3", "scale_mode": "rceil"}
MXFP8_TRAIN = dict.fromkeys(("a", "b", "da_grad", "da_b", "db_grad", "db_a"), MX8)
FP8_TRAIN = {**dict.fromkeys(("a", "b", "da_b", "db_a"), {"format": "fp8_e4m3"}),
             **dict.fromkeys(("da_grad", "db_grad"), {"format": "fp8_e5m2"})}


def run_and_compare(recipe, specs, attention_specs=None, backend="aot_eager", seq=40):
    torch.manual_seed(0)
    block = Block()
    reference = copy.deepcopy(block)
    x = torch.randn(2, seq, 64)
    dy = torch.randn(2, seq, 64)
    qm = qpass.compile(block, recipe, backend=backend, attention=attention_specs is not None)
    y = qm(x)
    y.backward(dy)
    y_ref = reference_block(reference, x, specs, attention_specs)
    y_ref.backward(dy)
    assert_same(y, y_ref)
    for (name, p), p_ref in zip(block.named_parameters(), reference.parameters()):
        if name.endswith("bias") and backend == "inductor":
            # A bias gradient is a plain reduction of dY (no GEMM), which Inductor may reorder.
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-6, atol=1e-5)
        else:
            assert_same(p.grad, p_ref.grad)
    return qm


@pytest.mark.parametrize("recipe, specs", [("mxfp8-train", MXFP8_TRAIN), ("fp8-train", FP8_TRAIN)])
def test_compiled_block_matches_spec6_bit_for_bit(recipe, specs):
    qm = run_and_compare(recipe, specs)
    assert {r["site"] for r in qpass.report(qm).quantized} == {"qkv", "out", "up", "down"}


def test_compiled_attention_matches_spec6_bit_for_bit():
    qm = run_and_compare("mxfp8-train", MXFP8_TRAIN, attention_specs=MXFP8_TRAIN)
    assert qpass.report(qm)["sdpa"]["quantized"]


@pytest.mark.slow
def test_inductor_matches_spec6_bit_for_bit():
    # The quantization runs inside the custom ops, which Inductor calls rather than compiles.
    run_and_compare("mxfp8-train", MXFP8_TRAIN, backend="inductor")


def test_inference_recipe_inserts_qdq_on_the_forward():
    torch.manual_seed(0)
    block = Block()
    reference = copy.deepcopy(block)
    x = torch.randn(2, 8, 64)
    y = qpass.compile(block, "fp8-infer", backend="aot_eager")(x)
    per_row = {"format": "fp8_e4m3", "granularity": "channel"}

    def linear(layer, t):  # per token and per output channel, both along K
        return fq(t, per_row, -1) @ fq(layer.weight, per_row, -1).mT + layer.bias

    q, k, v = linear(reference.qkv, x).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4)
    h = x + linear(
        reference.out, F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(-2))
    assert_same(y, h + linear(reference.down, torch.relu(linear(reference.up, h))))


def test_the_model_keeps_its_identity_parameters_and_state_dict_keys():
    block = Block()
    keys, parameters = list(block.state_dict()), list(block.parameters())
    qm = qpass.compile(block, "mxfp8-train", backend="aot_eager")
    assert qm is block and isinstance(qm, Block)
    qm(torch.randn(1, 4, 64))
    assert list(qm.state_dict()) == keys and list(qm.parameters()) == parameters


def test_train_and_eval_behave_like_the_original():
    model = nn.Sequential(nn.Linear(64, 64), nn.Dropout(0.5))
    qm = qpass.compile(model, "mxfp8-train", backend="aot_eager")
    x = torch.randn(8, 64)
    assert (qm(x) == 0).float().mean() > 0.3  # training: dropout zeroes about half
    qm.eval()
    assert torch.equal(qm(x), qm(x)) and (qm(x) == 0).float().mean() < 0.05


def test_keyword_arguments_and_python_control_flow():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

        def forward(self, x, *, use_b=False, scale=1.0):
            return (self.b(x) if use_b else self.a(x)) * scale

    qm = qpass.compile(Branchy(), "mxfp8-infer", backend="aot_eager")
    x = torch.randn(3, 64)
    assert torch.equal(qm(x, use_b=True, scale=2.0), qm(x, use_b=True) * 2.0)
    qm(x)
    assert {r["site"] for r in qpass.report(qm).quantized} == {"a", "b"}


def graphs_and_breaks(model, compile_model, *inputs):
    """Dynamo's own counts: graphs captured, and the distinct reasons it broke the graph."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compile_model(model)(*inputs)
    counters = torch._dynamo.utils.counters
    return counters["stats"]["unique_graphs"], set(counters["graph_break"])


def test_qpass_introduces_no_graph_breaks():
    class WithBreak(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

        def forward(self, x):
            x = self.a(x)
            print(end="")  # a graph break of the model's own
            return self.b(x)

    x = torch.randn(2, 64)
    plain = graphs_and_breaks(WithBreak(), lambda m: torch.compile(m, backend="aot_eager"), x)
    quantized = graphs_and_breaks(
        WithBreak(), lambda m: qpass.compile(m, "mxfp8-train", backend="aot_eager"), x)
    # (Dynamo's graph_break counter itself counts that one break twice under qpass: once in qpass's
    # outer frame, once in forward's; the graphs and the reasons are the same.)
    assert plain == quantized and plain[0] == 2 and len(plain[1]) == 1
    # fullgraph=True raises on any break: a block with every site quantized is one graph.
    graphs, breaks = graphs_and_breaks(
        Block(), lambda m: qpass.compile(m, "fp8-train", backend="aot_eager", fullgraph=True, attention=True),
        torch.randn(1, 40, 64),
    )
    assert (graphs, breaks) == (1, set())


def test_dynamic_batch_and_sequence_do_not_recompile_per_shape():
    torch._dynamo.reset()
    qm = qpass.compile(Block(), "mxfp8-train", backend="aot_eager")
    captured = []
    for batch, seq in [(1, 8), (2, 12), (3, 20), (4, 33), (5, 7)]:
        qm(torch.randn(batch, seq, 64)).sum().backward()
        captured.append(qm._qpass.graphs_captured)
    # At most: the first shape specialized, then one graph with batch and sequence dynamic (Dynamo
    # may start dynamic when it has seen this code change shapes before).
    assert captured[1] <= 2 and captured[-1] == captured[1]


def fp8_delayed_step(model, x):
    model(x).sum().backward()


def test_delayed_scaling_histories_round_trip_through_state_dict():
    torch.manual_seed(0)
    first = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    second = copy.deepcopy(first)
    qm = qpass.compile(first, "fp8-train", backend="aot_eager", scaling="delayed", history_len=4)
    x = [torch.randn(8, 64) * (i + 1) for i in range(4)]
    for step in range(3):
        fp8_delayed_step(qm, x[step])
    state = qm.state_dict()
    history = state["_qpass.0.input.amax_history"]
    assert history[:3].tolist() == [x[2].abs().max(), x[1].abs().max(), x[0].abs().max()]
    assert state["_qpass.2.grad_output.amax_history"][0] == 1.0  # d(sum)/dy
    assert int(state["_qpass.0.weight.num_recorded"]) == 3

    # Loaded before the first call (sites are not known yet): applied when the states are made.
    other = qpass.compile(second, "fp8-train", backend="aot_eager", scaling="delayed", history_len=4)
    other.load_state_dict(state)
    assert_same(other(x[3]), qm(x[3]))
    assert torch.equal(other.state_dict()["_qpass.2.input.amax_history"],
                       qm.state_dict()["_qpass.2.input.amax_history"])


def test_delayed_scaling_uses_the_history_not_the_current_amax():
    layer = nn.Linear(64, 64, bias=False)
    weight = layer.weight.detach().clone()
    qm = qpass.compile(layer, "fp8-train", backend="aot_eager", scaling="delayed")
    small, large = torch.full((4, 64), 0.5), torch.full((4, 64), 300.0)
    qm(large)
    y = qm(small)  # scaled by the history's amax of 300: 0.5 * 448/300 on the E4M3 grid
    state = qpass.DelayedScaling()
    state.record(large.abs().max())
    expected = (qpass.fake_quantize(small, "fp8_e4m3", delayed=state)
                @ qpass.fake_quantize(weight, "fp8_e4m3").mT)
    assert_same(y, expected)
    assert not torch.equal(
        y, qpass.fake_quantize(small, "fp8_e4m3") @ qpass.fake_quantize(weight, "fp8_e4m3").mT)


def test_a_model_without_matmuls_runs_unchanged_with_a_warning():
    model = nn.Sequential(nn.ReLU(), nn.Tanh())
    x = torch.randn(4, 8)
    qm = qpass.compile(model, "fp8-train", backend="aot_eager")
    with pytest.warns(UserWarning, match="no matmul or attention"):
        y = qm(x)
    assert torch.equal(y, torch.tanh(torch.relu(x)))
    assert qpass.report(qm).rows == []


def test_a_glob_that_matches_nothing_warns_with_its_name():
    qm = qpass.compile(nn.Linear(64, 64), "fp8-train", backend="aot_eager", exclude=["layers.*.nothing"])
    with pytest.warns(UserWarning, match=r"'layers\.\*\.nothing' matches no site"):
        qm(torch.randn(2, 64))


def test_integer_matmul_is_left_alone_and_reported():
    class Counts(nn.Module):
        def forward(self, mask):
            return mask @ mask.mT

    mask = (torch.randn(4, 40, 40) > 0).long()
    qm = qpass.compile(Counts(), "fp8-train", backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(qm(mask), mask @ mask.mT)
    (row,) = qpass.report(qm).rows
    assert not row["quantized"] and row["reason"].startswith("integer matmul")


def test_a_ragged_reduction_is_padded_not_skipped():
    qm = qpass.compile(nn.Linear(40, 8), "mxfp8-infer", backend="aot_eager", hadamard=None,
                       scale_mode="floor")
    x = torch.randn(3, 40)
    y = qm(x)
    assert qpass.report(qm)["linear"]["quantized"]
    mx = {"format": "mxfp8_e4m3"}
    assert_same(y, fq(x, mx, -1) @ fq(qm.weight, mx, -1).mT + qm.bias)


def test_export_holds_the_quantized_ops_and_computes_the_same():
    torch.manual_seed(0)
    block = Block().eval()
    x = torch.randn(2, 8, 64)
    qm = qpass.compile(block, "mxfp4-infer", backend="aot_eager")
    expected = qm(x)
    program = qpass.export(qm, (x,))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.qpass.quantize_dequantize.default) == 8  # 4 linears x (input, weight)
    assert_same(program.module()(x), expected)
    plain = qpass.export(Block().eval(), (x,), recipe="fp8-train")
    assert any(n.target is torch.ops.qpass.quantized_matmul.default for n in plain.graph.nodes)


class TinyLM(nn.Module):
    """An embedding, a linear and an untied output projection onto the vocabulary."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 64)
        self.hidden = nn.Linear(64, 64)
        self.lm_head = nn.Linear(64, 100)

    def forward(self, ids):
        return self.lm_head(torch.relu(self.hidden(self.embed(ids))))


def test_export_finds_the_same_sites_as_compile():
    """torch.export's graph holds aten.embedding(weight, indices), Dynamo's F.embedding(input,
    weight): both must give the vocabulary that marks the untied lm_head as the output projection."""
    qm = qpass.compile(TinyLM().eval(), "mxfp4-weight-only", backend="aot_eager")
    ids = torch.randint(0, 100, (2, 8))
    expected = qm(ids)
    compiled = {row["site"]: row["quantized"] for row in qpass.report(qm).rows}
    program = qpass.export(qm, (ids,))
    assert {row["site"]: row["quantized"] for row in qpass.report(qm).rows} == compiled
    assert compiled == {"embed": False, "hidden": True, "lm_head": False}
    assert_same(program.module()(ids), expected)


def test_recompiling_replaces_the_recipe_with_a_warning():
    qm = qpass.compile(nn.Linear(64, 64), "fp8-train", backend="aot_eager")
    with pytest.warns(UserWarning, match="already compiled"):
        qm = qpass.compile(qm, "mxfp8-infer", backend="aot_eager")
    qm(torch.randn(2, 64))
    assert qpass.report(qm).recipe == "mxfp8-infer"


@pytest.mark.parametrize("call, error, message", [
    (lambda: qpass.compile(nn.Linear(4, 4), "fp9-train"), ValueError,
     "expected one of fp8-train, fp8-rowwise-train, mxfp8-train"),
    (lambda: qpass.compile(nn.Linear(4, 4), "fp8-train", atention=True), ValueError,
     "valid keys: input, weight"),
    (lambda: qpass.compile(nn.Linear(4, 4), backend="tensorrt"), ValueError, "inductor, aot_eager, eager"),
    (lambda: qpass.compile(lambda x: x), TypeError, "takes an nn.Module"),
    (lambda: qpass.report(nn.Linear(4, 4)), ValueError, "compiled by qpass.compile"),
    (lambda: qpass.export(nn.Linear(4, 4), (torch.randn(1, 4),)), ValueError, "recipe="),
])
def test_bad_input_is_named(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_a_deep_copy_is_quantized_too_with_its_own_state():
    # torch drops _compiled_call_impl from copies of modules; qpass compiles the copy again.
    torch.manual_seed(0)
    qm = qpass.compile(nn.Sequential(nn.Linear(64, 64)), "fp8-train", backend="aot_eager", scaling="delayed")
    x = torch.randn(2, 64)
    qm(x)
    twin = copy.deepcopy(qm)
    assert twin._qpass is not qm._qpass
    assert_same(twin(x), qm(x))
    assert twin._qpass.graphs_captured == 1 and qpass.report(twin)["0"]["quantized"]
    with torch.no_grad():
        twin[0].weight.zero_()
    assert (torch.equal(twin(x), twin[0].bias.expand(2, 64))
            and not torch.equal(qm(x), qm[0].bias.expand(2, 64)))
    history = "_qpass.0.input.amax_history"
    assert torch.equal(twin.state_dict()[history], qm.state_dict()[history])  # both recorded x three times
