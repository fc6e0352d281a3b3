"""SmoothQuant (arXiv 2211.10438): activation outliers migrated into the weights, channel by channel.

For linear sites planned with ``smooth=α``, ``qpass.calibrate`` measures each input channel's
``max|X_j|`` and the weights' ``max|W_j|``, and takes ``s_j = max|X_j|^α / max|W_j|^(1−α)`` (to the
nearest power of two: exact to apply, and to undo):
``X·Wᵀ = (X·diag(1/s))·(W·diag(s))ᵀ``, so the input the quantizer sees has flatter channels and the
weight takes up the difference. Sites that read the output of one norm (q/k/v after a Llama layer's
RMSNorm) share one ``s`` (``max|W_j|`` over all of their weights) and its ``1/s`` is folded into that
norm's weight (and a LayerNorm's bias); a site whose input comes from no norm, or from a norm that
something else also reads, divides its input by ``s`` at run time instead.

Everything is rewritten in the graph as functions of the parameters (as the residual rotation is),
from the scales calibration chose: :func:`plan_smoothing` finds each site's norm (planning), and
:func:`smooth_sites` rewrites.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from qpass.passes.kinds import is_op, meta_value
from qpass.passes.plan import SitePlan
from qpass.passes.quantize import recompiled
from qpass.passes.residual import MUL, PASS_THROUGH, RMS_NORM
from qpass.passes.sites import ModelContext

aten = torch.ops.aten
LAYER_NORM = (F.layer_norm, torch.layer_norm, aten.layer_norm.default)


def smoothing_scales(alpha: float, input_max: Tensor, weight_max: Tensor) -> list[float]:
    """``s_j = max|X_j|^α / max|W_j|^(1−α)`` rounded to the nearest power of two (in log2), so that
    scaling by ``s`` and ``1/s`` is exact in any float format (and GPTQ's weights stay its own under
    it); 1 where either maximum is 0 (nothing to migrate)."""
    x, w = input_max.double(), weight_max.double()
    s = x.pow(alpha) / w.pow(1 - alpha)
    s = torch.where((x > 0) & (w > 0) & s.isfinite(), s, 1.0)
    return torch.exp2(torch.log2(s).round()).tolist()


@dataclass(frozen=True)
class Smoothing:
    """One site's rewrite: its weight's input channels times ``scales``, and its input divided by
    them online unless a norm's weight takes ``1/s`` (then ``online`` is False)."""

    scales: list[float]  # Python floats: a traced call turns them into graph constants
    online: bool
    weight_axis: int = -1

    def _factor(self, like: Tensor, inverse: bool) -> Tensor:
        s = torch.tensor(self.scales, dtype=torch.float64, device=like.device)
        return (1.0 / s if inverse else s).to(like.dtype)

    def scale_input(self, x: Tensor) -> Tensor:
        return x * self._factor(x, inverse=True)

    def scale_weight(self, w: Tensor) -> Tensor:
        factor = self._factor(w, inverse=False)
        return w * (factor if self.weight_axis == -1 else factor[:, None])

    def scale_norm(self, gamma: Tensor) -> Tensor:
        return gamma * self._factor(gamma, inverse=True)


RESHAPE = (torch.reshape, aten.view.default, aten.reshape.default, aten._unsafe_view.default, "view",
           "reshape")


def _passes_channels(node) -> bool:
    """``node`` passes its first argument on with the last axis (the channels) intact: a cast, or a
    reshape of the leading dims (GPT-2's Conv1D flattens its input)."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return False
    if is_op(node, PASS_THROUGH):
        return True
    source, value = node.args[0] if node.args else None, meta_value(node)
    return (is_op(node, RESHAPE) and isinstance(source, fx.Node) and value is not None
            and meta_value(source) is not None and value.shape[-1:] == meta_value(source).shape[-1:])


def _source(node):
    while _passes_channels(node):
        node = node.args[0]
    return node


def _norm_parameters(x: fx.Node, parameters: dict[fx.Node, Tensor]) -> tuple[fx.Node, ...]:
    """The weight (and bias) nodes of the norm whose output ``x`` is, if it is one: ``F.layer_norm`` /
    ``F.rms_norm`` with a weight, or a hand-written norm's final ``γ · normalized`` (Hugging Face's)."""
    node = _source(x)
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return ()
    if is_op(node, LAYER_NORM) or is_op(node, RMS_NORM):
        names = ("weight", "bias") if is_op(node, LAYER_NORM) else ("weight",)
        found = [node.args[i] if len(node.args) > i else node.kwargs.get(name)
                 for i, name in enumerate(names, start=2)]
        return tuple(n for n in found if n in parameters) if found[0] in parameters else ()
    if is_op(node, MUL):
        gamma = [a for a in node.args if a in parameters and parameters[a].ndim == 1]
        return tuple(gamma[:1])
    return ()


def _readers(x: fx.Node) -> set[fx.Node]:
    """What consumes the value of ``x``, through casts."""
    node, found = _source(x), set()
    frontier = [node]
    while frontier:
        for user in frontier.pop().users:
            if _passes_channels(user):
                frontier.append(user)
            elif user.op != "call_function" or user.target is not operator.getitem:
                found.add(user)
    return found


def plan_smoothing(
    plans: list[SitePlan], parameters: dict[fx.Node, Tensor], context: ModelContext,
    scales: dict[str, list[float]],
) -> list[SitePlan]:
    """Each smoothed site with the norm it folds into (``smooth_norm``: the paths of its weight and
    bias), when that norm's output feeds smoothed sites only, and a note for the report."""
    smoothed = [p for p in plans if p.excluded is None and p.smooth is not None]
    nodes = {p.site.node for p in smoothed}
    planned = {}
    for plan in smoothed:
        x, _ = plan.site.op.operand_nodes(plan.site.node)
        norm = _norm_parameters(x, parameters)
        paths = tuple(context.parameters.get(id(parameters[n]), "") for n in norm)
        alone = all(len(n.users) == 1 for n in norm)  # a parameter of this norm only
        if norm and alone and all(paths) and _readers(x) <= nodes:
            plan = replace(plan, smooth_norm=paths)
        where = (f"1/s folded into {', '.join(plan.smooth_norm)}" if plan.smooth_norm
                 else "online 1/s on its input")
        planned[plan.name] = plan.noted(
            f"smooth: alpha={plan.smooth:g}, {where}" if plan.name in scales
            else f"smooth: not applied (alpha={plan.smooth:g} needs qpass.calibrate to choose its scales)")
    return [planned.get(plan.name, plan) for plan in plans]


def smooth_sites(
    gm: fx.GraphModule, plans: list[SitePlan], parameters: dict[fx.Node, Tensor],
    scales: dict[str, list[float]],
) -> fx.GraphModule:
    """Rewrite every smoothed site that calibration gave scales: its weight times ``s``, and either
    its norm's weight (and bias) times ``1/s`` (once per norm) or its input divided by ``s``."""
    folded: set[fx.Node] = set()
    changed = False
    for plan in plans:
        if plan.excluded is not None or plan.smooth is None or plan.name not in scales:
            continue
        node = plan.site.node
        x, w = plan.site.op.operand_nodes(node)
        smoothing = Smoothing(scales[plan.name], online=not plan.smooth_norm,
                              weight_axis=-1 if plan.site.op.weight_k_axis == -1 else 0)
        with gm.graph.inserting_before(node):
            if not plan.products[0].execution.b_stored:  # a stored weight was smoothed before it was saved
                node.replace_input_with(w, gm.graph.call_function(smoothing.scale_weight, (w,)))
            if smoothing.online:
                node.replace_input_with(x, gm.graph.call_function(smoothing.scale_input, (x,)))
        for norm_parameter in _norm_parameters(x, parameters) if plan.smooth_norm else ():
            if norm_parameter in folded:
                continue
            folded.add(norm_parameter)
            users = list(norm_parameter.users)
            with gm.graph.inserting_after(norm_parameter):
                scaled = gm.graph.call_function(smoothing.scale_norm, (norm_parameter,))
            for user in users:
                user.replace_input_with(norm_parameter, scaled)
        changed = True
    return recompiled(gm, changed)
