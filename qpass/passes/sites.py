"""Site discovery: find every matmul and attention in an FX graph, name it, and give its operands roles.

Analysis only; nothing here changes the graph. Works on Dynamo graphs (torch-level targets such as
``torch._C._nn.linear`` and ``operator.matmul``) and on torch.export graphs (ATen targets).

A site's name comes from the module path that produced it (``model.layers.3.mlp.down_proj``). A
module with a single matmul (an ``nn.Linear``, GPT-2's ``Conv1D``) names its site by its path
alone; otherwise the op kind is appended (``...self_attn.sdpa``, ``...attn.matmul_1``). Given the
:class:`ModelContext` of the model a graph came from, paths are the modules' own in that model, found
by identity, without wrappers' prefixes: right in any frame Dynamo traced (one resumed inside a
layer after a graph break, a block compiled on its own, a DDP wrapper's).
"""

from __future__ import annotations

import functools
import operator
import re
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import fx, nn

from qpass.passes.kinds import KINDS, OpKind, expert_slice, is_op, meta_value, op_kind

aten = torch.ops.aten

SOFTMAX = (torch.softmax, F.softmax, torch.Tensor.softmax, aten.softmax.int, aten._softmax.default, "softmax")
TOPK = (torch.topk, aten.topk.default, "topk")
# Ops that pass a tensor's values on unchanged, up to layout and dtype (for tracing weights back).
VIEWS = (
    torch.t, torch.transpose, torch.permute, torch.reshape, aten.t.default, aten.transpose.int,
    aten.permute.default, aten.view.default, aten.reshape.default, aten._to_copy.default,
    aten.alias.default, aten.detach.default, aten.to.dtype, aten.to.dtype_layout, aten.clone.default,
    "t", "transpose", "permute", "view", "reshape", "to", "float", "half", "bfloat16", "type",
    "contiguous", "detach", "type_as",
)
# Ops between Q·Kᵀ and the softmax of hand-written attention (scale, mask, cast).
SCORE_OPS = (
    operator.mul, operator.truediv, operator.add, operator.sub, torch.mul, torch.div, torch.add,
    torch.where, torch.masked_fill, aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor,
    aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self, aten._to_copy.default, aten.to.dtype,
    "mul", "div", "add", "sub", "masked_fill", "masked_fill_", "to", "float", "type", "type_as",
)
# Ops between the softmax and P·V.
PROBABILITY_OPS = (F.dropout, torch.dropout, aten.dropout.default, aten._to_copy.default, aten.to.dtype,
                   aten.clone.default, "dropout", "to", "type", "type_as", "float", "contiguous")
# Ops between a router's logits and its top-k.
ROUTER_OPS = (*SOFTMAX, torch.sigmoid, F.sigmoid, aten.sigmoid.default, "sigmoid", "to", "float", "view",
              "reshape")


def _is_transpose_attribute(node: fx.Node) -> bool:
    """``w.T`` or ``w.mT``, which Dynamo records as a ``getattr`` call."""
    return node.op == "call_function" and node.target is getattr and node.args[1] in ("T", "mT")


@dataclass(frozen=True)
class Site:
    """One site as discovery found it; frozen: later passes decide about it, never change it."""

    name: str
    kind: str  # a key of the op-kind table (qpass.passes.kinds.KINDS)
    node: fx.Node
    operands: tuple[fx.Node, ...]  # (A, B) of A·B; (Q, K, V) for sdpa; (weight,) for embedding
    roles: tuple[str, ...]  # per operand: "input" | "weight" | "q" | "k" | "v" | "p"
    module: str  # path of the innermost module that ran the op ("" for the root)
    reduction: int | None = None  # K when static; head_dim for sdpa
    unsupported: str | None = None  # why this site cannot be rewritten, if it cannot
    traits: frozenset[str] = frozenset()  # "output_projection", "router", "integer"
    weights: tuple[fx.Node | None, ...] = ()  # the parameter behind each operand, if any
    parameter: str = ""  # the path in the model of its (last) parameter operand; an expert site's name

    @property
    def op(self) -> OpKind:
        return KINDS[self.kind]


# ---- operands and roles -----------------------------------------------------------------------


def source_parameter(node, parameters: dict[fx.Node, torch.Tensor]) -> fx.Node | None:
    """The parameter that ``node`` is a view or cast of, if it is one."""
    while isinstance(node, fx.Node):
        if node in parameters:
            return node
        if expert_slice(node) is not None:  # one expert's matrix of a 3-D weight
            node = node.args[0]
            continue
        if not (is_op(node, VIEWS) or _is_transpose_attribute(node)) or not node.args:
            return None
        node = node.args[0]
    return None


def weight_value(node, parameters: dict[fx.Node, torch.Tensor]) -> torch.Tensor:
    """The value of an operand computed from parameters alone (a weight after earlier passes
    transformed it), evaluated from the parameters' values."""
    if node in parameters:
        return parameters[node]
    if not isinstance(node, fx.Node):
        return node
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: weight_value(n, parameters))
    with torch.no_grad():
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "get_attr":
        return functools.reduce(getattr, node.target.split("."), node.graph.owning_module)
    raise ValueError(f"{node.name} is not computed from parameters alone")


# ---- hand-written attention, routers, output projections ----------------------------------------


def _search(node: fx.Node, found, through: tuple, neighbours, depth: int) -> fx.Node | None:
    """The first node that ``found`` accepts, breadth-first from ``node``'s neighbours (inputs or
    users), going on only through ``through`` ops, within ``depth`` hops."""
    frontier = list(neighbours(node))
    for _ in range(depth):
        for candidate in frontier:
            if found(candidate):
                return candidate
        frontier = [m for n in frontier if is_op(n, through) for m in neighbours(n)]
    return None


def _upstream(node: fx.Node, found, through: tuple, depth: int = 6) -> fx.Node | None:
    return _search(node, found, through, lambda n: n.all_input_nodes, depth)


def _downstream(node: fx.Node, found, through: tuple, depth: int = 4) -> fx.Node | None:
    return _search(node, found, through, lambda n: n.users, depth)


def _derives_from(node, origin: fx.Node, through: tuple) -> bool:
    """``node`` is ``origin`` or reached from it by first-argument hops through ``through`` ops."""
    while isinstance(node, fx.Node) and node is not origin and is_op(node, through):
        node = node.args[0]
    return node is origin


def _mark_attention(graph: fx.Graph, sites: dict[fx.Node, Site]) -> None:
    """softmax(Q·Kᵀ·scale + mask)·V written by hand: its two matmuls become attention sites."""
    def is_pair_matmul(n):
        # A product of two activations that the attention kinds bind (a matmul or a bmm).
        return (n in sites and KINDS["attention_qk"].signature(n) is not None
                and sites[n].roles == ("input", "input"))

    for softmax in [n for n in graph.nodes if is_op(n, SOFTMAX)]:
        qk = _upstream(softmax, is_pair_matmul, SCORE_OPS)
        pv = _downstream(
            softmax,
            lambda n: is_pair_matmul(n) and _derives_from(sites[n].operands[0], softmax, PROBABILITY_OPS),
            PROBABILITY_OPS,
        )
        if qk is None or pv is None:
            continue
        for node, kind in ((qk, KINDS["attention_qk"]), (pv, KINDS["attention_pv"])):
            sites[node] = replace(sites[node], kind=kind.name, roles=kind.roles)


def _mark_experts(sites: dict[fx.Node, Site], parameters: dict[fx.Node, torch.Tensor]) -> None:
    """A batched matmul of a 3-D parameter ``[E, K, N]`` and activations ``[E, C, K]``: a matrix per
    expert, each expert's tokens its own (capacity-based dispatch), so each expert quantized on its own."""
    kind = KINDS["expert_bmm"]
    for node, site in sites.items():
        weight = site.weights[-1] if site.kind in ("bmm", "matmul") and site.weights else None
        a = meta_value(site.operands[0])
        if (weight is not None and site.roles == ("input", "weight") and parameters[weight].ndim == 3
                and a is not None and a.ndim == 3 and kind.signature(node) is not None):
            sites[node] = replace(site, kind=kind.name)


def _out_features(site: Site) -> int | None:
    weight = meta_value(site.operands[site.roles.index("weight")])
    if weight is None or weight.ndim != 2:
        return None
    return weight.shape[0] if site.op.weight_k_axis == -1 else weight.shape[-1]


@dataclass(frozen=True)
class _Vocabulary:
    """What tells an output projection: the embeddings' weights (tied) and the largest vocabulary."""

    weights: frozenset  # weight nodes of the graph's embeddings
    tensors: tuple[torch.Tensor, ...]  # the model's embedding weights (lm_head's graph may have none)
    size: int | None  # of the graph's embeddings: a block's graph has none, nor its last matmul lm_head

    @staticmethod
    def of(embeddings: list[Site], context: ModelContext) -> _Vocabulary:
        sizes = [v.shape[0] for s in embeddings if (v := meta_value(s.operands[0])) is not None]
        return _Vocabulary(frozenset(s.weights[0] for s in embeddings) - {None}, context.embedding_weights,
                           max(sizes, default=None))

    def ties(self, weight: fx.Node | None, parameters: dict[fx.Node, torch.Tensor]) -> bool:
        return weight in self.weights or any(parameters.get(weight) is t for t in self.tensors)


def _traits(
    site: Site, last_matmul: Site | None, vocabulary: _Vocabulary, parameters: dict[fx.Node, torch.Tensor],
    context: ModelContext,
) -> frozenset[str]:
    """Integer products; the output projection (lm_head); MoE routers (a linear feeding a top-k)."""
    traits = set()
    value = meta_value(site.node)
    if value is not None and not (value.is_floating_point() or value.is_complex()):
        traits.add("integer")
    if site.op.family != "matmul" or "weight" not in site.roles:
        return frozenset(traits)
    tied = vocabulary.ties(site.weights[site.roles.index("weight")], parameters)
    # Untied: the last matmul, projecting onto the largest embedding's vocabulary.
    last_onto_vocabulary = (site is last_matmul and vocabulary.size is not None
                            and _out_features(site) == vocabulary.size)
    if tied or last_onto_vocabulary or (site.module and site.module == context.output_projection):
        traits.add("output_projection")
    if _downstream(site.node, lambda n: is_op(n, TOPK), ROUTER_OPS) is not None:
        traits.add("router")
    return frozenset(traits)


# ---- naming ------------------------------------------------------------------------------------

_ROOT = re.compile(r"^L\[[^\]]*\](\[\d+\])?\.?")
# Modules that wrap another one under this attribute, and whose name is no part of a site's.
_WRAPPED = {"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}


@dataclass(frozen=True)
class ModelContext:
    """What a graph cannot tell about the model it was captured from: every module's path, keyed by
    the id Dynamo records in the module stack, both as ``named_modules`` spells it (``raw``) and
    without wrappers (``paths``: no ``module.`` of DDP, ``_orig_mod.`` of ``torch.compile``, FSDP's or
    activation checkpointing's); each parameter's module, by the parameter's id (a frame that is a
    module's own forward records no stack for its ops); the embeddings' weights, which tell a tied
    lm_head; and the output projection a Hugging Face model names (``get_output_embeddings``), which
    a graph broken before it (FSDP2's units) cannot tell by being the last matmul after the
    embeddings."""

    paths: Mapping[str, str] = field(default_factory=dict)
    raw: Mapping[str, str] = field(default_factory=dict)
    owners: Mapping[int, str] = field(default_factory=dict)
    embedding_weights: tuple[torch.Tensor, ...] = ()
    output_projection: str | None = None
    parameters: Mapping[int, str] = field(default_factory=dict)  # a parameter's id -> its unwrapped path

    @staticmethod
    def of(model: nn.Module) -> ModelContext:
        paths, raw, owners, parameters = {}, {}, {}, {}
        for name, module in model.named_modules(remove_duplicate=False):
            key = str(id(module))
            raw.setdefault(key, name)
            paths.setdefault(key, ".".join(_unwrapped(model, name.split(".")) if name else []))
            for attribute, parameter in module.named_parameters(recurse=False):
                owners.setdefault(id(parameter), paths[key])
                parameters.setdefault(id(parameter), f"{paths[key]}.{attribute}" if paths[key] else attribute)
        embeddings = tuple(m.weight for m in model.modules() if isinstance(m, nn.Embedding))
        outermost = next((m for m in model.modules() if hasattr(m, "get_output_embeddings")), None)
        head = None if outermost is None else outermost.get_output_embeddings()
        return ModelContext(paths, raw, owners, embeddings,
                            None if head is None else paths.get(str(id(head))), parameters)

    def unwrapped(self, raw_path: str) -> str | None:
        """The path without wrappers of the module that ``named_modules`` calls ``raw_path``."""
        return self._by_raw.get(raw_path)

    @functools.cached_property
    def _by_raw(self) -> dict[str, str]:
        return {name: self.paths[key] for key, name in self.raw.items()}


def _unwrapped(model: nn.Module, parts: list[str]) -> list[str]:
    """A module path's parts without the attributes under which wrappers hold the wrapped module."""
    kept, parent = [], model
    for part in parts:
        wrapper = part in _WRAPPED or (part == "module" and isinstance(
            parent, (nn.parallel.DistributedDataParallel, nn.DataParallel)))
        kept += [] if wrapper else [part]
        parent = parent._modules[part]
    return kept


def frame_path(node: fx.Node) -> str:
    """The innermost module's path relative to the module of the frame Dynamo traced (its
    ``L['self']`` removed)."""
    stack = node.meta.get("nn_module_stack") or {}
    return _ROOT.sub("", list(stack.values())[-1][0]) if stack else ""


def module_path(node: fx.Node, context: ModelContext = ModelContext()) -> str:
    """The path of the innermost module that ran ``node``: its own path in the model where
    ``context`` knows the module, else relative to the frame Dynamo traced."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return context.paths.get(next(reversed(stack)), frame_path(node))


def _names(sites: list[Site]) -> list[str]:
    per_module = Counter(s.module for s in sites if not (s.op.family == "experts" and s.parameter))
    seen: dict[tuple[str, str], int] = defaultdict(int)
    names = []
    for site in sites:
        if site.op.family == "experts" and site.parameter:  # by its weight; a second GEMM of it: a suffix
            index = seen[site.parameter, site.kind]
            seen[site.parameter, site.kind] += 1
            names.append(site.parameter if index == 0 else f"{site.parameter}_{index}")
            continue
        if per_module[site.module] == 1 and site.module and site.op.family != "attention":
            names.append(site.module)
            continue
        index = seen[site.module, site.kind]
        seen[site.module, site.kind] += 1
        suffix = site.kind if index == 0 else f"{site.kind}_{index}"
        names.append(f"{site.module}.{suffix}" if site.module else suffix)
    return names


# ---- the pass ----------------------------------------------------------------------------------


def _found(
    node: fx.Node, kind: OpKind, parameters: dict[fx.Node, torch.Tensor], context: ModelContext
) -> Site:
    operands = kind.operand_nodes(node)
    weights = tuple(source_parameter(o, parameters) for o in operands)
    roles = kind.roles or tuple("weight" if w is not None else "input" for w in weights)
    why = kind.unsupported(node)
    module = module_path(node, context)
    if not node.meta.get("nn_module_stack"):  # the frame's own module's op, or the root's: by its weight
        module = next((owner for w in weights if w is not None
                       and (owner := context.owners.get(id(parameters[w]))) is not None), module)
    weight = next((w for w in reversed(weights) if w is not None), None)
    return Site(
        name="", kind=kind.name, node=node, operands=operands, roles=roles, module=module,
        reduction=kind.reduction(node) if why is None else None, unsupported=why, weights=weights,
        parameter="" if weight is None else context.parameters.get(id(parameters[weight]), ""),
    )


def find_sites(
    graph: fx.Graph, parameters: dict[fx.Node, torch.Tensor], context: ModelContext = ModelContext()
) -> list[Site]:
    """Every matmul, attention and embedding in ``graph``, in graph order.

    ``parameters`` maps the nodes that hold parameters (placeholders or get_attrs) to their
    values: operands traced back to one of them get the role ``weight``. ``context``: the model the
    graph was captured from, which names the modules.
    """
    sites = {node: _found(node, kind, parameters, context)
             for node in graph.nodes if (kind := op_kind(node)) is not None}
    _mark_attention(graph, sites)
    _mark_experts(sites, parameters)
    ordered = list(sites.values())
    matmuls = [s for s in ordered if s.op.family == "matmul"]
    vocabulary = _Vocabulary.of([s for s in ordered if s.op.family == "embedding"], context)
    # The output projection is the last matmul: identity, so compare before replacing any site.
    last = matmuls[-1] if matmuls else None
    traits = [_traits(site, last, vocabulary, parameters, context) for site in ordered]
    ordered = [replace(site, traits=t) for site, t in zip(ordered, traits)]
    return [replace(site, name=name) for site, name in zip(ordered, _names(ordered))]
