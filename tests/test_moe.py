"""Mixtures of experts: Hugging Face Mixtral, Qwen3-MoE and GPT-OSS from tiny configs, under each of
transformers' expert implementations ("eager" loop, "batched_mm", "grouped_mm").

- every expert GEMM is found once, named after its weight, with roles (input, weight); the router
  stays excluded;
- forward and every gradient equal a hand-written per-expert SPEC section 6 computation bit for bit
  (fp32, same routing): :class:`Spec6Experts` runs the uncompiled model with each expert GEMM replaced
  by :class:`~spec6.Spec6Product` of that expert's tokens, in the order the implementation gives them
  (the loop's, the sort's; a per-token bmm's tokens stable by expert id, as qpass defines it);
- routing edge cases (an expert with no tokens, one token, all tokens); graph breaks; the logits and
  gradients above QSNR floors derived as the dense models' are; training lowers the loss, the
  load-balancing loss left as it is; a layout qpass does not know is reported, never silently left
  unquantized.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers
from spec6 import Spec6Product, assert_same
from test_compile import FP8_TRAIN, MXFP8_TRAIN
from test_models import DGE_NOISE, ELEMENT_QSNR, GRAD_ELEMENT_QSNR, MAX_QSNR_DB, OPERANDS_DB, _flat_grads
from torch import nn
from torch.overrides import TorchFunctionMode

import qpass

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning:transformers.*"),
]

VOCAB, HIDDEN, INTERMEDIATE, EXPERTS, LAYERS = 256, 128, 96, 4, 2
IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")
EXPERT_KINDS = ("grouped_mm", "token_bmm", "expert_linear", "expert_matmul", "expert_bmm")
GEMMS = (F.linear, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.matmul)
ONLY_EXPERTS = ["*self_attn*", "*shared_expert*"]  # the other sites left alone: the oracle has only experts


def mixtral(implementation, layers=LAYERS):
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=EXPERTS, num_experts_per_tok=2,
        max_position_embeddings=64, use_cache=False, experts_implementation=implementation))


def qwen3_moe(implementation, layers=LAYERS):
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        moe_intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_experts=EXPERTS, num_experts_per_tok=2, max_position_embeddings=64, use_cache=False,
        experts_implementation=implementation))


def gpt_oss(implementation, layers=LAYERS):
    # Weights stored transposed ([E, K, N]) with biases; the eager loop multiplies by `@`.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # YaRN's factor against a tiny max_position_embeddings
        config = transformers.GptOssConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_local_experts=EXPERTS,
            num_experts_per_tok=2, max_position_embeddings=64, layer_types=["full_attention"] * layers,
            use_cache=False, experts_implementation=implementation)
    return transformers.GptOssForCausalLM(config)


ARCHITECTURES = {"mixtral": mixtral, "qwen3_moe": qwen3_moe, "gpt_oss": gpt_oss}
KINDS = {"batched_mm": "token_bmm", "grouped_mm": "grouped_mm"}


def expected_kind(architecture: str, implementation: str) -> str:
    if implementation == "eager":
        return "expert_matmul" if architecture == "gpt_oss" else "expert_linear"
    return KINDS[implementation]


def build(architecture: str, implementation: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return ARCHITECTURES[architecture](implementation, **kwargs).eval()


def batch(seq: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the oracle ------------------------------------------------------------------------------------


def _grouped(tokens, experts, offs, specs):
    """Rows ``offs[e-1]:offs[e]`` times ``experts[e]`` ([E, K, N]), each by SPEC section 6."""
    out, start = tokens.new_zeros(tokens.shape[0], experts.shape[-1]), 0
    pieces = []
    for e, end in enumerate(offs.tolist()):
        if end > start:
            pieces.append((start, end, Spec6Product.apply(tokens[start:end], experts[e], specs)))
        start = end
    for start, end, piece in pieces:
        out = out.index_put((torch.arange(start, end),), piece)
    return out


class Spec6Experts(TorchFunctionMode):
    """Each expert GEMM of an uncompiled transformers MoE model as SPEC section 6 of that expert's
    tokens and matrix (:class:`Spec6Product`): ``F.linear`` / ``@`` of ``experts[e]`` (the eager loop),
    ``bmm`` of ``experts[ids]`` (batched_mm: tokens grouped by id, stably), ``grouped_mm`` (offsets)."""

    def __init__(self, model: nn.Module, specs: dict):
        super().__init__()
        self.weights = {id(p) for p in model.parameters() if p.ndim == 3}
        self.specs = specs
        self.slices = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__ and id(args[0]) in self.weights:
            out = func(*args, **kwargs)
            self.slices[id(out)] = (out, args[0], args[1])
            return out
        if func in (F.grouped_mm, torch._grouped_mm):
            return _grouped(args[0], args[1], kwargs["offs"], self.specs)
        found = self.slices.get(id(args[1])) if len(args) > 1 else None
        found = found if found is not None and found[0] is args[1] else None
        if found is not None and func in GEMMS:
            weight = args[1].mT if func is F.linear else args[1]
            out = Spec6Product.apply(args[0], weight, self.specs)
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return out if bias is None else out + bias
        gathered = self.slices.get(id(args[0])) if func is torch.bmm else None
        if gathered is not None or (func is torch.bmm and self.slices.get(id(args[1])) is not None):
            nk = gathered is not None  # bmm(experts[ids] [S, N, K], tokens [S, K, 1])
            _, experts, ids = gathered if nk else self.slices[id(args[1])]
            tokens = (args[1] if nk else args[0]).reshape(ids.shape[0], -1)
            order = torch.argsort(ids, stable=True)
            offs = torch.bincount(ids, minlength=experts.shape[0]).cumsum(0)
            out = _grouped(tokens[order], experts.mT if nk else experts, offs, self.specs)
            out = out[torch.argsort(order)]
            return out.unsqueeze(-1) if nk else out.unsqueeze(1)
        return func(*args, **kwargs)


def compare(architecture, implementation, recipe, specs, layers=1, backward=True):
    """The qpass-compiled model against the oracle: logits and every gradient, bit for bit."""
    model = build(architecture, implementation, layers=layers)
    reference = copy.deepcopy(model)
    ids = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # mxfp8-infer without its block rotation: the oracle quantizes expert GEMMs as SPEC 6 says.
        overrides = dict(hadamard=None, scale_mode="floor") if recipe == "mxfp8-infer" else {}
        qm = qpass.compile(model, recipe, backend="aot_eager", exclude=ONLY_EXPERTS, **overrides)
        logits = qm(ids).logits
    with Spec6Experts(reference, specs):
        expected = reference(ids).logits
    assert_same(logits, expected)
    if backward:
        dy = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
        logits.backward(dy)
        with Spec6Experts(reference, specs):
            expected.backward(dy)
        for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
            assert (p.grad is None) == (p_ref.grad is None), name
            if p.grad is not None:
                assert_same(p.grad, p_ref.grad)
    return qm


# ---- sites, and bit for bit against per-expert SPEC section 6 ----------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_expert_gemm_is_found_once_and_matches_per_expert_spec6(architecture, implementation):
    qm = compare(architecture, implementation, "fp8-train", FP8_TRAIN, layers=LAYERS)
    report = qpass.report(qm)
    experts = [row for row in report.rows if row["kind"] in EXPERT_KINDS]
    names = [f"model.layers.{i}.mlp.experts.{weight}"
             for i in range(LAYERS) for weight in ("gate_up_proj", "down_proj")]
    assert [row["site"] for row in experts] == names
    for row in experts:
        assert row["kind"] == expected_kind(architecture, implementation)
        assert row["roles"] == ("input", "weight") and row["experts"] == EXPERTS and row["quantized"]
        assert row["K"] == (HIDDEN if row["site"].endswith("gate_up_proj") else INTERMEDIATE)
        assert row["formats"]["wgrad.grad_output"] == "fp8_e5m2"
        assert row["gemm"] == "per expert: scaled_mm tensorwise"
    routers = [row for row in report.rows if row["site"].endswith(("mlp.gate", "mlp.router"))]
    assert len(routers) == LAYERS and all("MoE router" in row["reason"] for row in routers)
    assert "(4 experts)" in str(report) and all(row["kind"] != "module" for row in report.rows)


# The eager loop of Qwen3-MoE is Mixtral's (F.linear of a slice); GPT-OSS's multiplies by `@`.
WITHOUT_QWEN_LOOP = [(a, i) for a in ARCHITECTURES for i in IMPLEMENTATIONS
                     if (a, i) != ("qwen3_moe", "eager")]


@pytest.mark.parametrize("architecture, implementation", WITHOUT_QWEN_LOOP)
def test_mxfp8_train_matches_per_expert_spec6(architecture, implementation):
    compare(architecture, implementation, "mxfp8-train", MXFP8_TRAIN)


@pytest.mark.parametrize("implementation", ["batched_mm", "grouped_mm"])
def test_rowwise_fp8_matches_per_expert_spec6(implementation):
    rowwise = {"format": "fp8_e4m3", "granularity": "channel"}
    compare("mixtral", implementation, "fp8-rowwise-train", dict.fromkeys(FP8_TRAIN, rowwise))


@pytest.mark.parametrize("recipe, implementation", [
    ("mxfp8-infer", "eager"), ("mxfp8-infer", "batched_mm"), ("nvfp4-infer", "batched_mm"),
    ("nvfp4-infer", "grouped_mm")])
def test_inference_forward_matches_per_expert_spec6(implementation, recipe):
    fmt = {"format": "mxfp8_e4m3" if recipe == "mxfp8-infer" else "nvfp4"}
    specs = {"a": fmt, "b": fmt}  # nvfp4's global scale too: per expert
    compare("mixtral", implementation, recipe, specs | dict.fromkeys(("da_grad", "da_b", "db_grad", "db_a")),
            backward=False)


# ---- routing edge cases ------------------------------------------------------------------------------


def _experts_module(implementation):
    return build("mixtral", implementation, layers=1).model.layers[0].mlp.experts


ROUTINGS = {
    # 12 tokens, top-2: expert 3 gets none, expert 2 one token, expert 0 every token.
    "empty_one_all": torch.tensor([[0, 1]] * 6 + [[0, 2]] + [[0, 1]] * 5),
    "one_expert_only": torch.tensor([[1, 1]] * 12),
}


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_routing_edge_cases(implementation, routing):
    experts = _experts_module(implementation)
    reference = copy.deepcopy(experts)
    index = ROUTINGS[routing]
    x = torch.randn(12, HIDDEN, generator=torch.Generator().manual_seed(3))
    weights = torch.rand(12, 2, generator=torch.Generator().manual_seed(4))
    x_q, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    qm = qpass.compile(experts, "fp8-train", backend="aot_eager")
    y = qm(x_q, index, weights)
    with Spec6Experts(reference, FP8_TRAIN):
        y_ref = reference(x_ref, index, weights)
    assert_same(y, y_ref)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    y.backward(dy)
    with Spec6Experts(reference, FP8_TRAIN):
        y_ref.backward(dy)
    assert_same(x_q.grad, x_ref.grad)
    for p, p_ref in zip(experts.parameters(), reference.parameters()):
        assert_same(p.grad, p_ref.grad)
    unused = sorted(set(range(EXPERTS)) - set(index.flatten().tolist()))
    assert (experts.gate_up_proj.grad[unused] == 0).all() and (experts.down_proj.grad[unused] == 0).all()


# ---- graph breaks -------------------------------------------------------------------------------------


def _graphs_per_call(model, compile_, monkeypatch) -> int:
    """How many Dynamo graphs one forward runs (each graph break adds one), after the first call."""
    runs = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def counting(gm, example_inputs):
        compiled = aot_eager(gm, example_inputs)
        return lambda *args: runs.append(1) or compiled(*args)

    # qpass hands its graphs to the backend it names; this counts them the same way.
    monkeypatch.setattr(torch._dynamo, "lookup_backend",
                        lambda name: counting if name == "aot_eager" else name)
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = compile_(model, counting)
        compiled(batch())
        runs.clear()
        compiled(batch())
    monkeypatch.undo()
    return len(runs)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_qpass_adds_no_graph_break(implementation, monkeypatch):
    plain = _graphs_per_call(build("mixtral", implementation, layers=1),
                             lambda m, backend: torch.compile(m, backend=backend), monkeypatch)
    quantized = _graphs_per_call(build("mixtral", implementation, layers=1),
                                 lambda m, backend: qpass.compile(m, "fp8-train", backend="aot_eager"),
                                 monkeypatch)
    assert quantized <= plain, (quantized, plain)
    if implementation != "eager":  # only the eager loop is data-dependent: one graph
        assert quantized == plain == 1


# ---- accuracy and training -------------------------------------------------------------------------------


def _qsnrs(architecture, recipe, implementation="grouped_mm"):
    """Logits' and gradients' QSNR with the expert GEMMs alone quantized (the router of the first layer
    then sees the unquantized model's input: attention's error flips routing, see the floors)."""
    model = build(architecture, implementation, layers=1)
    reference = copy.deepcopy(model)
    ids = batch(32)
    ref = reference(ids, labels=ids)
    ref.loss.backward()
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qpass.compile(model, recipe, backend="aot_eager", exclude=ONLY_EXPERTS)
        out = qm(ids, labels=ids)
        out.loss.backward()
    names = {n for n, p in reference.named_parameters() if p.grad is not None}
    grad_qsnr = qpass.qsnr(_flat_grads(reference, names), _flat_grads(model, names))
    return qpass.qsnr(ref.logits, out.logits), grad_qsnr, qpass.report(qm)


# The dense models' derivation (tests/test_models.py) for the expert GEMMs alone, of one layer: its
# gate_up and down projections are 2 quantized GEMMs in series, 2 stages in the forward (-3 dB, where
# the dense models' 8 cost -9 dB) and 4 in the backward (-6 dB). Attention stays unquantized: routing
# is not continuous, and an error that moves a token's router logits across the top-k boundary sends
# it to another expert, an error no format bounds (with attention quantized, GPT-OSS's logits fall
# below the dense floors under the 8-bit recipes while its expert GEMMs alone stay far above them).
FORWARD_STAGES_DB = 10 * math.log10(2)
BACKWARD_STAGES_DB = 10 * math.log10(2 * 2)


def experts_floor(recipe: str) -> float:
    return ELEMENT_QSNR[recipe] - OPERANDS_DB[recipe] - FORWARD_STAGES_DB


def experts_grad_floor(recipe: str) -> float:
    if recipe not in GRAD_ELEMENT_QSNR:
        return experts_floor(recipe)
    floor = min(ELEMENT_QSNR[recipe], GRAD_ELEMENT_QSNR[recipe]) - OPERANDS_DB[recipe] - BACKWARD_STAGES_DB
    return -10 * math.log10(10 ** (-floor / 10) + DGE_NOISE.get(recipe, 0.0))


# Every recipe on Mixtral; a training and an inference recipe of each format family on the others
# (their experts run the same per-expert code, only the layouts around it differ).
QSNR_CASES = ([("mixtral", recipe) for recipe in qpass.recipes()]
              + [(a, r) for a in ("qwen3_moe", "gpt_oss")
                 for r in ("fp8-train", "mxfp4-train", "nvfp4-infer")])


@pytest.mark.slow
@pytest.mark.parametrize("architecture, recipe", QSNR_CASES)
def test_qsnr_above_the_format_floors(architecture, recipe):
    qsnr, grad_qsnr, report = _qsnrs(architecture, recipe)
    assert experts_floor(recipe) < qsnr < MAX_QSNR_DB, qsnr
    assert experts_grad_floor(recipe) < grad_qsnr < MAX_QSNR_DB, grad_qsnr
    assert len([row for row in report.quantized if row["kind"] in EXPERT_KINDS]) == 2


@pytest.mark.parametrize("recipe", ["fp8-train", "mxfp8-train", "fp4-train"])
def test_training_lowers_the_loss_and_keeps_the_load_balancing_loss(recipe):
    model = build("mixtral", "grouped_mm").train()
    model.config.output_router_logits = True
    reference = copy.deepcopy(model)
    ids = batch(32)
    qm = qpass.compile(model, recipe, backend="aot_eager", exclude=["*self_attn*"])
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for step in range(8):
            out = qm(ids, labels=ids)
            if step == 0:
                # Attention left alone: the first router sees exactly the unquantized model's input,
                # and its high-precision logits make the same load-balancing loss.
                ref = reference(ids, labels=ids)
                assert_same(out.router_logits[0], ref.router_logits[0])
                assert out.aux_loss is not None and math.isfinite(out.aux_loss.item())
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


# ---- layouts qpass does not know --------------------------------------------------------------------


class ElementwiseExperts(nn.Module):
    """Per-token expert GEMVs written as a product and a sum: no GEMM for qpass to find."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(64, 4)
        self.weight = nn.Parameter(torch.randn(4, 32, 64))

    def forward(self, x):
        ids = self.router(x).argmax(-1)
        return (x.unsqueeze(1) * self.weight[ids]).sum(-1)


def test_an_unknown_expert_layout_is_reported_and_warned_once():
    qm = qpass.compile(ElementwiseExperts(), "fp8-train", backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qm(torch.randn(8, 64))
        qm(torch.randn(8, 64))
    messages = [str(w.message) for w in caught if "does not recognise" in str(w.message)]
    assert len(messages) == 1, messages
    assert "ElementwiseExperts is NOT quantized" in messages[0] and "(weight)" in messages[0]
    row = qpass.report(qm)["ElementwiseExperts"]
    assert not row["quantized"] and row["kind"] == "module"
    assert "not quantized: an expert layout qpass does not recognise" in str(qpass.report(qm))
