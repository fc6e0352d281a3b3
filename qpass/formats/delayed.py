"""FP8 delayed scaling (FP8-LM, Transformer Engine): the scale comes from an amax history.

The history lives in module buffers, so it moves with ``.to(device)`` and survives
``state_dict`` save/load. Each use takes the max of the previous ``history_len`` steps' amaxes,
then records the current amax (if finite) for the steps after it.
"""

from __future__ import annotations

import torch
from torch import nn

from qpass.formats.absmax import absmax_encode


class DelayedScaling(nn.Module):
    def __init__(self, history_len: int = 16, margin: int = 0, pow2: bool = False):
        super().__init__()
        if history_len < 1:
            raise ValueError(f"history_len must be at least 1, got {history_len}")
        if not isinstance(margin, int) or not 0 <= margin <= 64:
            raise ValueError(f"margin must be an int in [0, 64], got {margin!r}")
        self.margin = margin
        self.pow2 = pow2
        self.register_buffer("amax_history", torch.zeros(history_len, dtype=torch.float32))
        self.register_buffer("num_recorded", torch.zeros((), dtype=torch.int64))

    @property
    def history_len(self) -> int:
        return self.amax_history.numel()

    def encode_scale(self, current_amax: torch.Tensor, max_normal: float) -> torch.Tensor:
        """The per-tensor encode scale for a tensor whose own amax is ``current_amax``.

        It comes from the history's max; before anything is recorded, from ``current_amax``
        (Transformer Engine starts from 1.0 instead, which saturates or underflows the first
        step). A NaN or Inf in the current tensor still makes all of it NaN (SPEC section 3).
        """
        recorded = self.amax_history.amax()
        amax = torch.where(self.num_recorded > 0, recorded, current_amax.to(recorded.dtype))
        encode = absmax_encode(amax, max_normal, self.pow2, self.margin)
        return torch.where(current_amax.isfinite(), encode, torch.nan)

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
