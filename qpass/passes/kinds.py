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
    function, called with ``arguments`` (bound names) and one :data:`~qpass.quantized.ProductConfig`
    per product, positionally or, with ``config_keywords``, by keyword."""

    name: str
    family: str  # "matmul", "attention" or "embedding"
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

    def matches(self, node: fx.Node) -> bool:
        return not self.by_pattern and self.signature(node) is not None

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


def is_op(node: fx.Node, targets: tuple) -> bool:
    if node.op == "call_function":
        return any(node.target is t for t in targets if not isinstance(t, str))
    return node.op == "call_method" and node.target in targets


def _bind_einsum(node: fx.Node) -> dict:
    """``einsum(equation, a, b)`` or ``einsum(equation, [a, b])`` (ATen's form)."""
    equation, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    a, b = operands if len(operands) == 2 else (None, None)
    return {"equation": equation, "a": a, "b": b, "num_operands": len(operands)}


_MATMUL = ((operator.matmul, torch.matmul, aten.matmul.default, "matmul", "__matmul__"), ("input", "other"))
_BMM = ((torch.bmm, aten.bmm.default, "bmm"), ("input", "mat2"))
_SCALED = {"beta": 1, "alpha": 1}
_PAIR = (_MATMUL, (_BMM[0], ("input", "other")))  # the matmul or bmm of hand-written attention

KINDS: dict[str, OpKind] = {
    kind.name: kind
    for kind in (
        OpKind(
            "linear", "matmul", (((F.linear, aten.linear.default), ("input", "weight", "bias")),),
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
