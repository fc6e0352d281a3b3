"""Calibration's observers: each planned linear site reports its input to ``observe(plan, x)``.

The graph is transformed (residual rotation) but not quantized, and runs as Python: the observers
are plain functions, not ops. What is kept of an input is the caller's choice (``qpass.calibrate``:
per-channel maxima for outlier channel splitting, ``XᵀX`` for GPTQ); the input is the one the site's
quantized form receives, before the rotation that the form itself applies.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, fx

from qpass.passes.plan import SitePlan
from qpass.passes.quantize import recompiled

Observer = Callable[[SitePlan, Tensor], None]


def observed(plans: list[SitePlan]) -> list[SitePlan]:
    """The plans whose input calibration sees: quantized sites of a matmul with a weight."""
    return [plan for plan in plans
            if plan.excluded is None and plan.site.op.family == "matmul" and "weight" in plan.site.roles]


def insert_observers(gm: fx.GraphModule, plans: list[SitePlan], observe: Observer) -> fx.GraphModule:
    """Report the input of every observed site to ``observe(plan, x)``."""
    for plan in observed(plans):
        node = plan.site.node
        x, _ = plan.site.op.operand_nodes(node)
        with gm.graph.inserting_before(node):
            seen = gm.graph.call_function(_observer(plan, observe), (x,))
        node.replace_input_with(x, seen)
    return recompiled(gm, bool(observed(plans)))


def _observer(plan: SitePlan, observe: Observer) -> Callable[[Tensor], Tensor]:
    def observe_input(x: Tensor) -> Tensor:
        observe(plan, x)
        return x

    return observe_input
