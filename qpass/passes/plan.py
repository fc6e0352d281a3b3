"""Planning: what a recipe does at each site (its quantizers, or why it is left alone).

Analysis is in :mod:`qpass.passes.sites`, rewriting in :mod:`qpass.passes.quantize`; this module
only decides. Order of precedence, last wins: the recipe, then the default exclusions of SPEC
section 8, then ``rules`` (which may set ``exclude=False`` to quantize a default-excluded site), then
``exclude`` globs. Sites that cannot be quantized at all (integer, unsupported shapes) stay excluded.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from qpass.ops import MatmulQuantizers
from qpass.passes.sites import ATTENTION_KINDS, Site
from qpass.recipes import Recipe

MIN_REDUCTION = 32  # SPEC section 8: matmuls with K < 32 are excluded by default


def grad_gemms(roles: tuple[str, str]) -> tuple[str, str]:
    """The names of the GEMMs that produce dA and dB: the weight's gradient is the wgrad."""
    a, b = roles
    return ("wgrad", "dgrad") if a == "weight" and b != "weight" else ("dgrad", "wgrad")


@dataclass(frozen=True)
class ProductPlan:
    """One quantized product ``A · B``: its operands' roles and the quantizers of its three GEMMs."""

    roles: tuple[str, str]
    quantizers: MatmulQuantizers

    @property
    def grad_gemms(self) -> tuple[str, str]:
        return grad_gemms(self.roles)

    def formats(self) -> dict[str, str]:
        """``"gemm.role" -> format`` for every quantized operand role (SPEC section 6 names)."""
        a, b = self.roles
        grad_a, grad_b = self.grad_gemms
        q = self.quantizers
        slots = {
            f"fprop.{a}": q.a, f"fprop.{b}": q.b,
            f"{grad_a}.grad_output": q.da_grad, f"{grad_a}.{b}": q.da_b,
            f"{grad_b}.grad_output": q.db_grad, f"{grad_b}.{a}": q.db_a,
        }
        return {key: str(value) for key, value in slots.items() if value is not None}


@dataclass
class SitePlan:
    site: Site
    products: tuple[ProductPlan, ...] = ()  # (A·B,) for matmuls, (Q·Kᵀ, P·V) for sdpa
    excluded: str | None = None  # the reason, for qpass.report

    @property
    def name(self) -> str:
        return self.site.name


def _recipe_role(site_role: str) -> str:
    return "weight" if site_role == "weight" else "input"  # attention's Q, K, P, V are activations


def product_plan(recipe: Recipe, roles: tuple[str, str]) -> ProductPlan:
    grad_a, grad_b = grad_gemms(roles)
    ra, rb = (_recipe_role(role) for role in roles)
    quantizers = MatmulQuantizers(
        a=recipe.quantizer("fprop", ra), b=recipe.quantizer("fprop", rb),
        da_grad=recipe.quantizer(grad_a, "grad_output"), da_b=recipe.quantizer(grad_a, rb),
        db_grad=recipe.quantizer(grad_b, "grad_output"), db_a=recipe.quantizer(grad_b, ra),
    )
    return ProductPlan(roles, quantizers)


def _cannot_quantize(site: Site) -> str | None:
    if "integer" in site.traits:
        return "integer matmul (indices or masks): left in its own dtype"
    if site.kind == "embedding":
        return "embedding (a lookup, not a matmul)"
    return site.unsupported


def _default_exclusion(site: Site, recipe: Recipe) -> str | None:
    if site.kind in ATTENTION_KINDS and not recipe.attention:
        return "attention stays in high precision (attention=True quantizes it)"
    if "output_projection" in site.traits:
        return "final output projection (lm_head), excluded by default"
    if "router" in site.traits:
        return "MoE router, excluded by default"
    if site.reduction is not None and site.reduction < MIN_REDUCTION:
        return f"K={site.reduction} < {MIN_REDUCTION}, excluded by default"
    return None


def plan_site(site: Site, recipe: Recipe, matched_globs: set[str]) -> SitePlan:
    """The plan for one site; globs of ``recipe`` that match it are added to ``matched_globs``."""
    reason = _cannot_quantize(site)
    if reason is not None:
        return SitePlan(site, excluded=reason)
    reason = _default_exclusion(site, recipe)
    changes: dict = {}
    for glob, overrides in recipe.rules:
        if fnmatchcase(site.name, glob):
            matched_globs.add(glob)
            changes.update(overrides)
    if "exclude" in changes:
        excluded = changes.pop("exclude")
        reason = f"excluded by a rule for {site.name!r}" if excluded else None
    for glob in recipe.exclude:
        if fnmatchcase(site.name, glob):
            matched_globs.add(glob)
            reason = f"excluded by exclude=[{glob!r}]"
    if reason is not None:
        return SitePlan(site, excluded=reason)
    site_recipe = recipe.with_overrides(**changes) if changes else recipe
    if site.kind == "sdpa":
        products = (product_plan(site_recipe, ("q", "k")), product_plan(site_recipe, ("p", "v")))
    else:
        products = (product_plan(site_recipe, site.roles),)
    if not any(p.formats() for p in products):
        roles = ", ".join(site.roles)
        return SitePlan(site, excluded=f"the recipe quantizes none of its operands (roles {roles})")
    return SitePlan(site, products)


def plan_sites(sites: list[Site], recipe: Recipe, matched_globs: set[str]) -> list[SitePlan]:
    return [plan_site(site, recipe, matched_globs) for site in sites]
