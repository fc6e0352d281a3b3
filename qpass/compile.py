"""``qpass.compile``: capture a model's graphs with Dynamo, quantize them, hand them on to a compiler.

Like ``nn.Module.compile`` (and torchao's ``quantize_``), it works in place: the model keeps its
class, parameters, ``state_dict`` keys, call signature and train/eval behaviour, and every call goes
through Dynamo. Graph breaks and Python control flow are Dynamo's to handle; each graph it captures
(one per break, and again on a recompile) passes through :func:`qpass.passes.quantize_graph` before
AOTAutograd and Inductor (or ``aot_eager`` / ``eager``) see it.

``qpass.export`` is the torch.export path (used by the ONNX export): the same passes on an
exported program's graph, re-exported so that the result holds only ATen and qpass ops.
"""

from __future__ import annotations

import contextlib
import itertools
import types
import warnings

import torch
from torch import fx, nn

from qpass.passes import quantize_graph
from qpass.recipes import Recipe, get_recipe
from qpass.state import QpassState

BACKENDS = ("inductor", "aot_eager", "eager")
KERNELS = ("auto", "triton", "reference")


def _get_attr_parameters(gm: fx.GraphModule) -> dict[fx.Node, torch.Tensor]:
    parameters = dict(gm.named_parameters(remove_duplicate=False))  # a tied weight has two names
    return {n: parameters[n.target] for n in gm.graph.nodes if n.op == "get_attr" and n.target in parameters}


def _dynamo_parameters(gm: fx.GraphModule) -> dict[fx.Node, torch.Tensor]:
    """Placeholders that Dynamo lifted from parameters, and get_attrs of parameters, with their values."""
    lifted = {
        node: example for node in gm.graph.nodes
        if node.op == "placeholder" and isinstance(example := getattr(node.meta.get("grapharg"), "example", None), nn.Parameter)
    }
    return lifted | _get_attr_parameters(gm)


class _Backend:
    """The torch.compile backend: quantize the captured graph, then compile it."""

    def __init__(self, state: QpassState):
        self.state = state

    def __call__(self, gm: fx.GraphModule, example_inputs):
        on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
        _quantize(gm, _dynamo_parameters(gm), self.state, lower=_lowers(self.state.kernels, on_cuda))
        if self.state.observe is not None:
            return gm.forward  # calibrating: the observers are Python functions in the graph
        return torch._dynamo.lookup_backend(self.state.backend)(gm, example_inputs)


def _lowers(kernels: str, on_cuda: bool) -> bool:
    """Whether a graph is lowered onto the Triton kernels: ``"auto"`` does so on CUDA."""
    if kernels == "triton" and not on_cuda:
        warnings.warn(
            "kernels='triton' on a graph that does not run on CUDA: the lowered ops run their reference "
            "implementations there (the Triton kernels need a GPU)", stacklevel=3,
        )
    return kernels == "triton" or (kernels == "auto" and on_cuda)


def _quantize(gm: fx.GraphModule, parameters: dict[fx.Node, torch.Tensor], state: QpassState, lower: bool = False) -> None:
    recipe = state.recipe
    new_state = state.delayed_scaling if recipe.scaling == "delayed" else None
    plans, notes = quantize_graph(
        gm, parameters, recipe, state.matched_globs, new_state, state.calibration, state.observe
    )
    if state.observe is None:
        if lower:
            from qpass.passes.lower import lower_to_kernels

            lower_to_kernels(gm, plans, parameters, frozen=not torch.is_grad_enabled())
        state.record(plans, notes)


def compile(
    model: nn.Module,
    recipe: str | Recipe = "fp8-train",
    *,
    backend: str = "inductor",
    kernels: str = "auto",
    dynamic: bool | None = None,
    fullgraph: bool = False,
    **overrides,
) -> nn.Module:
    """Quantize every matmul of ``model`` as ``recipe`` says; returns ``model``, compiled in place.

    ``overrides`` are recipe fields and the SPEC section 8 overrides (``attention=``, ``rules=``,
    ``exclude=``, ``rounding=``, ``scale_mode=``, ``scaling=``, ...). ``backend`` is what compiles
    the quantized graphs: ``"inductor"``, ``"aot_eager"`` or ``"eager"``. ``kernels`` is what
    quantizes: ``"triton"`` (qpass's generated kernels, :mod:`qpass.passes.lower`), ``"reference"``
    (the :mod:`qpass.formats` numerics as torch ops) or ``"auto"`` (Triton on CUDA). Sites are
    found when the model first runs; then :func:`qpass.report` lists them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"qpass.compile takes an nn.Module, got {type(model).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernels {kernels!r}; expected one of {', '.join(KERNELS)}")
    recipe = get_recipe(recipe).with_overrides(**overrides)
    if isinstance(getattr(model, "_qpass", None), QpassState):
        warnings.warn("this model was already compiled by qpass; the new recipe replaces the old one", stacklevel=2)
        model._qpass.detach_from(model)
    state = QpassState(recipe, backend, dict(dynamic=dynamic, fullgraph=fullgraph), kernels)
    state.attach(model)
    model._compiled_call_impl = compiled_call(model, state.options)
    return model


def compiled_call(model: nn.Module, options: dict):
    """What the model's ``__call__`` runs (``nn.Module._compiled_call_impl``): its Dynamo-compiled
    forward. The model's state is looked up at the first call (a copy's state is set up late)."""
    compiled = None

    def call(*args, **kwargs):
        nonlocal compiled
        state = model.__dict__["_qpass"]
        if compiled is None:
            compiled = torch.compile(_own_code(_call_module), backend=_Backend(state), **options)
        out = compiled(model, *args, **kwargs)
        if not state.checked:
            state.check_first_call()
        return out

    return call


def _call_module(module: nn.Module, *args, **kwargs):
    # The frame Dynamo starts from. It is qpass code, not torch.nn's: Dynamo does not start tracing
    # in torch.nn files, so compiling nn.Linear's own _call_impl would silently run it eagerly.
    return module._call_impl(*args, **kwargs)


_COMPILED = itertools.count()


def _own_code(fn):
    """``fn`` with a code object of its own. Dynamo caches graphs per code object, with a limit of
    8 per code object: one shared code object would make the 9th compiled model run eagerly."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_COMPILED)}")
    return types.FunctionType(code, fn.__globals__, code.co_name)


@contextlib.contextmanager
def _uncompiled(model: nn.Module):
    """Run ``model`` as plain Python (torch.export traces it itself)."""
    saved = getattr(model, "_compiled_call_impl", None)
    model._compiled_call_impl = None
    try:
        yield model
    finally:
        model._compiled_call_impl = saved


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
        raise ValueError("this model was compiled by qpass.compile: its recipe is used; compile again to change it")
    with _uncompiled(model):
        program = torch.export.export(model, tuple(args), kwargs, dynamic_shapes=dynamic_shapes)
    gm = program.module()
    _drop_metadata_checks(gm)
    _quantize(gm, _get_attr_parameters(gm), state)
    return torch.export.export(gm, tuple(args), kwargs, dynamic_shapes=dynamic_shapes)
