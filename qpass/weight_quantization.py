"""How each quantized weight of a compiled model is quantized: what a checkpoint stores
(:mod:`qpass.checkpoint`) and the compressed-tensors export writes (:mod:`qpass.compressed_tensors`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qpass import capture
from qpass.formats import QTensor
from qpass.passes.plan import SitePlan
from qpass.passes.smooth import Smoothing
from qpass.quantizer import Quantizer
from qpass.rotation import Rotation
from qpass.state import QpassState
from qpass.stored import StoredWeight, quantize_weight


@dataclass(frozen=True)
class WeightQuantization:
    """How the sites of one weight parameter quantize it: what a checkpoint stores."""

    parameter: str
    sites: tuple[str, ...]
    quantizer: Quantizer
    rotation: Rotation | None
    smoothing: Smoothing | None
    k_axis: int  # of the parameter: -1 for a linear's [N, K]

    def quantize(self, weight: Tensor) -> QTensor:
        """The codes and scales of the values the sites' GEMM uses, computed as the graph computes them."""
        if isinstance(weight, StoredWeight):
            return weight.qtensor()
        if self.smoothing is not None:
            with torch.no_grad():
                weight = self.smoothing.scale_weight(weight.detach())
        return quantize_weight(weight, self.quantizer, self.rotation, self.k_axis)

    def stored(self, weight: Tensor) -> StoredWeight:
        rotation = self.rotation.to_json() if self.rotation else ""
        return StoredWeight.from_qtensor(self.quantize(weight), self.quantizer, rotation)


def weight_quantizations(model: nn.Module) -> tuple[dict[str, WeightQuantization], dict[str, str]]:
    """Each quantized site's weight parameter: how it is stored quantized, or why it cannot be
    (``{parameter: reason}``). The sites are those of the model's captured graphs."""
    state = capture.state_of(model, "saving a checkpoint")
    if not state.plans:
        raise ValueError("the model has not run since qpass.compile: its sites are found when it first "
                         "runs; call it once (on any input) before saving")
    by_parameter: dict[str, list[SitePlan]] = defaultdict(list)
    for plan in state.plans.values():
        if plan.site.parameter and plan.site.op.family != "experts":
            by_parameter[plan.site.parameter].append(plan)
    stored, kept = {}, {}
    for parameter, plans in by_parameter.items():
        quantized = [plan for plan in plans if plan.excluded is None]
        if not quantized:
            continue
        found = _quantization(model, parameter, quantized, len(plans), state)
        if isinstance(found, str):
            kept[parameter] = found
        else:
            stored[parameter] = found
    for plan in state.plans.values():
        if plan.excluded is None and plan.site.op.family == "experts":
            kept.setdefault(plan.site.parameter or plan.name, "expert weights are kept in high precision")
    return stored, kept


def _quantization(
    model: nn.Module, parameter: str, plans: list[SitePlan], uses: int, state: QpassState
) -> WeightQuantization | str:
    weight = model.get_parameter(parameter)
    if uses > len(plans):
        return "the parameter is also used where it is not quantized"
    if state.recipe.quantizes_backward:
        return "a training recipe: the checkpoint keeps the high-precision master weight"
    found = set()
    for plan in plans:
        q = plan.products[0].quantizers
        if len(plan.products) != 1 or q.b is None:
            return "its site does not quantize it as a weight operand"
        if plan.ocs is not None or plan.rotated_weight:
            return "the graph rewrites it (channel splitting or the residual-stream rotation)"
        k_axis = plan.site.op.weight_k_axis
        if q.rotation is not None and q.rotation.padded(weight.shape[k_axis]) != weight.shape[k_axis]:
            return f"its rotation pads K = {weight.shape[k_axis]} to whole blocks"
        smoothing = None
        if plan.smooth is not None and plan.name in state.smoothing:
            smoothing = Smoothing(state.smoothing[plan.name], online=not plan.smooth_norm,
                                  weight_axis=-1 if k_axis == -1 else 0)
        found.add((q.b, q.rotation, smoothing and tuple(smoothing.scales), k_axis))
    if len(found) > 1:
        return "its sites quantize it differently"
    ((quantizer, rotation, _, k_axis),) = found
    if isinstance(weight, StoredWeight) and (weight.quantizer, weight.rotation) != (
            quantizer.to_json(), rotation.to_json() if rotation else ""):
        return "it is stored in another quantization"
    return WeightQuantization(parameter, tuple(p.name for p in plans), quantizer, rotation, smoothing, k_axis)
