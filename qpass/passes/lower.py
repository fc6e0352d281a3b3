"""Lowering: how each quantized site runs, decided once per site, and the packed weights it implies.

:func:`plan_lowering` (planning, before any rewrite) gives every quantized product its
:class:`~qpass.execution.Execution` (the generated Triton kernels or the reference numerics, and its
delayed-scaling states) and records on the plan which implementation runs the site, for
``qpass.report``:

- **packed**: a linear site of an inference recipe whose weight is a frozen parameter (the graph
  was captured without gradients, or the weight does not require them) gets its weight quantized
  once and stored packed (kept by the graph module, found by the op by key): the site becomes one
  ``qpass::packed_linear``, the dequant-matmul kernel that also quantizes the input on the fly
  (:func:`pack_weights` rewrites it).
- **kernels**: every other quantized site keeps its structure, its operands quantized by the
  generated kernels (rotations fused) where they can run them.
- **reference**: the :mod:`qpass.formats` numerics as torch ops.

A site whose weight parameter is a :class:`~qpass.stored.StoredWeight` (loaded by
:func:`qpass.from_pretrained`) takes it as its GEMM's weight operand as stored (``b_stored``), in
every one of these implementations; :func:`stored_weight` checks that the stored quantization is the
one the plan asks for, and refuses the model otherwise.

Where the kernels run is decided here too (:class:`Target`): on CUDA, or anywhere in Triton's
interpreter with ``kernels="interpret"``; ``kernels="triton"`` on a graph that does not run on CUDA
keeps the lowered structure with the reference implementations. A packed weight is a snapshot:
changing the parameter afterwards needs a new ``qpass.compile``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import fx

from qpass.execution import Execution, without_hoisted
from qpass.matmul_quantizers import MatmulQuantizers
from qpass.ops.gemm import route
from qpass.ops.kernels import register_packed_weight
from qpass.passes.kinds import meta_value
from qpass.passes.plan import ProductPlan, SitePlan
from qpass.passes.quantize import recompiled, replace_node
from qpass.quantizer import Quantizer
from qpass.stored import StoredWeight, quantize_weight

KERNEL_CHOICES = ("auto", "triton", "interpret", "reference")
REFERENCE, KERNELS, PACKED = "reference", "kernels", "packed"

NewState = Callable[[str, str, Quantizer], str]  # (site name, operand, its quantizer) -> state key


@dataclass(frozen=True)
class Target:
    """What the lowering decides from: ``qpass.compile``'s ``kernels=``, whether the graph runs on
    CUDA, whether it runs without gradients (``frozen``: inference weights can be packed), and
    whether per-tensor amaxes are agreed across data-parallel ranks (``sync_amax``)."""

    kernels: str = "reference"
    on_cuda: bool = False
    frozen: bool = False
    sync_amax: bool = False

    @property
    def lowers(self) -> bool:
        """The graph gets the lowered structure (packed weights, kernel ops)."""
        return self.kernels in ("triton", "interpret") or (self.kernels == "auto" and self.on_cuda)

    @property
    def runs_kernels(self) -> bool:
        """The generated kernels themselves run (else their reference implementations do)."""
        return self.lowers and (self.on_cuda or self.kernels == "interpret")


def _states(product: ProductPlan, site: str, prefix: str, new_state: NewState) -> Execution:
    """Delayed-scaling states for the operands that are quantized once per step."""
    q = product.quantizers
    a, b = product.roles
    once = q.quantized_once()
    return Execution(
        a_state=new_state(site, prefix + a, q.a) if q.a and once["a"] else "",
        b_state=new_state(site, prefix + b, q.b) if q.b and once["b"] else "",
        grad_state=new_state(site, prefix + "grad_output", q.da_grad) if once["grad"] else "",
    ).check(q)


def stored_weight(plan: SitePlan, parameters: dict[fx.Node, torch.Tensor]) -> StoredWeight | None:
    """The site's weight operand if it is stored quantized, after checking that the plan quantizes it
    exactly so: one inference product, its weight quantizer and rotation, nothing that rewrites the
    weight in the graph. A stored weight anywhere else is a checkpoint that does not match its recipe."""
    stored = {i: value for i, node in enumerate(plan.site.weights)
              if isinstance(value := parameters.get(node), StoredWeight)}
    if not stored:
        return None
    weight = stored.get(len(plan.site.operands) - 1)
    why = None
    if plan.excluded is not None:
        why = f"the site is excluded ({plan.excluded})"
    elif weight is None or len(stored) > 1 or len(plan.products) != 1:
        why = "the stored tensor is not the site's one weight operand"
    elif plan.products[0].quantizers.quantizes_backward:
        why = "the recipe trains (training keeps high-precision weights)"
    elif plan.ocs is not None or plan.rotated_weight:
        why = "the plan rewrites the weight in the graph (channel splitting or the residual rotation)"
    else:
        q = plan.products[0].quantizers
        planned = (q.b.to_json() if q.b else "", q.rotation.to_json() if q.rotation else "")
        if planned != (weight.quantizer, weight.rotation):
            why = (f"the plan quantizes it as {q.b}{f' after {q.rotation}' if q.rotation else ''}, the "
                   f"checkpoint stored {weight!r}")
    if why is not None:
        raise ValueError(f"site {plan.name}: its weight {plan.site.parameter or '(a parameter)'} is stored "
                         f"quantized, but {why}: the checkpoint does not match its recipe")
    return weight


def _saving(product: ProductPlan) -> ProductPlan:
    """What backward is saved of each operand: a weight itself (its parameter costs no memory, its
    codes would), unless a delayed-scaling state forbids quantizing it a second time."""
    run, (a, b) = product.execution, product.roles
    return replace(product, execution=replace(
        run, a_codes=a != "weight" or bool(run.a_state), b_codes=b != "weight" or bool(run.b_state)))


def _synced(product: ProductPlan) -> ProductPlan:
    """Which operands' per-tensor amaxes are agreed across ranks: the activations' and gradients'
    that have one (a weight is the same on every rank)."""
    q, (a, b) = product.quantizers, product.roles

    def sync(role: str, *quantizers: Quantizer | None) -> bool:
        return role != "weight" and any(x is not None and x.scaled_by_tensor_amax for x in quantizers)

    return replace(product, execution=replace(
        product.execution, sync_a=sync(a, q.a, q.db_a), sync_b=sync(b, q.b, q.da_b),
        sync_grad=sync("grad_output", q.da_grad, q.db_grad)))


def _kernels_unsupported(product: ProductPlan) -> str | None:
    """Why the generated kernels cannot quantize every operand of the product (None: they can)."""
    from qpass.codegen.spec import unsupported  # imports triton: only once kernels were asked for

    if product.execution.has_states:
        return "delayed scaling (its amax history is the reference's)"
    run = product.execution
    if run.sync_a or run.sync_b or run.sync_grad:
        return "per-tensor amaxes agreed across ranks (by the reference)"
    q = product.quantizers
    operands = ((q.a, q.rotation), (q.b, q.rotation), (q.da_grad, q.da_rotation), (q.da_b, q.da_rotation),
                (q.db_grad, q.db_rotation), (q.db_a, q.db_rotation))
    return next((why for quantizer, rotation in operands
                 if quantizer and (why := unsupported(quantizer, rotation))), None)


def _gemm_routes(plan: SitePlan, target: Target) -> str:
    """Which GEMM runs each of the site's GEMMs (:func:`qpass.ops.gemm.route`), as the report says it."""
    if plan.lowering == PACKED:
        return f"packed_linear ({plan.backend})"
    device = "cuda" if target.on_cuda else "cpu"
    experts = plan.site.op.family == "experts"  # 3-D weights, but each expert's GEMM is 2-D
    batched = not experts and any(meta_value(node).ndim > 2 for node in plan.site.operands[1:]
                                  if isinstance(meta_value(node), torch.Tensor))
    described = []
    for product, name in zip(plan.products, plan.site.op.product_names):
        q, _, op_config = without_hoisted(product.config)
        if not q.quantizes_backward:
            routes = {"fprop": "reference: quantize-dequantize, then torch.matmul in the model's dtype"}
        else:
            inner = q if op_config is None else MatmulQuantizers.from_json(op_config[0])
            grad_a, grad_b = product.grad_gemms
            routes = {"fprop": route(inner.a, inner.b, device, batched),
                      grad_a: route(inner.da_grad, inner.da_b, device, batched),
                      grad_b: route(inner.db_a, inner.db_grad, device, batched)}
        prefix = f"{name}: " if name else ("per expert: " if experts else "")
        if len(set(routes.values())) == 1:
            described.append(prefix + next(iter(routes.values())))
        else:
            described.append(prefix + "; ".join(f"{gemm} {how}" for gemm, how in routes.items()))
    return " | ".join(described)


def _packed_weight(
    plan: SitePlan, parameters: dict[fx.Node, torch.Tensor], target: Target
) -> torch.Tensor | None:
    """The weight to pack, if the site qualifies: an inference linear site with a frozen 2-D parameter
    weight that no transform rewrites, no delayed scaling, and quantizers the kernels run."""
    from qpass.codegen.spec import unsupported

    site = plan.site
    if site.op.weight_k_axis != -1 or plan.rotated_weight or plan.ocs is not None or len(plan.products) != 1:
        return None
    weight = parameters.get(site.operands[1])
    (product,) = plan.products
    q = product.quantizers
    if (weight is None or weight.ndim != 2 or q.quantizes_backward or q.b is None
            or product.execution.has_states or product.execution.sync_a):
        return None
    if weight.requires_grad and not target.frozen:  # a weight that trains cannot be a snapshot
        return None
    if any(unsupported(quantizer, q.rotation, weight.dtype)
           for quantizer in (q.b, q.a) if quantizer is not None):
        return None
    return weight


def _lowered(plan: SitePlan, parameters: dict[fx.Node, torch.Tensor], target: Target) -> SitePlan:
    where = ("" if target.runs_kernels
             else " (their reference implementations: the graph does not run on CUDA)")
    if _packed_weight(plan, parameters, target) is not None:
        q = plan.products[0].quantizers
        gemm = route(q.a, q.b, "cuda" if target.on_cuda else "cpu")
        gemm = gemm if gemm.startswith("scaled_mm") else f"Triton dequant-matmul{where}"
        backend = f"{q.b} weight packed, {gemm}"
        return replace(plan, lowering=PACKED, backend=backend).noted(f"kernels: {backend}")
    why = next((why for p in plan.products if (why := _kernels_unsupported(p))), None)
    if why is not None:
        backend = f"reference: the Triton kernels cannot run it ({why})"
        return replace(plan, backend=backend).noted(f"kernels: {backend}")
    products = [
        replace(p, execution=replace(p.execution, kernels=target.runs_kernels)) for p in plan.products]
    return (
        replace(plan, lowering=KERNELS, backend=f"Triton quantize kernels{where}")
        .with_products(products)
        .noted(f"kernels: Triton quantize kernels{where}")
    )


def plan_lowering(
    plans: list[SitePlan], parameters: dict[fx.Node, torch.Tensor], target: Target,
    new_state: NewState | None = None
) -> list[SitePlan]:
    """Each quantized site's execution (``new_state`` makes delayed-scaling states), decided once."""
    if target.kernels == "triton" and not target.on_cuda:
        warnings.warn(
            "kernels='triton' on a graph that does not run on CUDA: the lowered ops run their reference "
            "implementations there (the Triton kernels need a GPU; kernels='interpret' runs them in Triton's "
            "interpreter)", stacklevel=3,
        )
    planned = []
    for plan in plans:
        experts = plan.site.op.family == "experts"
        if plan.excluded is None and new_state is not None and experts:
            # A history per step records one amax: an expert's tokens vary with routing, and the op
            # quantizes expert by expert (qpass.ops.grouped), so its per-tensor scales stay current.
            plan = plan.noted("delayed scaling: expert GEMMs scale by the current amax of each expert's "
                              "operands (no per-expert amax histories)")
        elif plan.excluded is None and new_state is not None:
            names = plan.site.op.product_names
            products = [replace(p, execution=_states(p, plan.name, f"{n}." if n else "", new_state))
                        for p, n in zip(plan.products, names)]
            plan = plan.with_products(products)
        if stored_weight(plan, parameters) is not None:
            (product,) = plan.products
            plan = plan.with_products([replace(product, execution=replace(product.execution, b_stored=True))])
        if plan.excluded is None:
            plan = plan.with_products([_saving(p) for p in plan.products])
            if target.sync_amax and experts:
                # Ranks route different tokens to an expert, and an eager loop visits only the experts
                # that have tokens: one all-reduce per expert would not line up across ranks.
                plan = plan.noted("sync_amax: each expert's per-tensor amaxes are this rank's own")
            elif target.sync_amax:
                plan = plan.with_products([_synced(p) for p in plan.products])
            plan = _lowered(plan, parameters, target) if target.lowers else replace(plan, backend="reference")
            plan = replace(plan, gemms=_gemm_routes(plan, target))
        planned.append(plan)
    return planned


def pack_weights(
    gm: fx.GraphModule, plans: list[SitePlan], parameters: dict[fx.Node, torch.Tensor], target: Target
) -> fx.GraphModule:
    """Rewrite every packed site into ``qpass::packed_linear`` of its weight, quantized now."""
    packed = [plan for plan in plans if plan.lowering == PACKED]
    for plan in packed:
        node = plan.site.node
        bound = plan.site.op.bind(node)
        weight = parameters[plan.site.operands[1]]
        q = plan.products[0].quantizers
        if isinstance(weight, StoredWeight):
            qt = weight.qtensor()
        else:
            qt = quantize_weight(weight, q.b, q.rotation, -1)
        # The graph module keeps the packed weight alive; the op finds it by key.
        gm._qpass_packed_weights = [*getattr(gm, "_qpass_packed_weights", []), qt]
        args = (bound["input"], bound["bias"], register_packed_weight(qt), q.b.to_json(), qt.shape[0],
                q.a.to_json() if q.a else "", q.rotation.to_json() if q.rotation else "", target.runs_kernels)
        replace_node(gm.graph, node, torch.ops.qpass.packed_linear.default, args)
    return recompiled(gm, bool(packed))
