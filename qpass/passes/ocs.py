"""Outlier channel splitting (Zhao et al., ICML 2019): trade a few extra MACs for a smaller range.

For a linear site ``Y = X · Wᵀ``, the input channel ``c`` with the largest magnitude is split in
two: one operand's column ``c`` is halved and appended again, the other operand's column ``c`` is
duplicated, and the product is unchanged. Repeating this ``ceil(ratio · K)`` times (a split
column may be split again) shrinks the range the quantizer has to cover.

- Weight-driven (the default): the weight's columns are halved, the input's duplicated. The split
  is quantization-aware: a pair of halves ``w/2`` would round the same way, so they become
  ``w/2 − Δ/4`` and ``w/2 + Δ/4`` (Δ the quantizer's grid step at ``w/2``), which still sum to ``w``.
- Input-driven, after :func:`qpass.calibrate`: channels are chosen by the input's calibrated
  per-channel max and the input's columns are halved instead (inference recipes).

In the graph both sides are one gather (``index_select``) and a per-column multiply, placed right
before the site's quantizers. The split weight is computed from the parameter, so a training
recipe's gradients reach the original weight, and a weight loaded later is split the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, fx

from qpass.formats.api import quantization_step
from qpass.passes.plan import SitePlan
from qpass.passes.sites import matmul_operands, weight_value
from qpass.quantizer import Quantizer


@dataclass
class ChannelSplit:
    """Column ``j`` of the split operands carries ``fractions[j]`` of input channel ``channels[j]``."""

    channels: Tensor  # int64 [K + extra]
    fractions: Tensor  # [K + extra], powers of two that sum to 1 per channel
    halved: str  # "weight" or "input": the operand whose columns are scaled by the fractions
    # The quantization-aware ±Δ/4 (weight-driven only): added to the weight's ``offset_columns``.
    offsets: Tensor | None = None  # [N, 2 · pairs]
    offset_columns: Tensor | None = None  # int64 [2 · pairs]

    @property
    def extra(self) -> int:
        return len(self.channels) - int(self.channels.max()) - 1


def greedy_split(channel_max: Tensor, extra: int) -> tuple[Tensor, Tensor, list[tuple[int, int]]]:
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
    return torch.tensor(channels), torch.tensor(fractions, dtype=torch.float64), pairs


def extra_channels(ratio: float, k: int) -> int:
    return math.ceil(ratio * k)


def split_by_weight(weight: Tensor, ratio: float, quantizer: Quantizer | None) -> ChannelSplit:
    """Weight-driven, quantization-aware for ``quantizer`` (plain halves when it is None)."""
    weight = weight.detach().double()
    channels, fractions, pairs = greedy_split(weight.abs().amax(0), extra_channels(ratio, weight.shape[1]))
    if quantizer is None:
        return ChannelSplit(channels, fractions, "weight")
    halves = weight[:, channels] * fractions
    step = quantization_step(halves.float(), quantizer.spec, axis=-1).double()
    # Only pairs that were not split again are still equal halves: nudge them apart.
    final = torch.tensor([p for p in pairs if fractions[p[0]] == fractions[p[1]]], dtype=torch.long).reshape(-1, 2)
    quarter = step[:, final[:, 0]] / 4
    offsets = torch.cat((-quarter, quarter), dim=1)
    return ChannelSplit(channels, fractions, "weight", offsets, torch.cat((final[:, 0], final[:, 1])))


def split_by_input(input_max: Tensor, ratio: float) -> ChannelSplit:
    """Input-driven, from calibrated per-channel maxima of the site's input."""
    channels, fractions, _ = greedy_split(input_max, extra_channels(ratio, len(input_max)))
    return ChannelSplit(channels, fractions, "input")


# ---- what the rewritten graph calls ------------------------------------------------------------


def split_input(x: Tensor, channels: Tensor, fractions: Tensor | None) -> Tensor:
    x = x.index_select(-1, channels)
    return x if fractions is None else x * fractions.to(x.dtype)


def split_weight(
    weight: Tensor, channels: Tensor, fractions: Tensor | None, offsets: Tensor | None, offset_columns: Tensor | None
) -> Tensor:
    weight = weight.index_select(-1, channels)
    if fractions is not None:
        weight = weight * fractions.to(weight.dtype)
    return weight if offsets is None else weight.index_add(-1, offset_columns, offsets.to(weight.dtype))


# ---- the pass ----------------------------------------------------------------------------------


def plan_split(plan: SitePlan, weight: Tensor, input_max: Tensor | None) -> ChannelSplit:
    """Input-driven when the site has calibration statistics, weight-driven otherwise."""
    if input_max is not None:
        return split_by_input(input_max, plan.ocs)
    q = plan.products[0].quantizers
    # Under a rotation the weight is quantized rotated: the unrotated grid step means nothing there.
    return split_by_weight(weight, plan.ocs, q.b if q.rotation is None else None)


def split_channels(
    gm: fx.GraphModule, plans: list[SitePlan], parameters: dict[fx.Node, Tensor], calibration: dict[str, Tensor]
) -> dict[str, ChannelSplit]:
    """Rewrite every planned linear site's operands into their split form; returns the splits."""
    splits = {}
    for plan in plans:
        if plan.excluded is not None or plan.ocs is None:
            continue
        node = plan.site.node
        (x, w), _ = matmul_operands(node, "linear")
        weight = weight_value(w, parameters)
        split = plan_split(plan, weight, calibration.get(plan.name))
        constants = {
            "channels": split.channels, "fractions": split.fractions, "offsets": split.offsets,
            "offset_columns": split.offset_columns,
        }
        with gm.graph.inserting_before(node):
            got = {
                key: _constant(gm, f"{plan.name}.ocs.{key}", value, weight)
                for key, value in constants.items() if value is not None
            }
            input_fractions = got["fractions"] if split.halved == "input" else None
            weight_fractions = got["fractions"] if split.halved == "weight" else None
            new_x = gm.graph.call_function(split_input, (x, got["channels"], input_fractions))
            new_w = gm.graph.call_function(
                split_weight, (w, got["channels"], weight_fractions, got.get("offsets"), got.get("offset_columns"))
            )
        node.replace_input_with(x, new_x)
        node.replace_input_with(w, new_w)
        plan.extra_channels = split.extra
        plan.notes.append(f"ocs: {split.extra} extra input channels, split by {split.halved}")
        splits[plan.name] = split
    gm.graph.lint()
    gm.recompile()
    return splits


def _constant(gm: fx.GraphModule, name: str, value: Tensor, like: Tensor) -> fx.Node:
    """A get_attr of ``value`` (floats in ``like``'s dtype, on its device), registered on ``gm``."""
    value = value.to(like.device, like.dtype if value.is_floating_point() else value.dtype)
    attribute = "_qpass_" + name.replace(".", "_")
    gm.register_buffer(attribute, value, persistent=False)
    return gm.graph.get_attr(attribute)


def insert_observers(gm: fx.GraphModule, plans: list[SitePlan], observe: Callable[[str, Tensor], None]) -> None:
    """For calibration: report the input of every site that OCS will split to ``observe(site, x)``.
    The graph then runs as Python (the observers are plain functions, not ops)."""
    for plan in plans:
        if plan.excluded is not None or plan.ocs is None:
            continue
        node = plan.site.node
        (x, _), _ = matmul_operands(node, "linear")
        with gm.graph.inserting_before(node):
            seen = gm.graph.call_function(_observer(plan.name, observe), (x,))
        node.replace_input_with(x, seen)
    gm.graph.lint()
    gm.recompile()


def _observer(site: str, observe: Callable[[str, Tensor], None]) -> Callable[[Tensor], Tensor]:
    def observe_input(x: Tensor) -> Tensor:
        observe(site, x)
        return x

    return observe_input
