"""Capture: the one owner of a compiled model's lifecycle.

``qpass.compile`` installs a compiled call on the model (``nn.Module._compiled_call_impl``, what its
``__call__`` runs): the model's forward under Dynamo with :class:`_Backend`, which runs the passes
(:func:`qpass.passes.quantize_graph`) on every graph Dynamo captures, one per graph break and again
on a recompile, before AOTAutograd and Inductor (or ``aot_eager`` / ``eager``) see it. This module
installs and removes that call, re-captures (calibration starts over with new graphs), runs a model
as plain Python (torch.export traces it itself), and makes copies and pickles of a compiled model
compiled too: torch drops ``_compiled_call_impl`` from them, which would leave them unquantized, so
:class:`~qpass.state.QpassState` is reduced (``copyreg``) to a function that installs the call again.

Dynamo caches graphs per code object, at most ``recompile_limit`` (8) per code object, and after a
graph break it resumes in the model's own frames, whose code objects every instance of the class
shares. Each compiled model is therefore compiled with ``isolate_recompiles=True``: its cache entries
form a region of their own, so no number of compiled models of one class uses up another's limit
(nor, past a limit, runs another model's graphs). What still runs unquantized for a reason qpass
can see is caught at every call: forward pre-hooks on the modules that hold weights record those
called outside any Dynamo graph, and the call warns, naming the model, the modules and the cause.
"""

from __future__ import annotations

import contextlib
import copyreg
import inspect
import itertools
import threading
import types
import warnings
import weakref

import torch
from torch import fx, nn

from qpass.passes import Target, quantize_graph
from qpass.state import QpassState


def get_attr_parameters(gm: fx.GraphModule) -> dict[fx.Node, torch.Tensor]:
    parameters = dict(gm.named_parameters(remove_duplicate=False))  # a tied weight has two names
    return {n: parameters[n.target] for n in gm.graph.nodes if n.op == "get_attr" and n.target in parameters}


def dynamo_parameters(gm: fx.GraphModule) -> dict[fx.Node, torch.Tensor]:
    """Placeholders that Dynamo lifted from parameters, and get_attrs of parameters, with their values."""
    lifted = {
        node: example for node in gm.graph.nodes
        if node.op == "placeholder"
        and isinstance(example := getattr(node.meta.get("grapharg"), "example", None), nn.Parameter)
    }
    return lifted | get_attr_parameters(gm)


def quantize_captured(
    gm: fx.GraphModule, parameters: dict[fx.Node, torch.Tensor], state: QpassState, target: Target = Target(),
    model: nn.Module | None = None,
) -> None:
    """Run the passes on one captured graph as ``state`` says, and record its plans there;
    ``model``: the model Dynamo traced it from (a torch.export graph is traced from its root)."""
    recipe = state.recipe
    new_state = state.delayed_scaling if recipe.scaling == "delayed" else None
    plans, notes = quantize_graph(
        gm, parameters, recipe, state.matched_globs, new_state, state.calibration, state.observe, target
    )
    if state.observe is None:
        state.record(plans if model is None else _placed(plans, model), notes)


def _placed(plans: list, model: nn.Module) -> list:
    """``plans``, with a note on each site whose module path does not name the module that ran it
    in ``model``: a graph break inside a submodule makes Dynamo resume in that module's own frame,
    whose sites are named relative to it, and whose graph runs for every instance the frame's
    guards accept (every layer of a stack). Said in the report and in a warning, never silently."""
    modules = {str(id(m)) for _, m in model.named_modules(remove_duplicate=False)}

    def placed(site) -> bool:
        # Dynamo keys the stack by the modules' ids. An op of the root module's own forward has no
        # stack (nor, alas, one of a plain function a resumed frame calls: the two look alike).
        stack = site.node.meta.get("nn_module_stack") or {}
        if not stack:
            return True
        if next(reversed(stack)) not in modules:
            return False
        try:
            return str(id(model.get_submodule(site.module))) == next(reversed(stack))
        except AttributeError:
            return False

    relative = [plan.name for plan in plans if not placed(plan.site)]
    if not relative:
        return plans
    warnings.warn(
        f"qpass: {type(model).__name__}'s graph broke inside a submodule: Dynamo resumed in that module's "
        f"own frame, so the sites {', '.join(relative)} are named relative to it and their graph may run "
        "for several modules (every layer): names, rules and exclusions by path do not reach them there "
        "(qpass.report marks them)", stacklevel=5,
    )
    note = ("named relative to a frame Dynamo resumed after a graph break inside a submodule: this site may "
            "stand for that module in every instance (e.g. every layer)")
    return [plan.noted(note) if plan.name in relative else plan for plan in plans]


class _Backend:
    """The torch.compile backend: quantize the captured graph, then compile it. Dynamo keeps every
    backend until ``torch._dynamo.reset()``: this one holds its model's state weakly, so that the
    state (plans, packed weights) goes with the model."""

    def __init__(self, state: QpassState):
        self._state = weakref.ref(state)

    def __call__(self, gm: fx.GraphModule, example_inputs):
        state = self._state()
        on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
        target = Target(state.kernels, on_cuda, frozen=not torch.is_grad_enabled())
        quantize_captured(gm, dynamo_parameters(gm), state, target, state.model)
        if state.observe is not None:
            return gm.forward  # calibrating: the observers are Python functions in the graph
        return torch._dynamo.lookup_backend(state.backend)(gm, example_inputs)


def _call_module(module: nn.Module, *args, **kwargs):
    # The frame Dynamo starts from. It is qpass code, not torch.nn's: Dynamo does not start tracing
    # in torch.nn files, so compiling nn.Linear's own _call_impl would silently run it eagerly.
    return module._call_impl(*args, **kwargs)


_COMPILED = itertools.count()


def _own_code(fn):
    """``fn`` with a code object of its own. Dynamo caches graphs per code object, with a limit of
    8 per code object: one shared code object would make the 9th compiled model run eagerly where
    torch has no recompile regions (before 2.13), and crowds every model's lookups where it has."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_COMPILED)}")
    return types.FunctionType(code, fn.__globals__, code.co_name)


# A region of cache entries per compiled model (torch >= 2.13); older torch shares the limit.
_ISOLATED = ({"isolate_recompiles": True}
             if "isolate_recompiles" in inspect.signature(torch.compile).parameters else {})


class CompiledCall:
    """What a compiled model's ``__call__`` runs: its Dynamo-compiled forward, compiled at the first
    call (a copy's state is complete only then), watched for modules that ran eagerly."""

    def __init__(self, model: nn.Module):
        self._model = weakref.ref(model)  # the model holds this call: no reference cycle
        self._compiled = None

    def __call__(self, *args, **kwargs):
        model = self._model()
        state = model.__dict__["_qpass"]
        if self._compiled is None:
            self._compiled = torch.compile(
                _own_code(_call_module), backend=_Backend(state), **_ISOLATED, **state.options)
        with _watching(model, state):
            out = self._compiled(model, *args, **kwargs)
        if not state.checked:
            _check_first_call(model, state)
        return out


def install(model: nn.Module, state: QpassState, hooks: list | None = None) -> nn.Module:
    """Attach ``state`` to ``model`` and make every call of it go through qpass's capture;
    ``hooks``: a copied model's own (its hook tables are copied with it)."""
    state.attach(model, hooks)
    if hooks is None:
        state.hooks += [
            module.register_forward_pre_hook(_EagerWatch(name)) for name, module in _weight_holders(model)]
    model.__dict__["_compiled_call_impl"] = CompiledCall(model)
    return model


def remove(model: nn.Module) -> None:
    """Undo :func:`install`: the model runs as plain Python again, without qpass's state."""
    model.__dict__["_qpass"].detach_from(model)
    model.__dict__.pop("_compiled_call_impl", None)


def recapture(model: nn.Module, *, observe=None, calibration: dict | None = None) -> None:
    """Forget the captured graphs: the model's next call captures them afresh, calibrating with
    ``observe`` or quantizing with ``calibration`` statistics."""
    model.__dict__["_qpass"].restart(observe=observe, calibration=calibration)
    model.__dict__["_compiled_call_impl"] = CompiledCall(model)


@contextlib.contextmanager
def uncompiled(model: nn.Module):
    """Run ``model`` as plain Python (torch.export traces it itself)."""
    saved = model.__dict__.pop("_compiled_call_impl", None)
    try:
        yield model
    finally:
        if saved is not None:
            model.__dict__["_compiled_call_impl"] = saved


def state_of(model: nn.Module, what: str) -> QpassState:
    """The state of a model compiled by ``qpass.compile``; ``what`` names the caller in the error."""
    state = getattr(model, "_qpass", None)
    if not isinstance(state, QpassState):
        raise ValueError(f"{what} takes a model compiled by qpass.compile")
    return state


def _check_first_call(model: nn.Module, state: QpassState) -> None:
    """After the first call every graph of the model is captured: say what did not apply."""
    state.checked = True
    if not state.graphs_captured:
        warnings.warn(
            f"qpass captured no graph of {type(model).__name__}: Dynamo ran it eagerly, so it is NOT "
            "quantized (see the warning about the modules that ran eagerly for the cause)", stacklevel=4,
        )
    elif not state.plans:
        warnings.warn("qpass found no matmul or attention in this model: it runs unquantized", stacklevel=4)
    globs = [glob for glob, _ in state.recipe.rules] + list(state.recipe.exclude)
    for glob in globs:
        if glob not in state.matched_globs:
            warnings.warn(f"qpass: the glob {glob!r} matches no site (qpass.report lists them)", stacklevel=4)


# ---- what ran eagerly -----------------------------------------------------------------------------


def _weight_holders(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that hold a matrix (or larger) parameter of their own: where GEMM sites live."""
    return [
        (name, module) for name, module in model.named_modules()
        if any(p.ndim >= 2 and p.is_floating_point() for p in module.parameters(recurse=False))
    ]


class _Calls(threading.local):
    """Per thread, per compiled call in progress, the modules that ran outside a graph."""

    def __init__(self):
        self.eager: list[list[str]] = []


_CALLS = _Calls()


class _EagerWatch:
    """A forward pre-hook that records its module when it runs as plain Python. Traced by Dynamo it
    computes nothing (``is_compiling()`` is a constant there), and a compiled graph never calls it.
    A class, not a closure, so that a compiled model still pickles."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, module: nn.Module, args) -> None:
        if _CALLS.eager and not torch.compiler.is_compiling():
            _CALLS.eager[-1].append(self.name)


# Dynamo must not compile the hook as a frame of its own (an eagerly run caller would then see it
# "compiling"); inlined into a traced caller it still is.
torch._dynamo.eval_frame.skip_code(_EagerWatch.__call__.__code__)


def _dynamo_decisions() -> tuple[int, dict[str, int]]:
    """Frames Dynamo failed to compile so far, and how often it gave each reason for not compiling
    code (every call takes this snapshot: plain copies, the strings are read only after an alarm)."""
    counters = torch._dynamo.utils.counters
    failed = counters["frames"]["total"] - counters["frames"]["ok"]
    return failed, {**counters["unimplemented"], **counters["graph_break"]}


def _cause(before: tuple[int, dict[str, int]], after: tuple[int, dict[str, int]]) -> str:
    """Why modules ran eagerly in this call, from what Dynamo counted during it."""
    new = [reason for reason, count in after[1].items() if count != before[1].get(reason)]
    if any("recompile limit" in reason for reason in new):
        return ("Dynamo hit its recompile limit (torch._dynamo.config.recompile_limit) "
                "and ran the frame eagerly")
    if any("disable" in reason for reason in new):
        return "the code is excluded from compilation (torch.compiler.disable / torch._dynamo.disable)"
    if after[0] > before[0]:
        return "a frame failed to compile and Dynamo ran it eagerly (torch._dynamo.config.suppress_errors)"
    return ("Dynamo runs these frames eagerly since an earlier call (a frame it skips, or a limit hit "
            "before); TORCH_LOGS=graph_breaks,recompiles says more")


@contextlib.contextmanager
def _watching(model: nn.Module, state: QpassState):
    """Warn, at every call, about quantizable modules that ran outside any Dynamo graph."""
    before = _dynamo_decisions()
    _CALLS.eager.append([])
    try:
        yield
    finally:
        eager = _CALLS.eager.pop()
    if not eager or state.observe is not None:
        return
    # Modules whose every site stays in high precision anyway (embeddings, lm_head) are no loss.
    excluded = ({p.site.module for p in state.plans.values()}
                - {p.site.module for p in state.plans.values() if p.excluded is None})
    eager = sorted(set(eager) - excluded)
    if eager:
        warnings.warn(
            f"qpass: {type(model).__name__} ran {', '.join(eager)} eagerly, so they are NOT quantized: "
            f"{_cause(before, _dynamo_decisions())}", stacklevel=4,
        )


# ---- copies and pickles ----------------------------------------------------------------------------


def _reduce_state(state: QpassState):
    """A copy (or pickle) of a compiled model's state starts afresh (its graphs are captured again,
    with states of its own), takes the delayed-scaling histories with it, applied as the copy's
    sites are found, and compiles the model's copy, which ``copy`` and ``pickle`` reach first (the
    state's arguments name it, so the copy's arguments name the model's copy)."""
    args = (state.model, state.recipe, state.backend, dict(state.options), state.kernels, state.hooks,
            state.saved_tensors())
    return _restore_state, args


def _restore_state(model, recipe, backend, options, kernels, hooks, tensors) -> QpassState:
    state = QpassState(recipe, backend, options, kernels, pending=tensors)
    if model is not None:
        # The model's copy has copies of the hooks, which find this state; its __dict__ is filled
        # after this returns, by an update that keeps the compiled call.
        install(model, state, hooks)
    return state


copyreg.pickle(QpassState, _reduce_state)
