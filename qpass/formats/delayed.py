"""FP8 delayed scaling (FP8-LM, Transformer Engine): the scale comes from an amax history.

The history lives in module buffers, so it moves with ``.to(device)`` and survives
``state_dict`` save/load. Each use takes the max of the previous ``history_len`` steps' amaxes,
then records the current amax (if finite) for the steps after it.
"""

from __future__ import annotations

import torch
from torch import nn


class DelayedScaling(nn.Module):
    def __init__(self, history_len: int = 16, margin: int = 0, pow2: bool = False):
        super().__init__()
        if history_len < 1:
            raise ValueError(f"history_len must be at least 1, got {history_len}")
        self.margin = margin
        self.pow2 = pow2
        self.register_buffer("amax_history", torch.zeros(history_len, dtype=torch.float32))
        self.register_buffer("num_recorded", torch.zeros((), dtype=torch.int64))

    @property
    def history_len(self) -> int:
        return self.amax_history.numel()

    def history_amax(self, current_amax: torch.Tensor) -> torch.Tensor:
        """The amax to scale with: the history's max, or ``current_amax`` before anything is recorded.

        Transformer Engine starts from a scale of 1.0 instead; falling back to the current amax
        avoids a first step that saturates or underflows everything.
        """
        recorded = self.amax_history.amax()
        return torch.where(self.num_recorded > 0, recorded, current_amax.to(recorded.dtype))

    @torch.no_grad()
    def record(self, amax: torch.Tensor) -> None:
        """Append ``amax`` (newest first); a non-finite amax is not recorded."""
        amax = amax.detach().float().reshape(())
        finite = amax.isfinite()
        rolled = torch.cat((amax.reshape(1), self.amax_history[:-1]))
        self.amax_history.copy_(torch.where(finite, rolled, self.amax_history))
        self.num_recorded.add_(finite.long())

    def extra_repr(self) -> str:
        return f"history_len={self.history_len}, margin={self.margin}, pow2={self.pow2}"
