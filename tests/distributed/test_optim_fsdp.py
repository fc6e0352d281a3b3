"""qpass.optim.AdamW on FSDP2's DTensor parameters (2 gloo ranks on 127.0.0.1) equals one process.

The gradients are set, not computed, to the same values in both runs: what is compared is the
optimizer alone, so the parameters must agree bit for bit (each rank updates its dim-0 shard, with
per-tensor amaxes agreed across ranks). The second linear's 5 rows shard unevenly (3 and 2), the
third's one row leaves the second rank an empty shard, which still takes part in the amax all-reduce.
"""

from __future__ import annotations

import pytest
import torch
import workers
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from qpass.optim import AdamW
from qpass.quantizer import Quantizer

pytestmark = pytest.mark.slow

STEPS = 4
# Formats of the weights' group; the biases' group keeps the defaults (per tensor): a block along a
# sharded 1-D tensor would be cut by the shard boundary (docs/optim.md).
RUNS = {
    "default": ({}, torch.float32),
    "block-mx": ({"exp_avg": Quantizer("fp8_e4m3", granularity=("block", 8)), "exp_avg_sq": "mxfp8_e4m3"},
                 torch.float32),
    "nvfp4": ({"exp_avg": "nvfp4"}, torch.float32),
    "fp16-master": ({"master_weights": "fp16"}, torch.bfloat16),
    "bf16-sr": ({"master_weights": "bf16_sr"}, torch.bfloat16),
}


def gradients(shapes: list[torch.Size]) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        grads = [torch.randn(shape, generator=generator) for shape in shapes]
        grads[2][-1, 0] = grads[3][-1] = 1e3  # the second linear's amaxes on the last rank's shard only
        out.append(grads)
    return out


def train(sharded: bool, options: dict, dtype: torch.dtype) -> dict:
    """AdamW steps on a tiny MLP, sharded by FSDP2 or not; the whole parameters and each rank's
    state shapes."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 10), nn.ReLU(), nn.Linear(10, 5), nn.Linear(5, 1)).to(dtype)
    if sharded:
        for layer in (model[0], model[2], model[3]):
            fully_shard(layer)
        fully_shard(model)
    named = list(model.named_parameters())
    optimizer = AdamW([{"params": [p for n, p in named if n.endswith("weight")], **options},
                       {"params": [p for n, p in named if n.endswith("bias")]}], lr=1e-2)
    for grads in gradients([p.shape for _, p in named]):
        for (_, p), g in zip(named, grads):
            g = g.to(dtype)
            p.grad = distribute_tensor(g, p.device_mesh, p.placements) if isinstance(p, DTensor) else g
        optimizer.step()
    return {"parameters": {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach() for n, p in named},
            "state_shapes": {n: tuple(optimizer.state[p]["exp_avg_sq"].shape) for n, p in named}}


def train_each(runs: list[tuple[dict, torch.dtype]]) -> list[dict]:
    return [train(True, options, dtype) for options, dtype in runs]


@pytest.fixture(scope="module")
def two_ranks():
    return workers.run_ranks(2, train_each, list(RUNS.values()))


@pytest.mark.parametrize("run", RUNS)
def test_fsdp2_steps_equal_one_process(two_ranks, run):
    one = train(False, *RUNS[run])
    index = list(RUNS).index(run)
    for rank in two_ranks:
        for name, value in one["parameters"].items():
            assert torch.equal(rank[index]["parameters"][name], value), name
    # Each rank holds the states of its own rows: 10 = 5 + 5, 5 = 3 + 2, 1 = 1 + 0.
    shapes = [rank[index]["state_shapes"] for rank in two_ranks]
    assert [s["0.weight"] for s in shapes] == [(5, 24), (5, 24)] or run == "block-mx"
    assert [s["2.weight"][0] for s in shapes] == [3, 2]
    assert [s["2.bias"] for s in shapes] == [(3,), (2,)]
    assert [s["3.bias"] for s in shapes] == [(1,), (0,)]
