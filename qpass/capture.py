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
from fnmatch import fnmatchcase

import torch
from torch import fx, nn

from qpass.distributed import world_size
from qpass.experts import ExpertGemm, ExpertGemms, expert_weights, loop_experts, unrecognized
from qpass.passes import Target, quantize_graph
from qpass.passes.sites import ModelContext, frame_path
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
    model: nn.Module | None = None, region: str = "",
) -> None:
    """Run the passes on one captured graph as ``state`` says, and record its plans there;
    ``model``: the model Dynamo traced it from (a torch.export graph is traced from its root), and
    ``region``: the path of the module whose compiled call traced it ("" for the model's own)."""
    recipe = state.recipe
    new_state = state.delayed_scaling if recipe.scaling == "delayed" else None
    context = ModelContext() if model is None else ModelContext.of(model)
    plans, notes = quantize_graph(
        gm, parameters, recipe, state.matched_globs, new_state, state.calibration, state.observe, target,
        context, state.smoothing,
    )
    if state.observe is None:
        state.record(plans if model is None else _placed(plans, model, context, region), notes)


def _placed(plans: list, model: nn.Module, context: ModelContext, region: str) -> list:
    """``plans``, with a note on each site traced in a frame other than its region's own module: a
    graph break inside a submodule makes Dynamo resume in that module's own frame, whose graph runs
    for every instance the frame's guards accept (every layer of a stack), under the one name of the
    instance it was traced for. Said in the report and in a warning, never silently."""
    def placed(site) -> bool:
        # Dynamo keys the stack by the modules' ids. An op of the region module's own forward has no
        # stack (nor, alas, one of a plain function a resumed frame calls: the two look alike).
        stack = site.node.meta.get("nn_module_stack") or {}
        if not stack:
            return True
        raw, relative = context.raw.get(next(reversed(stack))), frame_path(site.node)
        if raw is None or not (raw == relative or raw.endswith(f".{relative}")):
            return False
        # The module the frame was traced for: the region's, or one that wraps it (DDP's).
        frame_module = raw[: len(raw) - len(relative)].rstrip(".")
        return (context.unwrapped(frame_module) == context.unwrapped(region)
                or _only_instance(model, region, frame_module))

    relative = [plan.name for plan in plans if not placed(plan.site)]
    if not relative:
        return plans
    warnings.warn(
        f"qpass: {type(model).__name__}'s graph broke inside a submodule: Dynamo resumed in that module's "
        f"own frame, so the graph of the sites {', '.join(relative)} may run for other instances of that "
        "module too (every layer), under these names: pass blocks= to qpass.compile (e.g. "
        "blocks='model.layers.*') to compile each such module on its own (qpass.report marks them)",
        stacklevel=5,
    )
    note = ("traced in a frame Dynamo resumed after a graph break inside a submodule: this site may stand "
            "for that module in every instance (e.g. every layer); blocks= compiles each on its own")
    return [plan.noted(note) if plan.name in relative else plan for plan in plans]


def _only_instance(model: nn.Module, region: str, raw: str) -> bool:
    """A frame traced inside a block's cache region for one of its submodules runs for that submodule
    alone, unless the block holds other instances of its class (whose calls share its code)."""
    if not region or not raw.startswith(f"{region}."):
        return False
    block, module = model.get_submodule(region), model.get_submodule(raw)
    return sum(type(m) is type(module) for m in block.modules()) == 1


class _Backend:
    """The torch.compile backend: quantize the captured graph, then compile it. Dynamo keeps every
    backend until ``torch._dynamo.reset()``: this one holds its model's state weakly, so that the
    state (plans, packed weights) goes with the model. ``region``: the path of the module whose
    compiled call this backend compiles ("" for the model, else a block's)."""

    def __init__(self, state: QpassState, region: str = ""):
        self._state = weakref.ref(state)
        self._region = region

    def __call__(self, gm: fx.GraphModule, example_inputs):
        state = self._state()
        on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
        target = Target(state.kernels, on_cuda, frozen=not torch.is_grad_enabled(),
                        sync_amax=state.recipe.sync_amax and world_size() > 1)
        quantize_captured(gm, dynamo_parameters(gm), state, target, state.model, self._region)
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


def _compiled(state: QpassState, region: str = ""):
    """A Dynamo-compiled call of a module, in a cache region of its own."""
    backend = _Backend(state, region)
    return torch.compile(_own_code(_call_module), backend=backend, **_ISOLATED, **state.options)


class CompiledCall:
    """What a compiled model's ``__call__`` runs: its Dynamo-compiled forward, compiled at the first
    call (a copy's state is complete only then), watched for modules that ran eagerly. The first
    call also gives each block (:func:`_blocks`) a compiled call of its own, and each experts module
    that runs transformers' eager loop its :class:`ExpertsCall`."""

    def __init__(self, model: nn.Module):
        self._model = weakref.ref(model)  # the model holds this call: no reference cycle
        self._compiled = None
        self._blocks: list[tuple[nn.Module, object]] = []  # (block or experts, the boundary hook's handle)
        self._fsdp_gathers_pending = False

    def __call__(self, *args, **kwargs):
        model = self._model()
        state = model.__dict__["_qpass"]
        if self._compiled is None:
            experts = loop_experts(model)
            # A model that is itself an eager-loop experts module runs as one, with nothing to compile.
            self._compiled = (ExpertsCall(model, state, "") if experts and experts[0][0] == ""
                              else _compiled(state))
            self._blocks = [(block, _install_call(block, BlockCall(block, state, region)))
                            for region, block in _blocks(model, state)]
            self._blocks += [(module, _install_call(module, ExpertsCall(module, state, path)))
                             for path, module in experts if path]
        if self._fsdp_gathers_pending:
            # Between two calls, when FSDP2 holds only shards and no autograd graph an unsharded
            # weight: the first call found the sites, and so which weights all-gather as codes.
            self._fsdp_gathers_pending = False
            _gather_in_low_precision(model, state)
        with _watching(model, state):
            out = (self._compiled(*args, **kwargs) if isinstance(self._compiled, ExpertsCall)
                   else self._compiled(model, *args, **kwargs))
        if not state.checked:
            _check_first_call(model, state)
            self._fsdp_gathers_pending = any(_fsdp_unit(m) for m in [model, *(b for b, _ in self._blocks)])
        return out

    def detach_blocks(self) -> None:
        for block, handle in self._blocks:
            block.__dict__.pop("_compiled_call_impl", None)
            if handle is not None:
                handle.remove()
        self._blocks = []


# ---- blocks: modules compiled on their own ---------------------------------------------------------


def _fsdp_unit(module: nn.Module) -> bool:
    """A module ``fully_shard`` made a unit of FSDP2: its hooks, which Dynamo runs eagerly, break any
    graph that calls it, and Dynamo would trace it in a frame of its own that every unit shares."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _gather_in_low_precision(model: nn.Module, state: QpassState) -> None:
    """FSDP2's all-gathers of the weights that one per-tensor scale quantizes, in FP8 from the next
    call on (:mod:`qpass.fsdp`), said in the report."""
    from qpass import fsdp

    for name in fsdp.gather_in_low_precision(model, state.plans, ModelContext.of(model).paths):
        plan = state.plans[name]
        state.plans[name] = plan.noted(
            f"fsdp2: weight all-gathered as {plan.products[0].quantizers.b} codes")


def _blocks(model: nn.Module, state: QpassState) -> list[tuple[str, nn.Module]]:
    """The outermost submodules that the model's ``blocks`` globs name (by the unwrapped paths that
    site names use), and every FSDP2 unit below the model, as ``(path in named_modules, module)``;
    and the layer (an element of a ``ModuleList``, else the caller) around each eager-loop experts
    module, which breaks the graph inside it: a graph break in the loop over layers makes Dynamo run
    every layer from one frame of its own, under the first layer's names."""
    paths = ModelContext.of(model).paths
    chosen: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(f"{outer}.") for outer, _ in chosen):
            continue
        path = paths[str(id(module))]
        matched = [glob for glob in state.blocks if fnmatchcase(path, glob)]
        state.matched_globs.update(matched)
        if matched or _fsdp_unit(module):
            chosen.append((name, module))
    modules = dict(model.named_modules())
    layers = {_layer(name, modules) for name, _ in loop_experts(model)}
    layers -= {"", *(name for name, _ in chosen)}
    return chosen + [(name, modules[name]) for name in sorted(layers)]


def _layer(name: str, modules: dict[str, nn.Module]) -> str:
    """The outermost element of a ``ModuleList`` that holds module ``name``, else its parent."""
    parts = name.split(".")
    for end in range(1, len(parts)):
        if isinstance(modules[".".join(parts[:end - 1])], nn.ModuleList):
            return ".".join(parts[:end])
    return name.rpartition(".")[0]


def _block_boundary(module: nn.Module, args) -> None:
    """A hook that makes Dynamo, tracing a call of the block, go through the block's ``__call__`` (it
    inlines the forward of a module without hooks, compiled call or not)."""


def _install_call(module: nn.Module, call):
    """Make ``call`` what the module's ``__call__`` runs; returns the boundary hook's handle (None: a
    copy's module has the hook)."""
    module.__dict__["_compiled_call_impl"] = call
    if any(hook is _block_boundary for hook in module._forward_pre_hooks.values()):
        return None
    return module.register_forward_pre_hook(_block_boundary)


class BlockCall:
    """What a block's ``__call__`` runs: its own compiled call, in a cache region of its own, so that
    no two blocks share a graph (nor a recompile limit). Dynamo tracing a caller runs it as a graph
    break (it is ``disable``d there): inlined, the block would be part of the caller's graph."""

    def __init__(self, block: nn.Module, state: QpassState, region: str):
        self._block = weakref.ref(block)
        self._state = state  # the model holds the state, and the block this call: no cycle
        self._region = region
        self._compiled = None

    @torch._dynamo.disable
    def __call__(self, *args, **kwargs):
        if self._compiled is None:
            self._compiled = _compiled(self._state, self._region)
        return self._compiled(self._block(), *args, **kwargs)


class ExpertsCall:
    """What an eager-loop experts module's ``__call__`` runs (:mod:`qpass.experts`): its forward,
    eagerly, each expert's GEMM quantized as a graph of its own. Dynamo runs that forward eagerly
    anyway; tracing a caller, it meets this call as a graph break (it is ``disable``d there) where
    it would have broken the graph on the loop itself."""

    def __init__(self, module: nn.Module, state: QpassState, raw_path: str):
        self._module = weakref.ref(module)
        self._state = state
        self._path = raw_path
        self._gemms: dict[tuple, ExpertGemm] = {}

    @torch._dynamo.disable
    def __call__(self, *args, **kwargs):
        module = self._module()
        _CALLS.eager.append([])
        try:
            with ExpertGemms(expert_weights(module), self._gemm):
                return module._call_impl(*args, **kwargs)
        finally:
            # The experts run eagerly by design, their GEMMs quantized; a module inside them that ran
            # eagerly too is still reported.
            ran = _CALLS.eager.pop()
            if _CALLS.eager:
                _CALLS.eager[-1] += [name for name in ran if name != self._path]

    def _gemm(self, kind: str, attribute: str, x: torch.Tensor, bias: torch.Tensor | None) -> ExpertGemm:
        """The quantized graph of this GEMM, captured at its first call (and for each dtype, and with
        and without gradients, as Dynamo would recompile)."""
        grad = torch.is_grad_enabled()
        key = (kind, attribute, bias is not None, x.dtype, x.device, grad)
        if key not in self._gemms:
            module, state = self._module(), self._state
            weight = getattr(module, attribute)
            gemm = ExpertGemm(module, self._path, kind, x, weight, attribute, bias)
            target = Target(state.kernels, x.is_cuda, frozen=not grad,
                            sync_amax=state.recipe.sync_amax and world_size() > 1)
            quantize_captured(gemm, {gemm.weight_node: weight}, state, target, state.model)
            self._gemms[key] = gemm
        return self._gemms[key]


torch._dynamo.eval_frame.skip_code(_block_boundary.__code__)


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
    model.__dict__.pop("_compiled_call_impl").detach_blocks()


def recapture(model: nn.Module, *, observe=None, calibration: dict | None = None) -> None:
    """Forget the captured graphs: the model's next call captures them afresh, calibrating with
    ``observe`` or quantizing with ``calibration`` statistics."""
    model.__dict__["_qpass"].restart(observe=observe, calibration=calibration)
    model.__dict__["_compiled_call_impl"].detach_blocks()
    model.__dict__["_compiled_call_impl"] = CompiledCall(model)


_INSTALLED_CALLS = (CompiledCall, BlockCall, ExpertsCall)  # what qpass puts in a module's __call__


@contextlib.contextmanager
def uncompiled(model: nn.Module):
    """Run ``model``, its blocks included, as plain Python (torch.export traces it itself)."""
    saved = {module: module.__dict__.pop("_compiled_call_impl") for module in model.modules()
             if isinstance(module.__dict__.get("_compiled_call_impl"), _INSTALLED_CALLS)}
    try:
        yield model
    finally:
        for module, call in saved.items():
            module.__dict__["_compiled_call_impl"] = call


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
    state.unrecognized = unrecognized(model, state.plans, ModelContext.of(model))
    for module, why in state.unrecognized.items():
        warnings.warn(f"qpass: {module} is NOT quantized: {why} (qpass.report lists it)", stacklevel=4)
    globs = [glob for glob, _ in state.recipe.rules] + list(state.recipe.exclude) + list(state.blocks)
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
            state.saved_tensors(), state.blocks)
    return _restore_state, args


def _restore_state(model, recipe, backend, options, kernels, hooks, tensors, blocks=()) -> QpassState:
    state = QpassState(recipe, backend, options, kernels, pending=tensors, blocks=blocks)
    if model is not None:
        # The model's copy has copies of the hooks, which find this state; its __dict__ is filled
        # after this returns, by an update that keeps the compiled call.
        install(model, state, hooks)
    return state


copyreg.pickle(QpassState, _reduce_state)
