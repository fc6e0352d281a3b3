"""Rewriting: each planned site's node becomes a call to its quantized form (the op-kind table's replacement).

Rewriting only: the sites come from :mod:`qpass.passes.sites`, every decision from the plans
(:mod:`qpass.passes.plan`, the execution from :mod:`qpass.passes.lower`). The new node keeps the old
one's metadata (module stack, example value), so reports and exports still see where it came from.
Sites the lowering packed are :func:`qpass.passes.lower.pack_weights`'s to rewrite.
"""

from __future__ import annotations

from torch import fx

from qpass.passes.plan import SitePlan


def recompiled(gm: fx.GraphModule, changed: bool) -> fx.GraphModule:
    """``gm`` with its code regenerated where a pass changed its graph (an unchanged graph keeps
    its code: regenerating it is most of a pass's time)."""
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


def replace_node(graph: fx.Graph, node: fx.Node, target, args: tuple, kwargs: dict | None = None) -> fx.Node:
    """A call of ``target`` in ``node``'s place, with its metadata."""
    with graph.inserting_after(node):
        new = graph.call_function(target, args, kwargs or {})
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def insert_quantizers(gm: fx.GraphModule, plans: list[SitePlan]) -> fx.GraphModule:
    """Rewrite every site of ``plans`` that is quantized and not packed."""
    rewritten = [plan for plan in plans if plan.excluded is None and plan.lowering != "packed"]
    for plan in rewritten:
        node = plan.site.node
        target, args, kwargs = plan.site.op.replacement_call(node, [p.config for p in plan.products])
        replace_node(gm.graph, node, target, args, kwargs)
    return recompiled(gm, bool(rewritten))
