"""One per-tensor scale across data-parallel ranks: the MAX of every rank's amax (FP8-LM, MS-AMP).

Under data parallelism each rank quantizes its own slice of the batch. A per-tensor scale computed
from that slice alone would differ from rank to rank, and from the scale one process would compute
for the whole batch. Where the recipe's ``sync_amax`` is on (the default) and a process group of more
than one rank is initialized, every per-tensor amax (absmax per tensor, delayed scaling's current
amax, NVFP4's global scale) is all-reduced with MAX over the default group before it sets the scale,
so every rank computes the scale of the global batch, and delayed-scaling histories, which record
those amaxes, stay identical across ranks. Without a process group nothing is communicated.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from qpass.formats.scaling import AmaxReduction


def world_size() -> int:
    """Ranks in the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_max(amax: torch.Tensor, group=None) -> torch.Tensor:
    """The MAX of ``amax`` over the ranks of ``group`` (the default group). A NaN goes in as +Inf: a
    MAX need not propagate NaN, and a non-finite amax of either kind makes the scale NaN (SPEC
    section 3), on every rank."""
    amax = torch.where(amax.isnan(), torch.inf, amax.float())
    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    return amax


def amax_reduction(sync: bool) -> AmaxReduction | None:
    """What per-tensor amaxes pass through: the MAX across ranks where ``sync`` asks and there are
    ranks to agree with, else nothing."""
    return all_reduce_max if sync and world_size() > 1 else None
