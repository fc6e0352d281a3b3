"""Outlier clamping and compensation (FP4 training, arXiv 2501.17116): keep a few outliers out of FP4.

A per-token FP4 scale is set by the token's largest magnitude, so one outlier coarsens the grid for
the whole row. At each planned site ``Y = X · W`` (an input times a 2-D weight) the input is split
by :func:`qpass.ops.clamping.clamp_outliers` into a part clamped at the row's α-quantiles, which the
site quantizes as before, and the sparse rest (about ``2 · (1 − α)`` of the entries), multiplied by
the unquantized weight in high precision and added back:

    Y = site(clamp(X), W) + (X − clamp(X)) · W

The clamped part plus the residual is exactly X, so only quantization error remains. Gradients
follow the same split: the clamped entries through the site's quantized backward, the outliers
through the high-precision product (which also gives the weight its share).
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor, fx

from qpass.ops.clamping import clamp_outliers
from qpass.passes.plan import SitePlan
from qpass.passes.quantize import recompiled


def compensate(y: Tensor, residual: Tensor, weight: Tensor, weight_axis: int) -> Tensor:
    """``y`` plus the residual times the weight in high precision (``weight_axis``: its K axis)."""
    return y + torch.ops.qpass.residual_matmul(residual, weight.mT if weight_axis == -1 else weight)


def clamp_inputs(gm: fx.GraphModule, plans: list[SitePlan]) -> fx.GraphModule:
    """Clamp the input of every site planned with ``occ`` and add its compensation after it."""
    graph = gm.graph
    clamped = [plan for plan in plans if plan.excluded is None and plan.occ is not None]
    for plan in clamped:
        node = plan.site.node
        x, weight = plan.site.op.operand_nodes(node)  # after OCS: the split operands
        with graph.inserting_before(node):
            split = graph.call_function(clamp_outliers, (x, plan.occ))
            clamped = graph.call_function(operator.getitem, (split, 0))
            residual = graph.call_function(operator.getitem, (split, 1))
        node.replace_input_with(x, clamped)
        with graph.inserting_after(node):
            out = graph.call_function(compensate, (node, residual, weight, plan.site.op.weight_k_axis))
        node.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)
    return recompiled(gm, bool(clamped))
