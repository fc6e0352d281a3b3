"""Residual-stream rotation (QuaRot, arXiv 2404.00456) for pre-norm transformers with RMSNorm.

A Llama-style model keeps a residual stream ``h``: embeddings start it, each block reads it through
an RMSNorm into linears (q/k/v, gate/up, finally lm_head) and adds linear outputs back (o_proj,
down_proj). Rotating the whole stream by one orthogonal ``Q`` changes no output:

- RMSNorm without its weight commutes with ``Q`` (it divides by ``‖h‖``, which ``Q`` keeps), so
  each norm's weight ``γ`` is folded into the linears it feeds, ``W ← W·diag(γ)``;
- the stream's writers produce ``y·Q``: embedding tables ``E ← E·Q``, writer weights ``W ← Qᵀ·W``
  (and biases ``b ← b·Q``);
- its readers take ``h·Q``: their weights ``W ← W·diag(γ)·Q``.

The weights are rewritten in the graph as functions of the parameters (so training, and weights
loaded later, stay consistent). Linears that write the stream from an MLP (down_proj) also get an
online full-size Hadamard on their input, as in QuaRot. The pattern is found in the graph, never
from module names: :func:`find_stream` says why a graph does not match, and then nothing changes.

Planning and rewriting are apart: :func:`plan_residual` finds the stream and decides (the rotation
that fits its width, the writers' online rotations, each site's note); :func:`rotate_residual_stream`
rewrites the graph as decided.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import fx

from qpass.passes.kinds import is_op, meta_value
from qpass.passes.plan import SitePlan, split_width
from qpass.passes.sites import Site
from qpass.rotation import BLOCK_SIZES, Rotation, resolve

aten = torch.ops.aten

ADD = (operator.add, torch.add, aten.add.Tensor, "add")
MUL = (operator.mul, torch.mul, aten.mul.Tensor, "mul")
POW = (operator.pow, torch.pow, aten.pow.Tensor_Scalar, "pow")
MEAN = (torch.mean, aten.mean.dim, "mean")
RSQRT = (torch.rsqrt, aten.rsqrt.default, "rsqrt")
RMS_NORM = (F.rms_norm, torch.rms_norm, aten.rms_norm.default)
DROPOUT = (F.dropout, torch.dropout, aten.dropout.default, "dropout")
# Ops that commute with a rotation of the last axis (casts, copies).
PASS_THROUGH = (
    # torch.export's
    aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.clone.default, aten.alias.default,
    "to", "float", "type", "type_as", "contiguous", "clone",
)


@dataclass
class Norm:
    """One RMSNorm on the stream: ``weight_node`` multiplies the normalized value by ``weight``."""

    output: fx.Node  # what the readers consume
    weight: fx.Node | None  # the γ parameter (None: no weight)
    weight_mul: fx.Node | None  # the ``γ · x`` node of a hand-written norm
    fused: fx.Node | None = None  # an ``F.rms_norm`` node


@dataclass
class Stream:
    embeddings: list[Site] = field(default_factory=list)
    writers: list[Site] = field(default_factory=list)
    norms: list[Norm] = field(default_factory=list)
    readers: list[tuple[Site, Norm]] = field(default_factory=list)
    mlp_writers: list[Site] = field(default_factory=list)  # writers whose input is not attention
    width: int = 0


@dataclass(frozen=True)
class ResidualRotation:
    """What :func:`plan_residual` decided: the stream, and the rotation that fits its width."""

    stream: Stream
    rotation: Rotation


def _keeps_last_axis(node) -> bool:
    """Indexing that leaves the last axis whole (``h[:, -1:, :]``, HF's ``logits_to_keep``)."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem):
        return False
    value, index = meta_value(node.args[0]), node.args[1]
    index = index if isinstance(index, tuple) else (index,)
    if value is None or any(i is Ellipsis or i is None or isinstance(i, fx.Node) for i in index):
        return False
    return len(index) < value.ndim or index[-1] == slice(None)


def _commutes(node) -> bool:
    """``node`` passes its first argument on in a way that commutes with rotating the last axis."""
    return isinstance(node, fx.Node) and (
        is_op(node, PASS_THROUGH) or _is_inactive_dropout(node) or _keeps_last_axis(node))


def _source(node):
    """Back from ``node`` through ops that commute with the rotation, to what they pass on."""
    while _commutes(node):
        node = node.args[0]
    return node


def _is_inactive_dropout(node) -> bool:
    """Dropout that is the identity (eval mode, or p = 0): it commutes with any rotation."""
    if not isinstance(node, fx.Node) or not is_op(node, DROPOUT):
        return False
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
    return p == 0 or training is False


def _match_norm(x: fx.Node, parameters) -> Norm | None:
    """The RMSNorm that starts at stream node ``x``: ``x · rsqrt(mean(x², -1) + eps)`` (times γ), or
    ``F.rms_norm(x, (d,), γ)``."""
    for user in x.users:
        if is_op(user, RMS_NORM) and user.args[0] is x:
            weight = user.args[2] if len(user.args) > 2 else user.kwargs.get("weight")
            return Norm(user, weight, None, fused=user)
        if not (is_op(user, POW) and user.args[1] == 2):
            continue
        mean = next(iter(user.users), None)
        add = next(iter(mean.users), None) if mean is not None and is_op(mean, MEAN) else None
        rsqrt = next(iter(add.users), None) if add is not None and is_op(add, ADD) else None
        if rsqrt is None or not is_op(rsqrt, RSQRT):
            continue
        normalized = next((n for n in rsqrt.users if is_op(n, MUL) and x in n.args), None)
        if normalized is None:
            continue
        out = normalized
        while len(out.users) == 1 and is_op(next(iter(out.users)), PASS_THROUGH):
            out = next(iter(out.users))
        scale = next(iter(out.users)) if len(out.users) == 1 else None
        if scale is not None and is_op(scale, MUL):
            weight = next((a for a in scale.args if a is not out), None)
            if weight in parameters:
                return Norm(scale, weight, scale)
        return Norm(out, None, None)
    return None


def _norm_nodes(norm: Norm, x: fx.Node) -> set[fx.Node]:
    """The norm's own users of ``x`` (the square and the normalizing product)."""
    if norm.fused is not None:
        return {norm.fused}
    return {u for u in x.users if is_op(u, POW) or (is_op(u, MUL) and any(is_op(a, RSQRT) for a in u.args))}


def find_stream(plans: list[SitePlan], parameters) -> tuple[Stream | None, str | None]:
    """The graph's residual stream, or why there is none that can be rotated."""
    by_node = {plan.site.node: plan.site for plan in plans}
    # Linears with a parameter weight [N, K]: what a rotation folds into.
    linears = {n: s for n, s in by_node.items()
               if s.op.family == "matmul" and s.op.weight_k_axis == -1 and s.weights[1] is not None}
    stream = Stream(
        embeddings=[s for s in by_node.values() if s.op.family == "embedding" and s.weights[0] is not None])
    if not stream.embeddings:
        return None, "no embedding in this graph starts a residual stream"
    frontier = [s.node for s in stream.embeddings]
    members: set[fx.Node] = set(frontier)
    while frontier:
        node = frontier.pop()
        norm = _match_norm(node, parameters)
        handled = set()
        if norm is not None:
            stream.norms.append(norm)
            handled = _norm_nodes(norm, node)
        for user in node.users:
            if user in handled or user in members:
                continue
            if _commutes(user) or (is_op(user, MUL) and _scalar_other(user, node)):
                pass
            elif is_op(user, ADD):
                other = next((a for a in user.args if a is not node), node)
                writer = linears.get(_source(other)) if isinstance(other, fx.Node) else None
                if writer is not None:
                    if not _only_feeds(writer.node, user):
                        return None, f"the output of {writer.name} is used outside the residual stream"
                    stream.writers.append(writer)
                elif other not in members and _source(other) not in members:
                    return None, f"the residual stream is added to {other} (not a linear's output)"
            else:
                return None, (f"the residual stream feeds {user.format_node()} "
                              "(only adds, RMSNorms and casts rotate)")
            members.add(user)
            frontier.append(user)
    for norm in stream.norms:
        readers = _readers(norm.output, linears)
        if readers is None:
            return None, f"the RMSNorm output {norm.output} feeds something other than linear layers' inputs"
        stream.readers += [(reader, norm) for reader in readers]
    if not stream.readers or not stream.writers:
        return None, "no RMSNorm → linear readers or linear writers on the residual stream"
    widths = {meta_value(s.node).shape[-1] for s in stream.embeddings}
    if len(widths) != 1:
        return None, f"embeddings of different widths {sorted(widths)} start the stream"
    stream.width = widths.pop()
    stream.mlp_writers = [w for w in stream.writers if not _fed_by_attention(w.operands[0], by_node)]
    return stream, None


def _only_feeds(node: fx.Node, target: fx.Node) -> bool:
    """Every use of ``node`` reaches ``target`` through pass-through ops only."""
    return all(user is target or (_commutes(user) and _only_feeds(user, target)) for user in node.users)


def _scalar_other(node: fx.Node, x: fx.Node) -> bool:
    return all(a is x or isinstance(a, (int, float)) for a in node.args)


def _readers(output: fx.Node, linears: dict) -> list[Site] | None:
    readers = []
    for user in output.users:
        if _commutes(user):
            inner = _readers(user, linears)
            if inner is None:
                return None
            readers += inner
        elif user in linears and linears[user].op.operand_nodes(user)[0] is output:
            readers.append(linears[user])
        else:
            return None
    return readers


def _fed_by_attention(node, by_node: dict, depth: int = 8) -> bool:
    """The linear's input comes, through reshapes and casts, from an attention site."""
    for _ in range(depth):
        if not isinstance(node, fx.Node):
            return False
        site = by_node.get(node)
        if site is not None:
            return site.op.family == "attention"
        if node.op != "call_function" and node.op != "call_method" or not node.args:
            return False
        node = node.args[0]
    return False


# ---- rewriting ---------------------------------------------------------------------------------


def _rotate(graph: fx.Graph, x, rotation: Rotation, axis: int) -> fx.Node:
    return graph.call_function(torch.ops.qpass.rotate, (x, rotation.to_json(), axis, False))


def plan_residual(
    plans: list[SitePlan], rotation: Rotation, parameters
) -> tuple[list[SitePlan], ResidualRotation | None, str]:
    """Decide the rotation of the graph's residual stream by ``rotation`` (full size, falling back to
    a block that divides the width): the plans with the stream's notes and the MLP writers' online
    rotations, what to rewrite (None: nothing), and a note on the graph as a whole."""
    stream, why = find_stream(plans, parameters)
    if stream is None:
        return plans, None, f"residual-stream rotation not applied: {why}"
    rotation, fallback = resolve(rotation, stream.width)
    if stream.width % (rotation.block or stream.width):
        # Padding would change RMSNorm's mean over the width: only an exact rotation will do.
        return plans, None, (f"residual-stream rotation not applied: no Hadamard rotation fits the "
                             f"stream width {stream.width} (blocks {BLOCK_SIZES} do not divide it)")
    notes: dict[Site, list[str]] = {}
    for site in stream.embeddings:
        notes.setdefault(site, []).append(f"residual: table rotated ({rotation})")
    for site in stream.writers:
        notes.setdefault(site, []).append("residual: writes the rotated stream")
    for site, norm in stream.readers:
        folded = ", norm weight folded in" if norm.weight is not None else ""
        notes.setdefault(site, []).append("residual: reads the rotated stream" + folded)
    mlp_writers = set(stream.mlp_writers)
    rotated = set(stream.writers) | {site for site, _ in stream.readers}
    planned = []
    for plan in plans:
        plan = replace(plan, rotated_weight=plan.site in rotated).noted(*notes.get(plan.site, []))
        planned.append(_online_rotation(plan) if plan.site in mlp_writers else plan)
    note = (f"residual stream of width {stream.width} rotated by {rotation}"
            f"{f' ({fallback})' if fallback else ''}: "
            f"{len(stream.norms)} RMSNorms folded, {len(stream.readers)} readers, "
            f"{len(stream.writers)} writers")
    return planned, ResidualRotation(stream, rotation), note


def rotate_residual_stream(gm: fx.GraphModule, residual: ResidualRotation) -> fx.GraphModule:
    """Rewrite the graph's residual stream as :func:`plan_residual` decided."""
    stream, rotation = residual.stream, residual.rotation
    graph = gm.graph
    for site in stream.embeddings:
        node, (table,) = site.node, site.operands
        with graph.inserting_before(node):
            node.replace_input_with(table, _rotate(graph, table, rotation, -1))
    for site in stream.writers:
        node = site.node
        bound = site.op.bind(node)
        weight, bias = bound["weight"], bound["bias"]
        with graph.inserting_before(node):
            node.replace_input_with(weight, _rotate(graph, weight, rotation, 0))
            if isinstance(bias, fx.Node):
                node.replace_input_with(bias, _rotate(graph, bias, rotation, -1))
    for site, norm in stream.readers:
        node = site.node
        weight = site.op.bind(node)["weight"]
        with graph.inserting_before(node):
            folded = (weight if norm.weight is None
                      else graph.call_function(operator.mul, (weight, norm.weight)))
            node.replace_input_with(weight, _rotate(graph, folded, rotation, -1))
    for norm in stream.norms:  # γ now lives in the readers' weights
        if norm.weight_mul is not None:
            other = next(a for a in norm.weight_mul.args if a is not norm.weight)
            norm.weight_mul.replace_all_uses_with(other)
            graph.erase_node(norm.weight_mul)
        elif norm.fused is not None and norm.weight is not None:
            norm.fused.replace_input_with(norm.weight, None)
    graph.lint()
    gm.recompile()
    return gm


def _online_rotation(plan: SitePlan) -> SitePlan:
    """A full-size Hadamard on the forward GEMM of an MLP's output projection (QuaRot's online one)."""
    if plan.excluded is not None:
        return plan
    product = plan.products[0]
    q = product.quantizers
    if q.a is None and q.b is None:
        return plan
    k = split_width(plan.ocs, plan.site.reduction)
    rotation, fallback = resolve(Rotation(None), k)
    if fallback:
        warnings.warn(f"qpass: site {plan.name!r}: online rotation: {fallback}", stacklevel=2)
    plan = plan.with_products([replace(product, quantizers=replace(q, rotation=rotation))])
    return plan.noted(f"residual: online {rotation} on the input" + (f" ({fallback})" if fallback else ""))
