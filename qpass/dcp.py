"""Distributed checkpoints (``torch.distributed.checkpoint``) of compiled models, qpass's state included.

A compiled model's ``state_dict`` holds its delayed-scaling histories beside its parameters
(``_qpass.<site>.<operand>.amax_history``, :mod:`qpass.state`), and DCP saves them with the rest:
the same on every rank (:mod:`qpass.distributed` agrees them), so DCP writes them once, while the
parameters are written as the shards FSDP2 holds. Loading is where a plain ``dcp.load`` falls short:
it loads only the keys of the ``state_dict`` it is given, and a model whose graphs are not captured
yet has no histories to load into. :func:`load` adds the checkpoint's qpass entries to that
``state_dict`` first, so they arrive and are applied as each site is found. Any world size loads
any other's checkpoint: DCP reshards the parameters, and the histories are whole on every rank.
"""

from __future__ import annotations

import os

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from qpass.state import STATE_PREFIX


def save(model: nn.Module, checkpoint_id: str | os.PathLike) -> None:
    """Save ``model`` (compiled by qpass; sharded by FSDP2, wrapped by DDP, or neither) with DCP."""
    dcp.save(get_model_state_dict(model), checkpoint_id=checkpoint_id)


def load(model: nn.Module, checkpoint_id: str | os.PathLike) -> None:
    """Load a checkpoint of :func:`save` (or ``dcp.save`` of the model's state_dict) into ``model``,
    at any world size, its delayed-scaling histories included."""
    state_dict = get_model_state_dict(model)
    stored = dcp.FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
    for key, meta in stored.items():
        if key.startswith(STATE_PREFIX) and key not in state_dict:
            state_dict[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
    dcp.load(state_dict, checkpoint_id=checkpoint_id)
    set_model_state_dict(model, state_dict)
