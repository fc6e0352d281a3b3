"""Experts that run as a Python loop, which no Dynamo graph holds: found and quantized as they run.

transformers' ``"eager"`` experts implementation loops over the experts that tokens were routed to,
``F.linear(tokens, self.gate_up_proj[e])`` (GPT-OSS: ``tokens @ self.gate_up_proj[e]``). The loop is
data-dependent (``nonzero``, an ``if`` per expert): Dynamo gives up on the experts' forward and runs
it eagerly. qpass runs that forward itself (``capture.ExpertsCall``) under :class:`ExpertGemms`, a
torch function mode in which each such GEMM of one expert's matrix of a 3-D weight runs as
:class:`ExpertGemm`: the graph Dynamo would capture of that one call (``input``, the 3-D weight and
the expert's index in, the slice and the GEMM inside), quantized by the passes like any captured
graph, its site ``<experts>.gate_up_proj`` of kind ``expert_linear`` (``expert_matmul``). Each call
is then exactly the dense quantized product of that expert's tokens and matrix (SPEC section 6).

Modules of 3-D parameters that no site took as its weight are what qpass did not recognise: the
capture reports them (:func:`unrecognized`).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from qpass.passes.sites import ModelContext

GEMMS = {F.linear: "linear", torch.matmul: "matmul", torch.Tensor.matmul: "matmul",
         torch.Tensor.__matmul__: "matmul"}


def loop_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """transformers' experts modules (``use_experts_implementation``) whose forward is the eager loop,
    as ``(path in named_modules, module)``."""
    return [
        (name, module) for name, module in model.named_modules()
        if hasattr(module, "is_transposed") and hasattr(module, "has_gate")
        and getattr(getattr(module, "config", None), "_experts_implementation", None) in (None, "eager")
        and any(p.ndim == 3 for p in module.parameters(recurse=False))
    ]


def expert_weights(module: nn.Module) -> dict[int, tuple[str, nn.Parameter]]:
    """The module's 3-D parameters (a matrix per expert), by id, with their attribute names."""
    return {id(p): (name, p) for name, p in module.named_parameters(recurse=False) if p.ndim == 3}


def _fake(value: torch.Tensor) -> torch.Tensor:
    return torch.empty(value.shape, dtype=value.dtype, device="meta")


class ExpertGemm(fx.GraphModule):
    """``gemm(input, weight[expert])`` (+ ``bias``) as a graph of its own, for the passes to quantize:
    ``gemm`` is "linear" or "matmul", ``raw_path`` the experts module's path in ``named_modules``."""

    def __init__(self, module: nn.Module, raw_path: str, gemm: str, x: torch.Tensor, weight: nn.Parameter,
                 attribute: str, bias: torch.Tensor | None):
        graph = fx.Graph()
        names = ("input", attribute, "expert", *(("bias",) if bias is not None else ()))
        values = (x, weight, torch.zeros((), dtype=torch.int64), *(() if bias is None else (bias,)))
        placeholders = [graph.placeholder(name) for name in names]
        for node, value in zip(placeholders, values):
            node.meta["example_value"] = _fake(value)
        slice_ = graph.call_function(operator.getitem, (placeholders[1], placeholders[2]))
        slice_.meta["example_value"] = _fake(weight[0])
        if gemm == "linear":
            bias_node = placeholders[3] if bias is not None else None
            out = graph.call_function(F.linear, (placeholders[0], slice_, bias_node))
        else:
            out = graph.call_function(torch.matmul, (placeholders[0], slice_))
        out.meta["example_value"] = _fake(out.target(_fake(x), _fake(weight[0])))
        # As Dynamo records a module's ops: keyed by the module's id, its path from the traced frame.
        stack = {str(id(module)): (f"L['self'].{raw_path}" if raw_path else "L['self']", type(module))}
        for node in (slice_, out):
            node.meta["nn_module_stack"] = stack
        graph.output(out)
        super().__init__(nn.Module(), graph)
        self.weight_node = placeholders[1]


class ExpertGemms(TorchFunctionMode):
    """Runs each GEMM of one expert's matrix of the given 3-D weights as ``gemm_of(kind, attribute, x,
    bias)(x, weight, expert[, bias])``: a slice ``weight[expert]`` is recognised by identity, in the
    GEMM that takes it next."""

    def __init__(self, weights: dict[int, tuple[str, nn.Parameter]], gemm_of):
        super().__init__()
        self._weights = weights
        self._gemm_of = gemm_of
        self._slices: dict[int, tuple[torch.Tensor, str, object]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__ and id(args[0]) in self._weights:
            out = func(*args, **kwargs)
            self._slices[id(out)] = (out, id(args[0]), args[1])  # the slice kept alive: its id stays its own
            return out
        kind = GEMMS.get(func)
        found = self._slices.get(id(args[1])) if kind is not None and len(args) >= 2 else None
        if found is None or found[0] is not args[1] or not isinstance(found[2], (int, torch.Tensor)):
            return func(*args, **kwargs)
        _, weight, expert = found
        attribute, parameter = self._weights[weight]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        gemm = self._gemm_of(kind, attribute, args[0], bias)
        return gemm(args[0], parameter, torch.as_tensor(expert), *(() if bias is None else (bias,)))


def unrecognized(model: nn.Module, plans: dict, context: ModelContext) -> dict[str, str]:
    """Modules holding 3-D parameters (a matrix per expert) that no site took as its weight: what
    runs unquantized for a layout qpass does not know, by module path, with why."""
    weighted = {plan.site.parameter for plan in plans.values() if plan.site.parameter}
    found = {}
    for module in model.modules():
        experts = [name for p in module.parameters(recurse=False)
                   if p.ndim == 3 and p.is_floating_point() and (name := context.parameters.get(id(p)))]
        if experts and not weighted.intersection(experts):
            found[context.paths[str(id(module))] or type(module).__name__] = (
                "an expert layout qpass does not recognise: its 3-D weights "
                f"({', '.join(name.rsplit('.', 1)[-1] for name in experts)}) are the weight of no "
                "grouped_mm, "
                "per-token bmm or per-expert linear or matmul it found")
    return found
