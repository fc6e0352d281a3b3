"""``qpass.calibrate``: statistics from sample batches for the passes that need them.

Outlier channel splitting of an inference recipe chooses the channels to split from the weights
unless it has seen the inputs: calibration runs the compiled model on sample batches with its
graphs transformed (rotations included) but not quantized, records each split site's per-channel
input maximum, then has the graphs captured again, split by those maxima.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from qpass import capture


def calibrate(model: nn.Module, batches: Iterable) -> nn.Module:
    """Run ``model`` (compiled by :func:`qpass.compile` with ``ocs=``) on ``batches`` (each a tensor,
    a tuple of positional arguments or a dict of keyword arguments); returns ``model``."""
    recipe = capture.state_of(model, "qpass.calibrate").recipe
    if recipe.ocs is None and not any("ocs" in overrides for _, overrides in recipe.rules):
        raise ValueError(
            "qpass.calibrate collects statistics for outlier channel splitting: compile with ocs=<ratio>")
    if recipe.quantizes_backward:
        raise ValueError(f"input-driven channel splitting is for inference recipes; {recipe.name!r} trains")
    maxima: dict[str, Tensor] = {}

    def observe(site: str, x: Tensor) -> None:
        channel_max = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float().cpu()
        maxima[site] = channel_max if site not in maxima else torch.maximum(maxima[site], channel_max)

    capture.recapture(model, observe=observe)
    with torch.no_grad():
        for batch in batches:
            if isinstance(batch, dict):
                model(**batch)
            elif isinstance(batch, (tuple, list)):
                model(*batch)
            else:
                model(batch)
    if not maxima:
        raise ValueError("calibration saw no input of a site that outlier channel splitting applies to")
    capture.recapture(model, calibration=maxima)
    return model
