"""Lowering: the quantized graph's reference nodes onto qpass's generated Triton kernels.

Runs after :func:`~qpass.passes.quantize.insert_quantizers`. Two rewrites, decided per site by
:func:`lowering` (analysis) and done by :func:`lower_to_kernels` (rewriting):

- **packed**: a linear site of an inference recipe whose weight is a frozen parameter (the graph
  was captured without gradients, or the weight does not require them) gets its weight quantized
  once, now, and stored packed (kept by the graph module, found by the op by key); the site becomes
  one ``qpass::packed_linear``, the dequant-matmul kernel that also quantizes the input on the fly.
- **kernels**: every other quantized site keeps its structure, with its QDQ nodes (rotation fused)
  and the operand quantization inside ``qpass::quantized_matmul`` done by the generated kernels
  (the ``kernels`` flag of its :class:`~qpass.ops.MatmulQuantizers`).

A packed weight is a snapshot: changing the parameter afterwards needs a new ``qpass.compile``.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import fx

from qpass import quantized
from qpass.formats import quantize
from qpass.ops import MatmulQuantizers, register_packed_weight
from qpass.passes.plan import SitePlan

PACKED, KERNELS = "packed", "kernels"


def _config_slots(node: fx.Node) -> list[int | str]:
    """Where a rewritten site's MatmulQuantizers JSON sits: sdpa's keywords, else the last argument."""
    return ["qk", "pv"] if node.target is quantized.scaled_dot_product_attention else [len(node.args) - 1]


def _configs(node: fx.Node) -> list[MatmulQuantizers]:
    return [MatmulQuantizers.from_json(node.kwargs[s] if isinstance(s, str) else node.args[s]) for s in _config_slots(node)]


def _packed_weight(plan: SitePlan, parameters: dict[fx.Node, torch.Tensor], frozen: bool) -> torch.Tensor | None:
    """The weight to pack, if the site qualifies: an inference linear site with a frozen 2-D parameter
    weight, no delayed scaling, and quantizers the kernels run."""
    from qpass.codegen.spec import unsupported

    node = plan.site.node
    if node.target is not quantized.linear or not isinstance(node.args[1], fx.Node):
        return None
    weight = parameters.get(node.args[1])
    (q,) = _configs(node)
    if weight is None or weight.ndim != 2 or q.quantizes_backward or q.b is None or q.a_state or q.b_state:
        return None
    if weight.requires_grad and not frozen:  # a weight that trains cannot be a snapshot
        return None
    operands = [q.b] + ([q.a] if q.a is not None else [])
    if any(unsupported(quantizer, q.rotation, weight.dtype) for quantizer in operands):
        return None
    return weight


def _weights_to_pack(plans: list[SitePlan], parameters: dict[fx.Node, torch.Tensor], frozen: bool) -> dict[str, torch.Tensor | None]:
    """Every quantized site's weight to pack, or None where the site keeps its structure."""
    return {plan.name: _packed_weight(plan, parameters, frozen) for plan in plans if plan.excluded is None}


def lowering(plans: list[SitePlan], parameters: dict[fx.Node, torch.Tensor], frozen: bool) -> dict[str, str]:
    """Analysis: site name -> ``"packed"`` or ``"kernels"`` for every quantized site."""
    return {name: KERNELS if weight is None else PACKED for name, weight in _weights_to_pack(plans, parameters, frozen).items()}


def _pack(gm: fx.GraphModule, plan: SitePlan, weight: torch.Tensor) -> None:
    node = plan.site.node
    x, _, bias, _ = node.args
    (q,) = _configs(node)
    with torch.no_grad():
        w = weight.detach()
        if q.rotation is not None:
            w = q.rotation(w.float(), -1).to(weight.dtype)
        qt = quantize(w, q.b.spec, axis=-1, rounding=q.b.rounding)
    # The graph module keeps the packed weight alive; the op finds it by key.
    gm._qpass_packed_weights = [*getattr(gm, "_qpass_packed_weights", []), qt]
    rotation = q.rotation.to_json() if q.rotation else ""
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(
            torch.ops.qpass.packed_linear.default,
            (x, bias, register_packed_weight(qt), qt.shape[0], q.a.to_json() if q.a else "", rotation),
        )
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    plan.site.node = new
    plan.notes.append(f"kernels: {q.b} weight packed ({qt.bits_per_element():.2f} bits/element), Triton dequant-matmul")


def _use_kernels(plan: SitePlan) -> None:
    node = plan.site.node
    for slot in _config_slots(node):
        value = node.kwargs[slot] if isinstance(slot, str) else node.args[slot]
        lowered = replace(MatmulQuantizers.from_json(value), kernels=True).to_json()
        if isinstance(slot, str):
            node.kwargs = {**node.kwargs, slot: lowered}
        else:
            node.args = (*node.args[:slot], lowered, *node.args[slot + 1:])
    plan.notes.append("kernels: Triton quantize kernels")


def lower_to_kernels(
    gm: fx.GraphModule, plans: list[SitePlan], parameters: dict[fx.Node, torch.Tensor], frozen: bool
) -> fx.GraphModule:
    """Rewrite every quantized site of ``plans`` onto the generated kernels (see the module doc);
    ``frozen``: the graph runs without gradients, so inference weights can be packed."""
    weights = _weights_to_pack(plans, parameters, frozen)
    for plan in plans:
        if weights.get(plan.name) is not None:
            _pack(gm, plan, weights[plan.name])
        elif plan.name in weights:
            _use_kernels(plan)
    gm.graph.lint()
    gm.recompile()
    return gm
