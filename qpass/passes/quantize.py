"""Rewriting: each planned site's node becomes a call to its quantized form in :mod:`qpass.quantized`.

Rewriting only: the sites come from :mod:`qpass.passes.sites`, the decisions from
:mod:`qpass.passes.plan`. The new node keeps the old one's metadata (module stack, example value),
so later passes and reports still see where it came from.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from torch import fx

from qpass import quantized
from qpass.ops import MatmulQuantizers
from qpass.passes.plan import ProductPlan, SitePlan
from qpass.passes.sites import matmul_operands
from qpass.quantizer import Quantizer

SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}

NewState = Callable[[str, str, Quantizer], str]  # (site name, operand, its quantizer) -> state key


def _bind(node: fx.Node, names: tuple[str, ...], defaults: dict) -> list:
    """The node's arguments in the order of ``names`` (positional, then keyword, then defaults)."""
    values = dict(defaults)
    values.update(zip(names, node.args))
    values.update({("input" if k == "self" else k): v for k, v in node.kwargs.items()})
    return [values[name] for name in names]


def _with_states(product: ProductPlan, site: str, prefix: str, new_state: NewState) -> MatmulQuantizers:
    """Delayed-scaling states for the operands that are quantized once per step."""
    q = product.quantizers
    a, b = product.roles
    inference = not q.quantizes_backward
    return replace(
        q,
        a_state=new_state(site, prefix + a, q.a) if q.a and (q.hoists_a or inference) else "",
        b_state=new_state(site, prefix + b, q.b) if q.b and (q.hoists_b or inference) else "",
        grad_state=new_state(site, prefix + "grad_output", q.da_grad) if q.shares_grad else "",
    )


def _replacement(plan: SitePlan, configs: list[str]) -> tuple[Callable, tuple, dict]:
    site, node = plan.site, plan.site.node
    operands, _ = matmul_operands(node, site.kind)  # the node's current arguments: earlier rewrites renamed some
    if site.kind == "linear":
        x, weight, bias = _bind(node, ("input", "weight", "bias"), {"bias": None})
        return quantized.linear, (x, weight, bias, configs[0]), {}
    if site.kind in ("addmm", "baddbmm"):
        bias, a, b, beta, alpha = _bind(node, ("input", "mat1", "mat2", "beta", "alpha"), {"beta": 1, "alpha": 1})
        return quantized.addmm, (bias, a, b, beta, alpha, configs[0]), {}
    if site.kind == "einsum":
        return quantized.einsum, (node.args[0], *operands, configs[0]), {}
    if site.kind == "sdpa":
        arguments = _bind(node, SDPA_PARAMETERS, SDPA_DEFAULTS)
        return quantized.scaled_dot_product_attention, tuple(arguments), {"qk": configs[0], "pv": configs[1]}
    return quantized.product, (*operands, configs[0]), {}  # matmul, mm, bmm, attention_qk/pv


def insert_quantizers(gm: fx.GraphModule, plans: list[SitePlan], new_state: NewState | None = None) -> fx.GraphModule:
    """Rewrite every site of ``plans`` that is not excluded; ``new_state`` enables delayed scaling."""
    graph = gm.graph
    for plan in plans:
        if plan.excluded is not None:
            continue
        prefixes = ("qk.", "pv.") if plan.site.kind == "sdpa" else ("",)
        configs = [
            (p.quantizers if new_state is None else _with_states(p, plan.name, prefix, new_state)).to_json()
            for p, prefix in zip(plan.products, prefixes)
        ]
        target, args, kwargs = _replacement(plan, configs)
        node = plan.site.node
        with graph.inserting_after(node):
            new = graph.call_function(target, args, kwargs)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        plan.site.node = new
    graph.lint()
    gm.recompile()
    return gm
