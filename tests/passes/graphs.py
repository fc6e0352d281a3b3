"""Tiny graphs for the pass tests: capture a module's Dynamo graph the way qpass.compile sees it."""

from __future__ import annotations

import torch
from torch import fx

from qpass.capture import dynamo_parameters


class Wrap(torch.nn.Module):
    """``fn(self, x)`` as a module with a 64x64 weight ``w``, 4 experts' 64x64 weights ``experts``, a
    sub-``linear`` and an embedding ``table`` (unused parameters do not reach the graph)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.w = torch.nn.Parameter(torch.randn(64, 64))
        self.experts = torch.nn.Parameter(torch.randn(4, 64, 64))
        self.linear = torch.nn.Linear(64, 64)
        self.table = torch.nn.Embedding(16, 64)

    def forward(self, x):
        return self.fn(self, x)


def capture(module: torch.nn.Module, *inputs) -> tuple[fx.GraphModule, set[fx.Node], list]:
    """The one Dynamo graph of ``module(*inputs)``, its parameter nodes and its example inputs."""
    captured = []

    def record(gm, example_inputs):
        # Dynamo drops the placeholders' grapharg metadata once the backend returns: read it now.
        captured.append((gm, dynamo_parameters(gm), list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(module, backend=record, fullgraph=True)(*inputs)
    (result,) = captured
    return result


def count_calls(gm: fx.GraphModule, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


