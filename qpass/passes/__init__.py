"""Graph passes, each ``GraphModule -> GraphModule`` or an analysis of one.

- :mod:`qpass.passes.sites`: find matmul, attention and embedding sites, name them, give roles.
- :mod:`qpass.passes.plan`: decide each site's quantizers and rotations (or why it is excluded).
- :mod:`qpass.passes.residual`: rotate a Llama-style residual stream (QuaRot), folding RMSNorms.
- :mod:`qpass.passes.ocs`: split outlier input channels of linear sites.
- :mod:`qpass.passes.occ`: clamp outliers out of linear sites' inputs, compensate in high precision.
- :mod:`qpass.passes.quantize`: rewrite each planned site into its quantized form.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import fx

from qpass.passes.occ import clamp_inputs
from qpass.passes.ocs import insert_observers, split_channels
from qpass.passes.plan import SitePlan, plan_sites
from qpass.passes.quantize import NewState, insert_quantizers
from qpass.passes.residual import rotate_residual_stream
from qpass.passes.sites import Site, find_sites
from qpass.recipes import Recipe

__all__ = ["Site", "SitePlan", "find_sites", "insert_quantizers", "plan_sites", "quantize_graph"]


def quantize_graph(
    gm: fx.GraphModule,
    parameters: dict[fx.Node, torch.Tensor],
    recipe: Recipe,
    matched_globs: set[str],
    new_state: NewState | None = None,
    calibration: dict[str, torch.Tensor] | None = None,
    observe: Callable[[str, torch.Tensor], None] | None = None,
) -> tuple[list[SitePlan], list[str]]:
    """Run the passes in order on ``gm`` (rewritten in place); returns every site's plan and notes
    about the graph as a whole. With ``observe``, the graph is prepared for calibration instead:
    transformed but not quantized, and the inputs that OCS splits reported to ``observe``."""
    plans = plan_sites(find_sites(gm.graph, parameters), recipe, matched_globs)
    notes = []
    if recipe.hadamard.residual is not None:
        notes.append(rotate_residual_stream(gm, plans, recipe.hadamard.residual, parameters))
    if observe is not None:
        insert_observers(gm, plans, observe)
        return plans, notes
    split_channels(gm, plans, parameters, calibration or {})
    clamp_inputs(gm, plans)
    insert_quantizers(gm, plans, new_state)
    return plans, notes
