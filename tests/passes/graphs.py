"""Tiny graphs for the pass tests: capture a module's Dynamo graph the way qpass.compile sees it."""

from __future__ import annotations

import torch
from torch import fx

from qpass.compile import _dynamo_parameters


def capture(module: torch.nn.Module, *inputs) -> tuple[fx.GraphModule, set[fx.Node], list]:
    """The one Dynamo graph of ``module(*inputs)``, its parameter nodes and its example inputs."""
    captured = []

    def record(gm, example_inputs):
        # Dynamo drops the placeholders' grapharg metadata once the backend returns: read it now.
        captured.append((gm, _dynamo_parameters(gm), list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(module, backend=record, fullgraph=True)(*inputs)
    (result,) = captured
    return result


def count_calls(gm: fx.GraphModule, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)
