"""Graph passes, each ``GraphModule -> GraphModule`` or an analysis of one.

- :mod:`qpass.passes.sites`: find matmul, attention and embedding sites, name them, give roles.
- :mod:`qpass.passes.plan`: decide each site's quantizers (or why it is excluded) from a recipe.
- :mod:`qpass.passes.quantize`: rewrite each planned site into its quantized form.
"""

from __future__ import annotations

from torch import fx

from qpass.passes.plan import SitePlan, plan_sites
from qpass.passes.quantize import NewState, insert_quantizers
from qpass.passes.sites import Site, find_sites
from qpass.recipes import Recipe

__all__ = ["Site", "SitePlan", "find_sites", "insert_quantizers", "plan_sites", "quantize_graph"]


def quantize_graph(
    gm: fx.GraphModule,
    parameters: set[fx.Node],
    recipe: Recipe,
    matched_globs: set[str],
    new_state: NewState | None = None,
) -> list[SitePlan]:
    """Run the passes in order on ``gm`` (rewritten in place); returns every site's plan."""
    plans = plan_sites(find_sites(gm.graph, parameters), recipe, matched_globs)
    insert_quantizers(gm, plans, new_state)
    return plans
