"""Site discovery: find every matmul and attention in an FX graph, name it, and give its operands roles.

Analysis only; nothing here changes the graph. Works on Dynamo graphs (torch-level targets such as
``torch._C._nn.linear`` and ``operator.matmul``) and on torch.export graphs (ATen targets).

A site's name comes from the module path that produced it (``model.layers.3.mlp.down_proj``). A
module with a single matmul (an ``nn.Linear``, GPT-2's ``Conv1D``) names its site by its path
alone; otherwise the op kind is appended (``...self_attn.sdpa``, ``...attn.matmul_1``).
"""

from __future__ import annotations

import functools
import operator
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx

aten = torch.ops.aten

# kind -> the targets that compute it (functions for call_function, names for call_method)
OP_KINDS: dict[str, tuple] = {
    "linear": (F.linear, aten.linear.default),
    "matmul": (operator.matmul, torch.matmul, aten.matmul.default, "matmul", "__matmul__"),
    "mm": (torch.mm, aten.mm.default, "mm"),
    "bmm": (torch.bmm, aten.bmm.default, "bmm"),
    "addmm": (torch.addmm, aten.addmm.default, "addmm"),
    "baddbmm": (torch.baddbmm, aten.baddbmm.default, "baddbmm"),
    "einsum": (torch.einsum, aten.einsum.default),
    "sdpa": (F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default),
    "embedding": (F.embedding, torch.embedding, aten.embedding.default),
}
MATMUL_KINDS = ("linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum")
ATTENTION_KINDS = ("sdpa", "attention_qk", "attention_pv")
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
ROUTER_OPS = (*SOFTMAX, torch.sigmoid, F.sigmoid, aten.sigmoid.default, "sigmoid", "to", "float", "view", "reshape")


def op_kind(node: fx.Node) -> str | None:
    if node.op not in ("call_function", "call_method"):
        return None
    for kind, targets in OP_KINDS.items():
        if is_op(node, targets):
            return kind
    return None


def is_op(node: fx.Node, targets: tuple) -> bool:
    if node.op == "call_function":
        return any(node.target is t for t in targets if not isinstance(t, str))
    return node.op == "call_method" and node.target in targets


def _is_transpose_attribute(node: fx.Node) -> bool:
    """``w.T`` or ``w.mT``, which Dynamo records as a ``getattr`` call."""
    return node.op == "call_function" and node.target is getattr and node.args[1] in ("T", "mT")


def meta_value(node) -> torch.Tensor | None:
    """The example (fake) tensor Dynamo or torch.export recorded for ``node``, if any."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


@dataclass
class Site:
    name: str
    kind: str  # one of MATMUL_KINDS, ATTENTION_KINDS or "embedding"
    node: fx.Node
    operands: tuple[fx.Node, ...]  # (A, B) of A·B; (Q, K, V) for sdpa; (weight,) for embedding
    roles: tuple[str, ...]  # per operand: "input" | "weight" | "q" | "k" | "v" | "p"
    module: str  # path of the innermost module that ran the op ("" for the root)
    reduction: int | None = None  # K when static; head_dim for sdpa
    unsupported: str | None = None  # why this site cannot be rewritten, if it cannot
    traits: set[str] = field(default_factory=set)  # "output_projection", "router", "integer"
    weights: tuple[fx.Node | None, ...] = ()  # the parameter behind each operand, if any


# ---- operands and roles -----------------------------------------------------------------------


def source_parameter(node, parameters: dict[fx.Node, torch.Tensor]) -> fx.Node | None:
    """The parameter that ``node`` is a view or cast of, if it is one."""
    while isinstance(node, fx.Node):
        if node in parameters:
            return node
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


def matmul_operands(node: fx.Node, kind: str) -> tuple[list, str | None]:
    """The operands of a matmul-like node, and why it cannot be quantized (None when it can)."""
    args = list(node.args) + [node.kwargs[k] for k in ("input", "other", "mat1", "mat2") if k in node.kwargs]
    if kind in ("addmm", "baddbmm"):
        return args[1:3], None
    if kind == "einsum":
        operands = args[1:]
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = list(operands[0])
        why = einsum_unsupported(args[0], len(operands))
        return (operands if len(operands) == 2 else [None, None]), why
    if kind == "sdpa":
        return args[:3], None
    return args[:2], None


def einsum_unsupported(equation: str, num_operands: int) -> str | None:
    """Why an einsum is not a two-operand batched matmul (None when it is one)."""
    equation = equation.replace(" ", "")
    if num_operands != 2 or "->" not in equation or "." in equation:
        return f"einsum {equation!r} is not a two-operand batched matmul with an explicit output"
    inputs, out = equation.split("->")
    a, b = inputs.split(",")
    if any(len(set(term)) != len(term) for term in (a, b, out)):
        return f"einsum {equation!r} takes a diagonal (a repeated index)"
    if not set(a) & set(b) - set(out):
        return f"einsum {equation!r} contracts no index"
    if (set(a) ^ set(b)) - set(out) or set(out) - set(a) - set(b):
        return f"einsum {equation!r} sums over or invents an index outside the contraction"
    return None


def _reduction(kind: str, node: fx.Node, operands: list) -> int | None:
    """The reduction length K (head_dim for sdpa) when it is static; None when symbolic or unknown."""
    value = meta_value(operands[0])
    if value is None or value.ndim == 0:
        return None
    if kind == "einsum":
        inputs, out = node.args[0].replace(" ", "").split("->")
        a, b = inputs.split(",")
        contracted = [value.shape[i] for i, index in enumerate(a) if index in b and index not in out]
        k = 1
        for size in contracted:
            k = k * size
    else:
        k = value.shape[-1]
    return k if isinstance(k, int) else None  # a symbolic K is decided at run time, never excluded


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
        return n in sites and sites[n].kind in ("matmul", "bmm") and sites[n].roles == ("input", "input")

    for softmax in [n for n in graph.nodes if is_op(n, SOFTMAX)]:
        qk = _upstream(softmax, is_pair_matmul, SCORE_OPS)
        pv = _downstream(
            softmax,
            lambda n: is_pair_matmul(n) and _derives_from(sites[n].operands[0], softmax, PROBABILITY_OPS),
            PROBABILITY_OPS,
        )
        if qk is None or pv is None:
            continue
        sites[qk].kind, sites[qk].roles = "attention_qk", ("q", "k")
        sites[pv].kind, sites[pv].roles = "attention_pv", ("p", "v")


def _out_features(site: Site) -> int | None:
    weight = meta_value(site.operands[site.roles.index("weight")])
    if weight is None or weight.ndim != 2:
        return None
    return weight.shape[0] if site.kind == "linear" else weight.shape[-1]


def _mark_traits(sites: dict[fx.Node, Site]) -> None:
    """Integer products; the output projection (lm_head); MoE routers (a linear feeding a top-k)."""
    embeddings = [s for s in sites.values() if s.kind == "embedding"]
    embedding_weights = {s.weights[0] for s in embeddings} - {None}
    vocabulary = max((v.shape[0] for s in embeddings if (v := meta_value(s.operands[0])) is not None), default=None)
    matmuls = [s for s in sites.values() if s.kind in MATMUL_KINDS]
    for site in sites.values():
        value = meta_value(site.node)
        if value is not None and not (value.is_floating_point() or value.is_complex()):
            site.traits.add("integer")
    for site in matmuls:
        if "weight" not in site.roles:
            continue
        tied = site.weights[site.roles.index("weight")] in embedding_weights
        # Untied: the last matmul, projecting onto the largest embedding's vocabulary.
        last_onto_vocabulary = site is matmuls[-1] and vocabulary is not None and _out_features(site) == vocabulary
        if tied or last_onto_vocabulary:
            site.traits.add("output_projection")
        if _downstream(site.node, lambda n: is_op(n, TOPK), ROUTER_OPS) is not None:
            site.traits.add("router")


# ---- naming ------------------------------------------------------------------------------------

_ROOT = re.compile(r"^L\['[^']*'\]\.?")


def module_path(node: fx.Node) -> str:
    """The innermost module's path, relative to the compiled model (Dynamo's ``L['self']`` removed)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return _ROOT.sub("", path)


def _name_sites(sites: list[Site]) -> None:
    per_module = Counter(s.module for s in sites)
    seen: dict[tuple[str, str], int] = defaultdict(int)
    for site in sites:
        if per_module[site.module] == 1 and site.module and site.kind in (*MATMUL_KINDS, "embedding"):
            site.name = site.module
            continue
        index = seen[site.module, site.kind]
        seen[site.module, site.kind] += 1
        suffix = site.kind if index == 0 else f"{site.kind}_{index}"
        site.name = f"{site.module}.{suffix}" if site.module else suffix


# ---- the pass ----------------------------------------------------------------------------------


def find_sites(graph: fx.Graph, parameters: dict[fx.Node, torch.Tensor]) -> list[Site]:
    """Every matmul, attention and embedding in ``graph``, in graph order.

    ``parameters`` maps the nodes that hold parameters (placeholders or get_attrs) to their
    values: operands traced back to one of them get the role ``weight``.
    """
    sites: dict[fx.Node, Site] = {}
    for node in graph.nodes:
        kind = op_kind(node)
        if kind is None:
            continue
        if kind == "embedding":
            # F.embedding(input, weight), but torch.embedding and aten.embedding(weight, indices)
            weight = node.args[0] if node.target in (torch.embedding, aten.embedding.default) else node.args[1]
            operands, why = [weight], None
        else:
            operands, why = matmul_operands(node, kind)
        weights = tuple(source_parameter(o, parameters) for o in operands)
        if kind == "sdpa":
            roles = ("q", "k", "v")
        elif kind == "linear":
            roles = ("input", "weight")
        else:
            roles = tuple("weight" if w is not None else "input" for w in weights)
        if why is None and kind != "embedding" and any(
            (v := meta_value(o)) is not None and v.ndim < 2 for o in operands
        ):
            why = "a vector operand (matrix-vector product)"
        sites[node] = Site(
            name="", kind=kind, node=node, operands=tuple(operands), roles=roles,
            module=module_path(node), reduction=_reduction(kind, node, operands) if why is None else None, unsupported=why, weights=weights,
        )
    _mark_attention(graph, sites)
    _mark_traits(sites)
    ordered = list(sites.values())
    _name_sites(ordered)
    return ordered
