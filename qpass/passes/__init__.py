"""Graph passes: analyses, planning steps, and transforms that are each ``GraphModule -> GraphModule``.

In order (:func:`quantize_graph`); every decision is made before the first rewrite:

- :mod:`qpass.passes.kinds`: the op-kind table (targets, operands, roles, replacements).
- :mod:`qpass.passes.sites`: find matmul, attention and embedding sites, name them, give roles.
- :mod:`qpass.passes.plan`: decide each site's quantizers and rotations (or why it is excluded).
- :mod:`qpass.passes.residual`: plan, then rewrite, the rotation of a Llama-style residual stream.
- :mod:`qpass.passes.lower`: decide how each site runs (kernels, packed weights, delayed states).
- :mod:`qpass.passes.observe`: for calibration, report each site's input instead of quantizing.
- :mod:`qpass.passes.smooth`: SmoothQuant's per-channel scales, folded into norms or online.
- :mod:`qpass.passes.ocs`: split outlier input channels of linear sites.
- :mod:`qpass.passes.occ`: clamp outliers out of linear sites' inputs, compensate in high precision.
- :mod:`qpass.passes.quantize`: rewrite each planned site into its quantized form.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import fx

from qpass.passes.lower import NewState, Target, pack_weights, plan_lowering
from qpass.passes.observe import insert_observers
from qpass.passes.occ import clamp_inputs
from qpass.passes.ocs import split_channels
from qpass.passes.plan import SitePlan, plan_sites
from qpass.passes.quantize import insert_quantizers
from qpass.passes.residual import plan_residual, rotate_residual_stream
from qpass.passes.sites import ModelContext, Site, find_sites
from qpass.passes.smooth import plan_smoothing, smooth_sites
from qpass.recipes import Recipe

__all__ = [
    "ModelContext", "Site", "SitePlan", "Target", "find_sites", "insert_quantizers", "plan_sites",
    "quantize_graph",
]


def quantize_graph(
    gm: fx.GraphModule,
    parameters: dict[fx.Node, torch.Tensor],
    recipe: Recipe,
    matched_globs: set[str],
    new_state: NewState | None = None,
    calibration: dict[str, torch.Tensor] | None = None,
    observe: Callable[[SitePlan, torch.Tensor], None] | None = None,
    target: Target = Target(),
    context: ModelContext = ModelContext(),
    smoothing: dict[str, list[float]] | None = None,
) -> tuple[list[SitePlan], list[str]]:
    """Run the passes in order on ``gm`` (rewritten in place); returns every site's plan and notes
    about the graph as a whole. With ``observe``, the graph is prepared for calibration instead:
    transformed but not quantized, and every planned linear site's input reported to ``observe``. ``context``:
    the model ``gm`` was captured from (:class:`~qpass.passes.sites.ModelContext`), which names sites.
    ``smoothing``: SmoothQuant's scales per site, as calibration chose them."""
    calibration = calibration or {}
    plans = plan_sites(find_sites(gm.graph, parameters, context), recipe, matched_globs, calibration)
    plans = plan_smoothing(plans, parameters, context, smoothing or {})
    notes, residual = [], None
    if recipe.hadamard.residual is not None:
        plans, residual, note = plan_residual(plans, recipe.hadamard.residual, parameters)
        notes.append(note)
    if observe is None:
        plans = plan_lowering(plans, parameters, target, new_state)
    # Every plan is final: the rewrites follow.
    if residual is not None:
        rotate_residual_stream(gm, residual)
    smooth_sites(gm, plans, parameters, smoothing or {})  # calibration observes the smoothed inputs
    if observe is not None:
        insert_observers(gm, plans, observe)
        return plans, notes
    split_channels(gm, plans, parameters, calibration)
    clamp_inputs(gm, plans)
    pack_weights(gm, plans, parameters, target)
    insert_quantizers(gm, plans)
    return plans, notes
