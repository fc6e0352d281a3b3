"""The op-kind table: every kind of site qpass finds, declared once.

An :class:`OpKind` says which graph targets compute it (Dynamo's torch-level functions and methods,
torch.export's ATen ops) and the argument names of each, which bound arguments are its operands and
their roles, its products and their reduction axes, and the quantized function that replaces it
(:mod:`qpass.quantized`). Discovery (:mod:`qpass.passes.sites`), planning
(:mod:`qpass.passes.plan`), the transforms and the rewrite read a site's kind from here and never
test its name; adding a kind is one entry in :data:`KINDS` plus its tests.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx

from qpass import quantized
from qpass.einsum import einsum_layout

aten = torch.ops.aten

# (M, K, N) of A [..., M, K] · B [..., K, N], None: not static
Dims = tuple[int | None, int | None, int | None]
SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def meta_value(node) -> torch.Tensor | None:
    """The example (fake) tensor Dynamo or torch.export recorded for ``node``, if any."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def _static(size) -> int | None:
    return size if isinstance(size, int) else None


def _last_axis(bound: dict, a: torch.Size) -> int:
    return a[-1]


def _contracted(bound: dict, a: torch.Size) -> int:
    """An einsum's K: the product of its contracted indices' sizes."""
    layout = einsum_layout(bound["equation"])
    return math.prod(a[layout.a.index(i)] for i in layout.contracted)


def _einsum_unsupported(bound: dict) -> str | None:
    layout = einsum_layout(bound["equation"], bound["num_operands"])
    return layout if isinstance(layout, str) else None


def _product_dims(kind: OpKind, shapes: list) -> list[Dims]:
    a, b = shapes
    if kind.weight_k_axis == -1:
        b = tuple(reversed(b))  # the weight is [N, K]: the product's B is its transpose
    # A matrix B is shared by every batch entry: its weight gradient reduces all of A's rows.
    m = math.prod(a[:-1]) if len(b) == 2 else a[-2]
    return [(_static(m), _static(a[-1]), _static(b[-1]))]


def _expert_dims(kind: OpKind, shapes: list) -> list[Dims]:
    """An expert's GEMM: K and N from its weight; M, its tokens, is decided by routing at run time."""
    a, b = shapes
    k, n = (b[-1], b[-2]) if kind.weight_k_axis == -1 else (b[-2], b[-1])
    return [(None, _static(k), _static(n))]


def _attention_dims(kind: OpKind, shapes: list) -> list[Dims]:
    """Q·Kᵀ reduces head_dim, P·V the keys."""
    q, k, v = shapes
    return [(_static(q[-2]), _static(q[-1]), _static(k[-2])),
            (_static(q[-2]), _static(k[-2]), _static(v[-1]))]


@dataclass(frozen=True)
class OpKind:
    """One kind of site. ``signatures``: per group of targets (functions for ``call_function``,
    names for ``call_method``), their argument names in order (``"self"`` is read as ``"input"``).
    ``operands``: the bound arguments that are the site's operands. ``roles``: theirs, fixed, or None
    for "``weight`` where the operand is a parameter, else ``input``". ``products``: the role pairs
    of the products it computes (None: one product of its operands). ``replacement``: the quantized
    function, called with ``arguments`` (bound names) and one :data:`~qpass.execution.ProductConfig`
    per product, positionally or, with ``config_keywords``, by keyword."""

    name: str
    family: str  # "matmul", "experts" (a mixture of experts' GEMMs), "attention" or "embedding"
    signatures: tuple[tuple[tuple, tuple[str, ...]], ...]
    operands: tuple[str, ...]
    roles: tuple[str, ...] | None = None
    products: tuple[tuple[str, str], ...] | None = None
    product_names: tuple[str, ...] = ("",)  # prefixes of state and report keys: ("qk", "pv") for sdpa
    defaults: dict = field(default_factory=dict)
    replacement: Callable | None = None
    arguments: tuple[str, ...] = ()
    config_keywords: tuple[str, ...] = ()
    by_pattern: bool = False  # found by a graph pattern (hand-written attention), not by its targets
    weight_k_axis: int = -2  # a weight operand's K axis: -1 for a linear's [N, K], -2 for B [K, N]
    # An input times a 2-D weight shared by every row: where channel splitting and clamping apply.
    input_times_weight: bool = False
    bind_arguments: Callable[[fx.Node], dict] | None = None  # for signatures no name list describes
    # K from the bound arguments and the first operand's shape; (M, K, N) per product from the operands'
    # shapes (None: not static); why a site cannot be quantized, beyond a vector operand.
    reduction_of: Callable[[dict, torch.Size], int] = _last_axis
    dims_of: Callable[[OpKind, list], list[Dims]] | None = _product_dims
    unsupported_of: Callable[[dict], str | None] | None = None
    # Beyond its targets, what the node must look like (the experts' kinds share targets with others).
    accepts: Callable[[fx.Node], bool] | None = None

    def matches(self, node: fx.Node) -> bool:
        return (not self.by_pattern and self.signature(node) is not None
                and (self.accepts is None or self.accepts(node)))

    def signature(self, node: fx.Node) -> tuple[str, ...] | None:
        if node.op not in ("call_function", "call_method"):
            return None
        for targets, names in self.signatures:
            if is_op(node, targets):
                return names
        return None

    def bind(self, node: fx.Node) -> dict:
        """The node's arguments by name (positional, then keyword, then defaults)."""
        if self.bind_arguments is not None:
            return self.bind_arguments(node)
        values = dict(self.defaults)
        values.update(zip(self.signature(node), node.args))
        values.update({("input" if k == "self" else k): v for k, v in node.kwargs.items()})
        return values

    def operand_nodes(self, node: fx.Node) -> tuple:
        """The operands as the node takes them now (earlier rewrites may have replaced some)."""
        bound = self.bind(node)
        return tuple(bound.get(name) for name in self.operands)

    def product_roles(self, roles: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
        return self.products if self.products is not None else (roles,)

    def replacement_call(self, node: fx.Node, configs: list) -> tuple[Callable, tuple, dict]:
        """The call of the quantized form, with the node's current arguments."""
        bound = self.bind(node)
        args = tuple(bound[name] for name in self.arguments)
        if self.config_keywords:
            return self.replacement, args, dict(zip(self.config_keywords, configs))
        return self.replacement, (*args, *configs), {}

    def reduction(self, node: fx.Node) -> int | None:
        """K (head_dim for attention) when static; None when symbolic or unknown."""
        value = meta_value(self.operand_nodes(node)[0])
        if value is None or value.ndim == 0:
            return None
        return _static(self.reduction_of(self.bind(node), value.shape))  # a symbolic K is decided at run time

    def unsupported(self, node: fx.Node) -> str | None:
        """Why this site cannot be quantized (None when it can)."""
        why = self.unsupported_of(self.bind(node)) if self.unsupported_of is not None else None
        vector = any((v := meta_value(o)) is not None and v.ndim < 2 for o in self.operand_nodes(node))
        if why is None and self.family != "embedding" and vector:
            why = "a vector operand (matrix-vector product)"
        return why

    def dims(self, operands: tuple, reduction: int | None) -> list[Dims]:
        """(M, K, N) of each product, from the graph's example values."""
        shapes = [None if (v := meta_value(o)) is None else v.shape for o in operands]
        if any(shape is None for shape in shapes) or self.dims_of is None:
            return [(None, reduction, None)] * len(self.products or ((),))
        return self.dims_of(self, shapes)


@dataclass(frozen=True)
class OpName:
    """A custom op by its qualified name, for ops of libraries that may not be imported
    (``transformers::grouped_mm_fallback``)."""

    qualified: str

    def names(self, target) -> bool:
        if isinstance(target, torch._ops.OpOverloadPacket):
            return target._qualified_op_name == self.qualified
        return isinstance(target, torch._ops.OpOverload) and target.name().split(".")[0] == self.qualified


def is_op(node: fx.Node, targets: tuple) -> bool:
    if node.op == "call_function":
        return any(t.names(node.target) if isinstance(t, OpName) else node.target is t
                   for t in targets if not isinstance(t, str))
    return node.op == "call_method" and node.target in targets


def _bind_einsum(node: fx.Node) -> dict:
    """``einsum(equation, a, b)`` or ``einsum(equation, [a, b])`` (ATen's form)."""
    equation, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    a, b = operands if len(operands) == 2 else (None, None)
    return {"equation": equation, "a": a, "b": b, "num_operands": len(operands)}


# ---- a mixture of experts' GEMMs: each expert's weight is a matrix of a 3-D tensor [experts, ., .] ----

_GATHERS = (operator.getitem, aten.index.Tensor)


def _integer(value: torch.Tensor | None, ndim: int) -> bool:
    return (value is not None and value.ndim == ndim and not value.is_floating_point()
            and value.dtype != torch.bool)


def gathered_experts(node) -> tuple[fx.Node, fx.Node] | None:
    """``(experts, ids)`` of ``experts[ids]``: one matrix of a 3-D tensor per token, by integer ids."""
    if not (isinstance(node, fx.Node) and is_op(node, _GATHERS)) or len(node.args) != 2:
        return None
    base, index = node.args
    index = index[0] if isinstance(index, (list, tuple)) and len(index) == 1 else index
    base_value = meta_value(base)
    if base_value is None or base_value.ndim != 3 or not _integer(meta_value(index), 1):
        return None
    return base, index


def expert_slice(node) -> fx.Node | None:
    """The 3-D tensor of ``experts[e]`` (``e`` an int or a 0-d integer tensor): one expert's matrix."""
    if not isinstance(node, fx.Node):
        return None
    if is_op(node, (operator.getitem,)) and len(node.args) == 2:
        base, index = node.args
    elif is_op(node, (aten.select.int,)) and node.args[1] == 0:
        base, index = node.args[0], node.args[2]
    else:
        return None
    base_value = meta_value(base)
    if base_value is None or base_value.ndim != 3:
        return None
    return base if isinstance(index, int) or _integer(meta_value(index), 0) else None


def _bmm_operands(node: fx.Node) -> tuple:
    bound = dict(zip(_BMM[1], node.args)) | node.kwargs
    return bound.get("input"), bound.get("mat2")


def _bind_token_bmm(node: fx.Node) -> dict:
    """``bmm(experts[ids], tokens[..., None])`` (weights ``[E, N, K]``: layout "nk") or
    ``bmm(tokens[:, None], experts[ids])`` (``[E, K, N]``: "kn"): each token times its expert's weight."""
    a, b = _bmm_operands(node)
    gathered = gathered_experts(a)
    layout, tokens = ("nk", b) if gathered is not None else ("kn", a)
    experts, ids = gathered if gathered is not None else gathered_experts(b)
    return {"input": tokens, "weight": experts, "index": ids, "layout": layout}


def _is_token_bmm(node: fx.Node) -> bool:
    a, b = _bmm_operands(node)
    return (gathered_experts(a) is None) != (gathered_experts(b) is None)


def _token_reduction(bound: dict, tokens: torch.Size) -> int:
    """K of a per-token bmm: tokens come as ``[S, K, 1]`` ("nk") or ``[S, 1, K]`` ("kn")."""
    return tokens[-2] if bound["layout"] == "nk" else tokens[-1]


def _token_bmm_dims(kind: OpKind, shapes: list) -> list[Dims]:
    tokens, experts = shapes
    nk = tokens[-1] == 1 and tokens[-2] != 1
    return [(None, _static(experts[-1] if nk else experts[-2]), _static(experts[-2] if nk else experts[-1]))]


def _grouped_unsupported(bound: dict) -> str | None:
    a, b = meta_value(bound["input"]), meta_value(bound["mat2"])
    if bound["offs"] is None or a is None or b is None or a.ndim != 2 or b.ndim != 3:
        return "a grouped GEMM of another layout than tokens [S, K] · experts [E, K, N] with offsets"
    if bound["bias"] is not None or bound["out_dtype"] is not None:
        return "a grouped GEMM with a bias or an output dtype"
    return None


def _second_operand_is_expert(node: fx.Node, names: tuple[str, ...]) -> bool:
    bound = dict(zip(names, node.args)) | node.kwargs
    return expert_slice(bound.get(names[1])) is not None


_MATMUL = ((operator.matmul, torch.matmul, aten.matmul.default, "matmul", "__matmul__"), ("input", "other"))
_BMM = ((torch.bmm, aten.bmm.default, "bmm"), ("input", "mat2"))
_SCALED = {"beta": 1, "alpha": 1}
_PAIR = (_MATMUL, (_BMM[0], ("input", "other")))  # the matmul or bmm of hand-written attention

_LINEAR = ((F.linear, aten.linear.default), ("input", "weight", "bias"))
_GROUPED = ((torch._grouped_mm, aten._grouped_mm.default, OpName("transformers::grouped_mm_fallback")),
            ("input", "mat2", "offs", "bias", "out_dtype"))
_EXPERT_KINDS = (
    # Tokens sorted by expert, ``offs`` the end of each expert's rows (transformers' "grouped_mm").
    OpKind(
        "grouped_mm", "experts", (_GROUPED,), operands=("input", "mat2"),
        defaults={"offs": None, "bias": None, "out_dtype": None}, replacement=quantized.grouped_mm,
        arguments=("input", "mat2", "offs"), dims_of=_expert_dims, unsupported_of=_grouped_unsupported,
    ),
    # Each token times the weight its expert id gathers (transformers' "batched_mm").
    OpKind(
        "token_bmm", "experts", (_BMM,), operands=("input", "weight"), replacement=quantized.token_bmm,
        arguments=("input", "weight", "index", "layout"), bind_arguments=_bind_token_bmm,
        accepts=_is_token_bmm, reduction_of=_token_reduction, dims_of=_token_bmm_dims,
    ),
    # A batched matmul over an experts axis, ``[E, C, K] · [E, K, N]``, of a 3-D parameter
    # (capacity-based dispatch): a bmm or matmul whose B is a parameter (sites._mark_experts).
    OpKind(
        "expert_bmm", "experts", _PAIR, operands=("input", "other"), replacement=quantized.expert_bmm,
        arguments=("input", "other"), by_pattern=True, dims_of=_expert_dims,
    ),
    # One expert's tokens times its matrix of the 3-D weight (a loop over experts: "eager"), as a
    # linear (weights [E, N, K]) or a matmul (GPT-OSS's [E, K, N]).
    OpKind(
        "expert_linear", "experts", (_LINEAR,), operands=("input", "weight"), defaults={"bias": None},
        replacement=quantized.linear, arguments=("input", "weight", "bias"), weight_k_axis=-1,
        dims_of=_expert_dims, accepts=lambda node: _second_operand_is_expert(node, _LINEAR[1]),
    ),
    OpKind(
        "expert_matmul", "experts", (_MATMUL,), operands=("input", "other"), replacement=quantized.product,
        arguments=("input", "other"), dims_of=_expert_dims,
        accepts=lambda node: _second_operand_is_expert(node, _MATMUL[1]),
    ),
)

KINDS: dict[str, OpKind] = {
    kind.name: kind
    for kind in (
        *_EXPERT_KINDS,  # first: they are bmms and linears of a particular form
        OpKind(
            "linear", "matmul", (_LINEAR,),
            operands=("input", "weight"), roles=("input", "weight"), defaults={"bias": None},
            replacement=quantized.linear, arguments=("input", "weight", "bias"), weight_k_axis=-1,
            input_times_weight=True,
        ),
        OpKind(
            "matmul", "matmul", (_MATMUL,), operands=("input", "other"),
            replacement=quantized.product, arguments=("input", "other"), input_times_weight=True,
        ),
        OpKind(
            "mm", "matmul", (((torch.mm, aten.mm.default, "mm"), ("input", "mat2")),),
            operands=("input", "mat2"), replacement=quantized.product, arguments=("input", "mat2"),
            input_times_weight=True,
        ),
        OpKind(
            "bmm", "matmul", (_BMM,), operands=("input", "mat2"), replacement=quantized.product,
            arguments=("input", "mat2"),
        ),
        OpKind(
            "addmm", "matmul",
            (((torch.addmm, aten.addmm.default, "addmm"), ("input", "mat1", "mat2", "beta", "alpha")),),
            operands=("mat1", "mat2"), defaults=_SCALED, replacement=quantized.addmm,
            arguments=("input", "mat1", "mat2", "beta", "alpha"), input_times_weight=True,
        ),
        OpKind(
            "baddbmm", "matmul",
            (((torch.baddbmm, aten.baddbmm.default, "baddbmm"),
              ("input", "batch1", "batch2", "beta", "alpha")),),
            operands=("batch1", "batch2"), defaults=_SCALED, replacement=quantized.addmm,
            arguments=("input", "batch1", "batch2", "beta", "alpha"),
        ),
        OpKind(
            "einsum", "matmul", (((torch.einsum, aten.einsum.default), ()),), operands=("a", "b"),
            replacement=quantized.einsum, arguments=("equation", "a", "b"), bind_arguments=_bind_einsum,
            reduction_of=_contracted, dims_of=None, unsupported_of=_einsum_unsupported,
        ),
        OpKind(
            "sdpa", "attention",
            (((F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default), SDPA_PARAMETERS),),
            operands=("query", "key", "value"), roles=("q", "k", "v"), products=(("q", "k"), ("p", "v")),
            product_names=("qk", "pv"),
            defaults={"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                      "enable_gqa": False},
            replacement=quantized.scaled_dot_product_attention, arguments=SDPA_PARAMETERS,
            config_keywords=("qk", "pv"), dims_of=_attention_dims,
        ),
        # Hand-written softmax(Q·Kᵀ)·V: matmuls of two activations around a softmax (sites._mark_attention).
        OpKind(
            "attention_qk", "attention", _PAIR, operands=("input", "other"), roles=("q", "k"),
            replacement=quantized.product, arguments=("input", "other"), by_pattern=True,
        ),
        OpKind(
            "attention_pv", "attention", _PAIR, operands=("input", "other"), roles=("p", "v"),
            replacement=quantized.product, arguments=("input", "other"), by_pattern=True,
        ),
        OpKind(
            "embedding", "embedding",
            (((F.embedding,), ("input", "weight")),
             ((torch.embedding, aten.embedding.default), ("weight", "input"))),
            operands=("weight",),
        ),
    )
}


def op_kind(node: fx.Node) -> OpKind | None:
    """The kind whose targets compute ``node`` (None: not a site)."""
    return next((kind for kind in KINDS.values() if kind.matches(node)), None)
