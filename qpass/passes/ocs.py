"""Outlier channel splitting (Zhao et al., ICML 2019): trade a few extra MACs for a smaller range.

For a site ``Y = X · Wᵀ`` (a linear layer, or a matmul/addmm of an input and a 2-D weight), the
input channel ``c`` with the largest magnitude is split in two: one operand's column ``c`` is halved
and appended again, the other operand's column ``c`` is duplicated, and the product is unchanged.
Repeating this ``ceil(ratio · K)`` times (a split column may be split again) shrinks the range the
quantizer has to cover.

- Weight-driven (the default): the weight's columns are halved, the input's duplicated. The split
  is quantization-aware: a pair of halves ``w/2`` would round the same way, so where that rounding
  is more than Δ/4 off (Δ the quantizer's grid step at ``w/2``) they become ``w/2 − Δ/4`` and
  ``w/2 + Δ/4``, which round to the two neighbours and still sum to ``w``.
- Input-driven, after :func:`qpass.calibrate`: channels are chosen by the input's calibrated
  per-channel max and the input's columns are halved instead (inference recipes).

In the graph each side is one call of a :class:`ChannelSplit` method, a gather (``index_select``)
and a per-column multiply, right before the site's quantizers. The split weight is computed from the
parameter, so a training recipe's gradients reach the original weight, and a weight loaded later is
split the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, fx

from qpass.formats.api import quantization_step
from qpass.passes.plan import SitePlan, split_width
from qpass.passes.quantize import recompiled
from qpass.passes.sites import weight_value
from qpass.quantizer import Quantizer


@dataclass
class ChannelSplit:
    """Column ``j`` of the split operands carries ``fractions[j]`` of input channel ``channels[j]``.

    Python lists, not tensors: the graph calls the methods below, and a traced call turns lists
    into graph constants where captured tensors would not be allowed."""

    channels: list[int]  # [K + extra]
    fractions: list[float]  # [K + extra], powers of two that sum to 1 per channel
    halved: str  # "weight" or "input": the operand whose columns are scaled by the fractions
    # Quantization-aware (weight-driven only): the pairs of equal halves, nudged apart by ±Δ/4 for
    # this quantizer, Δ taken from the weight at each call so a trained weight stays split well.
    pairs: list[tuple[int, int]] = field(default_factory=list)
    quantizer: Quantizer | None = None
    weight_axis: int = -1  # the weight's input-channel axis: -1 for a linear's [N, K], -2 for B [K, N]

    @property
    def extra(self) -> int:
        return len(self.channels) - max(self.channels) - 1

    # What the rewritten graph calls.

    def split_input(self, x: Tensor) -> Tensor:
        x = x.index_select(-1, torch.tensor(self.channels, device=x.device))
        return (x * torch.tensor(self.fractions, dtype=x.dtype, device=x.device) if self.halved == "input"
                else x)

    def split_weight(self, weight: Tensor) -> Tensor:
        return self._split_weight(weight.movedim(self.weight_axis, -1)).movedim(-1, self.weight_axis)

    def _split_weight(self, weight: Tensor) -> Tensor:
        """``weight`` with its input channels last."""
        weight = weight.index_select(-1, torch.tensor(self.channels, device=weight.device))
        if self.halved == "weight":
            weight = weight * torch.tensor(self.fractions, dtype=weight.dtype, device=weight.device)
        if self.quantizer is None or not self.pairs:
            return weight
        first, second = torch.tensor(self.pairs, device=weight.device).unbind(1)
        halves = weight.detach().index_select(-1, first)
        spec = self.quantizer.spec
        quarter = quantization_step(weight.detach(), spec, axis=-1).index_select(-1, first) / 4
        # Only halves that round badly (more than Δ/4 off) are nudged: one lands on each neighbour.
        # A half on the grid stays, or the nudge could move the scale that the largest one sets.
        error = (self.quantizer(weight.detach().float(), -1).index_select(-1, first) - halves.float()).abs()
        quarter = torch.where(error > quarter.float(), quarter, 0.0).to(weight.dtype)
        return weight.index_add(-1, first, -quarter).index_add(-1, second, quarter)


def greedy_split(channel_max: Tensor, extra: int) -> tuple[list[int], list[float], list[tuple[int, int]]]:
    """Split the column with the largest max ``extra`` times: (channels, fractions, pairs), where
    ``pairs`` are the (column, new column) of each split, in order."""
    channels = list(range(len(channel_max)))
    fractions = [1.0] * len(channel_max)
    current = channel_max.double().clone()
    pairs = []
    for _ in range(extra):
        column = int(current.argmax())
        current[column] /= 2
        fractions[column] /= 2
        pairs.append((column, len(channels)))
        channels.append(channels[column])
        fractions.append(fractions[column])
        current = torch.cat((current, current[column : column + 1]))
    return channels, fractions, pairs


def split_by_weight(weight: Tensor, ratio: float, quantizer: Quantizer | None) -> ChannelSplit:
    """Weight-driven, quantization-aware for ``quantizer`` (plain halves when it is None); ``weight``
    is ``[N, K]``."""
    k = weight.shape[1]
    channels, fractions, pairs = greedy_split(weight.detach().abs().amax(0), split_width(ratio, k) - k)
    # Only pairs that were not split again are still equal halves.
    final = [(a, b) for a, b in pairs if fractions[a] == fractions[b]]
    return ChannelSplit(channels, fractions, "weight", final if quantizer else [], quantizer)


def split_by_input(input_max: Tensor, ratio: float) -> ChannelSplit:
    """Input-driven, from calibrated per-channel maxima of the site's input."""
    channels, fractions, _ = greedy_split(input_max, split_width(ratio, len(input_max)) - len(input_max))
    return ChannelSplit(channels, fractions, "input")


# ---- the pass ----------------------------------------------------------------------------------


def _split(plans: list[SitePlan]) -> list[SitePlan]:
    """The plans whose site outlier channel splitting rewrites."""
    return [plan for plan in plans if plan.excluded is None and plan.ocs is not None]


def plan_split(plan: SitePlan, weight: Tensor, input_max: Tensor | None) -> ChannelSplit:
    """Input-driven when the site was planned with calibration statistics, weight-driven otherwise;
    ``weight`` is ``[N, K]``."""
    if plan.ocs_by_input:
        split = split_by_input(input_max, plan.ocs)
    else:
        q = plan.products[0].quantizers
        # Under a rotation the weight is quantized rotated: the unrotated grid step means nothing there.
        split = split_by_weight(weight, plan.ocs, q.b if q.rotation is None else None)
    split.weight_axis = plan.site.op.weight_k_axis
    return split


def split_channels(
    gm: fx.GraphModule, plans: list[SitePlan], parameters: dict[fx.Node, Tensor],
    calibration: dict[str, Tensor]
) -> dict[str, ChannelSplit]:
    """Rewrite every planned linear site's operands into their split form; returns the splits."""
    splits = {}
    for plan in _split(plans):
        node = plan.site.node
        x, w = plan.site.op.operand_nodes(node)  # after the residual rotation: its weight
        weight = weight_value(w, parameters)
        split = plan_split(plan, weight.movedim(plan.site.op.weight_k_axis, -1), calibration.get(plan.name))
        with gm.graph.inserting_before(node):
            new_x = gm.graph.call_function(split.split_input, (x,))
            new_w = gm.graph.call_function(split.split_weight, (w,))
        node.replace_input_with(x, new_x)
        node.replace_input_with(w, new_w)
        splits[plan.name] = split
    recompiled(gm, bool(splits))
    return splits
