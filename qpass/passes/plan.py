"""Planning: what a recipe does at each site (its quantizers, or why it is left alone).

Analysis is in :mod:`qpass.passes.sites`, rewriting in the transform passes; this module only
decides, and its :class:`SitePlan` is what every later pass reads. Order of precedence, last wins:
the recipe, then the default exclusions of SPEC section 8, then ``rules`` (which may set
``exclude=False`` to quantize a default-excluded site), then ``exclude`` globs. Sites that cannot be
quantized at all (integer, unsupported shapes) stay excluded.

Plans are frozen: a later planning step (the residual rotation's online Hadamards, the lowering's
execution choices) returns new plans; every plan is final before the first rewrite.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase

from qpass.execution import REFERENCE, Execution, ProductConfig
from qpass.matmul_quantizers import MatmulQuantizers
from qpass.passes.kinds import Dims, meta_value
from qpass.passes.sites import Site
from qpass.recipes import Recipe
from qpass.rotation import resolve

MIN_REDUCTION = 32  # SPEC section 8: matmuls with K < 32 are excluded by default


def grad_gemms(roles: tuple[str, str]) -> tuple[str, str]:
    """The names of the GEMMs that produce dA and dB: the weight's gradient is the wgrad."""
    a, b = roles
    return ("wgrad", "dgrad") if a == "weight" and b != "weight" else ("dgrad", "wgrad")


@dataclass(frozen=True)
class ProductPlan:
    """One quantized product ``A · B``: its operands' roles, the quantizers of its three GEMMs, and
    how it runs (decided by the lowering)."""

    roles: tuple[str, str]
    quantizers: MatmulQuantizers
    execution: Execution = REFERENCE

    @property
    def grad_gemms(self) -> tuple[str, str]:
        return grad_gemms(self.roles)

    @property
    def config(self) -> ProductConfig:
        """What the rewritten graph passes to the quantized form."""
        return self.quantizers.to_json(), self.execution.to_json()

    def formats(self) -> dict[str, str]:
        """``"gemm.role" -> format`` for every quantized operand role (SPEC section 6 names)."""
        a, b = self.roles
        grad_a, grad_b = self.grad_gemms
        q = self.quantizers
        slots = {
            f"fprop.{a}": (q.a, q.rotation), f"fprop.{b}": (q.b, q.rotation),
            f"{grad_a}.grad_output": (q.da_grad, q.da_rotation), f"{grad_a}.{b}": (q.da_b, q.da_rotation),
            f"{grad_b}.grad_output": (q.db_grad, q.db_rotation), f"{grad_b}.{a}": (q.db_a, q.db_rotation),
        }
        formats = {
            key: str(value) + ("" if rotation is None else f"+{rotation}")
            for key, (value, rotation) in slots.items() if value is not None
        }
        if q.reuse_forward:  # the backward's A and B are the forward's quantized operands
            formats.update({f"{grad_a}.{b}": f"fprop.{b}", f"{grad_b}.{a}": f"fprop.{a}"})
        return formats


@dataclass(frozen=True)
class SitePlan:
    site: Site
    products: tuple[ProductPlan, ...] = ()  # (A·B,) for matmuls, (Q·Kᵀ, P·V) for sdpa
    excluded: str | None = None  # the reason, for qpass.report
    ocs: float | None = None  # the expand ratio of outlier channel splitting, if planned
    ocs_by_input: bool = False  # channels chosen by calibrated input maxima (else by the weight)
    occ: float | None = None  # the quantile of outlier clamping and compensation, if planned
    rotated_weight: bool = False  # the residual-stream rotation rewrites the weight (qpass.passes.residual)
    smooth: float | None = None  # SmoothQuant's migration strength α, if planned (qpass.passes.smooth)
    smooth_norm: tuple[str, ...] = ()  # the norm weight (and bias) that takes its 1/s; () online
    lowering: str = "reference"  # "reference", "kernels" or "packed" (qpass.passes.lower)
    backend: str = ""  # which implementation runs the site, for qpass.report
    gemms: str = ""  # which GEMM runs each of its GEMMs (qpass.ops.gemm.route), for qpass.report
    notes: tuple[str, ...] = ()  # what the passes do or could not do, for qpass.report

    @property
    def name(self) -> str:
        return self.site.name

    @property
    def extra_channels(self) -> int:
        """The input channels that outlier channel splitting adds."""
        k = self.site.reduction
        return 0 if k is None else split_width(self.ocs, k) - k

    def noted(self, *notes: str) -> SitePlan:
        return replace(self, notes=self.notes + notes)

    def with_products(self, products) -> SitePlan:
        return replace(self, products=tuple(products))


def _recipe_role(site_role: str) -> str:
    return "weight" if site_role == "weight" else "input"  # attention's Q, K, P, V are activations


def product_plan(
    recipe: Recipe, roles: tuple[str, str], dims: Dims = (None, None, None)
) -> tuple[ProductPlan, list[str]]:
    """The product's quantizers and rotations, and warnings about rotations that had to change."""
    grad_a, grad_b = grad_gemms(roles)
    ra, rb = (_recipe_role(role) for role in roles)
    q = {
        "a": recipe.quantizer("fprop", ra), "b": recipe.quantizer("fprop", rb),
        "da_grad": recipe.quantizer(grad_a, "grad_output"), "da_b": recipe.quantizer(grad_a, rb),
        "db_grad": recipe.quantizer(grad_b, "grad_output"), "db_a": recipe.quantizer(grad_b, ra),
    }
    # A GEMM is rotated only where it quantizes something; each along its own reduction (K, N, M).
    m, k, n = dims
    warned: list[str] = []
    gemms = {"rotation": ("fprop", k, "a", "b"), "da_rotation": (grad_a, n, "da_grad", "da_b"),
             "db_rotation": (grad_b, m, "db_grad", "db_a")}
    for slot, (gemm, length, *operands) in gemms.items():
        rotation = getattr(recipe.hadamard, gemm)
        if rotation is not None and any(q[o] is not None for o in operands):
            q[slot], warning = resolve(rotation, length)
            warned += [f"{gemm}: {warning}"] if warning else []
    return ProductPlan(roles, MatmulQuantizers(**q, reuse_forward=recipe.reuse_forward)), warned


def input_times_weight(site: Site) -> bool:
    """An input times a 2-D weight (a linear layer, GPT-2's Conv1D): where outlier channel splitting
    and outlier clamping apply."""
    weight = meta_value(site.operands[1]) if len(site.operands) == 2 else None
    return (site.roles == ("input", "weight") and site.op.input_times_weight
            and weight is not None and weight.ndim == 2)


def split_width(ocs: float | None, k: int | None) -> int | None:
    """K once outlier channel splitting with expand ratio ``ocs`` added its ``ceil(ocs · K)`` channels."""
    return k if k is None or ocs is None else k + math.ceil(ocs * k)


def _cannot_quantize(site: Site) -> str | None:
    if "integer" in site.traits:
        return "integer matmul (indices or masks): left in its own dtype"
    if site.op.family == "embedding":
        return "embedding (a lookup, not a matmul)"
    return site.unsupported


def _default_exclusion(site: Site, recipe: Recipe) -> str | None:
    if site.op.family == "attention" and not recipe.attention:
        return "attention stays in high precision (attention=True quantizes it)"
    if "output_projection" in site.traits:
        return "final output projection (lm_head), excluded by default"
    if "router" in site.traits:
        return "MoE router, excluded by default"
    if site.reduction is not None and site.reduction < MIN_REDUCTION:
        return f"K={site.reduction} < {MIN_REDUCTION}, excluded by default"
    return None


def plan_site(
    site: Site, recipe: Recipe, matched_globs: set[str], calibrated: frozenset[str] = frozenset()
) -> SitePlan:
    """The plan for one site; globs of ``recipe`` that match it are added to ``matched_globs``;
    ``calibrated``: the sites with calibrated input statistics (channel splitting by the input)."""
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
    dims = site.op.dims(site.operands, site.reduction)
    ocs = site_recipe.ocs if input_times_weight(site) else None
    if ocs is not None:  # the split adds input channels: the forward's K grows
        m, k, n = dims[0]
        dims = [(m, split_width(ocs, k), n)]
    planned = [product_plan(site_recipe, r, d) for r, d in zip(site.op.product_roles(site.roles), dims)]
    products = tuple(p for p, _ in planned)
    if not any(p.formats() for p in products):
        return SitePlan(
            site, excluded=f"the recipe quantizes none of its operands (roles {', '.join(site.roles)})")
    notes = [warning for _, warnings_ in planned for warning in warnings_]
    for note in notes:
        warnings.warn(f"qpass: site {site.name!r}: {note}", stacklevel=2)
    # Outlier clamping needs a quantized input and a weight for the high-precision residual product.
    occ = site_recipe.occ if input_times_weight(site) and products[0].quantizers.a is not None else None
    smooth = site_recipe.smooth if input_times_weight(site) else None
    plan = SitePlan(site, products, ocs=ocs, ocs_by_input=ocs is not None and site.name in calibrated,
                    occ=occ, smooth=smooth, notes=tuple(notes))
    if ocs is not None:
        plan = plan.noted(f"ocs: {plan.extra_channels} extra input channels, "
                          f"split by {'input' if plan.ocs_by_input else 'weight'}")
    if occ is not None:
        plan = plan.noted(f"occ: clamped at the {occ:g} quantiles, residual in high precision")
    return plan


def plan_sites(
    sites: list[Site], recipe: Recipe, matched_globs: set[str], calibrated=frozenset()
) -> list[SitePlan]:
    return [plan_site(site, recipe, matched_globs, frozenset(calibrated)) for site in sites]
