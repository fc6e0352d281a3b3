"""``qpass.compile`` and ``qpass.export``: the public entry points.

``qpass.compile`` works in place, like ``nn.Module.compile`` (and torchao's ``quantize_``): the model
keeps its class, parameters, ``state_dict`` keys, call signature and train/eval behaviour, and every
call goes through Dynamo. Graph breaks and Python control flow are Dynamo's to handle; each graph it
captures is quantized by the passes (:mod:`qpass.capture` owns how).

``qpass.export`` is the torch.export path (used by the ONNX export): the same passes on an
exported program's graph, re-exported so that the result holds only ATen and qpass ops.
"""

from __future__ import annotations

import warnings

import torch
from torch import fx, nn

from qpass import capture
from qpass.passes.lower import KERNEL_CHOICES
from qpass.recipes import Recipe, get_recipe
from qpass.state import QpassState

BACKENDS = ("inductor", "aot_eager", "eager")


def compile(
    model: nn.Module,
    recipe: str | Recipe = "fp8-train",
    *,
    backend: str = "inductor",
    kernels: str = "auto",
    dynamic: bool | None = None,
    fullgraph: bool = False,
    blocks: str | list[str] | tuple[str, ...] = (),
    **overrides,
) -> nn.Module:
    """Quantize every matmul of ``model`` as ``recipe`` says; returns ``model``, compiled in place.

    ``overrides`` are recipe fields and the SPEC section 8 overrides (``attention=``, ``rules=``,
    ``exclude=``, ``rounding=``, ``scale_mode=``, ``scaling=``, ...). ``backend`` is what compiles
    the quantized graphs: ``"inductor"``, ``"aot_eager"`` or ``"eager"``. ``kernels`` is what
    quantizes: ``"triton"`` (qpass's generated kernels, :mod:`qpass.passes.lower`), ``"reference"``
    (the :mod:`qpass.formats` numerics as torch ops), ``"auto"`` (Triton on CUDA) or ``"interpret"``
    (the Triton kernels wherever the graph runs, on the CPU in Triton's interpreter: for testing
    kernels without a GPU). ``blocks``: globs of module paths (``"model.layers.*"``) compiled each on
    its own, in a cache region of its own, the rest of the model around them (torchtitan's pattern);
    every FSDP2 unit below the model (``fully_shard``) is one anyway. Sites are found when the model
    first runs; then :func:`qpass.report` lists them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"qpass.compile takes an nn.Module, got {type(model).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"unknown kernels {kernels!r}; expected one of {', '.join(KERNEL_CHOICES)}")
    recipe = get_recipe(recipe).with_overrides(**overrides)
    if isinstance(getattr(model, "_qpass", None), QpassState):
        warnings.warn(
            "this model was already compiled by qpass; the new recipe replaces the old one", stacklevel=2)
        capture.remove(model)
    return capture.install(
        model, QpassState(recipe, backend, dict(dynamic=dynamic, fullgraph=fullgraph), kernels,
                          blocks=(blocks,) if isinstance(blocks, str) else tuple(blocks)))


def _drop_metadata_checks(gm: fx.GraphModule) -> None:
    """torch.export's dtype/device assertions read values and compute nothing; without them the
    passes see the graph Dynamo gives qpass.compile (an extra user stops e.g. the residual stream)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)
    gm.recompile()


def export(
    model: nn.Module,
    args: tuple,
    kwargs: dict | None = None,
    *,
    recipe: str | Recipe | None = None,
    dynamic_shapes=None,
    **overrides,
) -> torch.export.ExportedProgram:
    """A ``torch.export`` program of ``model`` with its matmuls quantized.

    ``model`` is either compiled by :func:`qpass.compile` (its recipe is used) or a plain module
    with ``recipe=`` (and overrides) given here.
    """
    state = getattr(model, "_qpass", None)
    if not isinstance(state, QpassState):
        if recipe is None:
            raise ValueError("qpass.export needs a model compiled by qpass.compile, or recipe=")
        state = QpassState(get_recipe(recipe).with_overrides(**overrides), "eager", {})
    elif recipe is not None or overrides:
        raise ValueError(
            "this model was compiled by qpass.compile: its recipe is used; compile again to change it")
    with capture.uncompiled(model):
        program = torch.export.export(model, tuple(args), kwargs, dynamic_shapes=dynamic_shapes)
    gm = program.module()
    _drop_metadata_checks(gm)
    capture.quantize_captured(gm, capture.get_attr_parameters(gm), state)
    return torch.export.export(gm, tuple(args), kwargs, dynamic_shapes=dynamic_shapes)
