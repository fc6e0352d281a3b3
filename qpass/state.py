"""The state qpass keeps on a compiled model: its recipe, the sites found, delayed-scaling histories.

Data only: :mod:`qpass.capture` installs, copies and re-captures compiled models and fills this in.

It hangs off the model as the attribute ``_qpass`` but is not registered as a submodule (an
``nn.Sequential`` would call it as a layer, ``len()`` and indexing would change). Instead, hooks
put the amax histories of delayed scaling into the model's ``state_dict`` (as
``_qpass.<site>.<operand>.amax_history``) and take them back out on load. Sites, and so their
states, are only known once a graph is captured; a ``state_dict`` loaded before that is kept and
applied as each state is made.

The custom ops find a state by a string key (ops take no module arguments): the keys live in
:data:`qpass.ops.registry.DELAYED_STATES`, which holds them weakly, so a deleted model takes its
states with it.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import nn

from qpass.formats import DelayedScaling
from qpass.ops.registry import DELAYED_STATES

_HOLDER_IDS = itertools.count()


STATE_PREFIX = "_qpass."


class _Namespace(nn.Module):
    """An inner node of the state tree: holds no tensors of its own, so it loads nothing itself."""

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        pass


class _States(_Namespace):
    """The root of the state tree: a module of its own, so that a site's first name (``model`` of
    ``model.layers.0...``) never meets an attribute of :class:`QpassState`. An entry loaded before
    its state exists waits in the tree as a buffer of a namespace where the state will be, so that
    the tree is always what ``state_dict`` says (DCP walks its keys as attribute paths)."""

    def node(self, parents: list[str]) -> nn.Module:
        """The tree's node at ``parents``, namespaces made on the way."""
        node = self
        for name in parents:
            if name not in node._modules:
                node.add_module(name, _Namespace())
            node = node._modules[name]
        return node

    def add_pending(self, key: str, value: torch.Tensor) -> None:
        *parents, name = key.split(".")
        self.node(parents).register_buffer(name, value.detach().clone())

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # States that exist load themselves (their modules are visited after this one); keep the
        # rest until the graph that makes their state is captured.
        for key, value in state_dict.items():
            if key.startswith(prefix) and not isinstance(self._owner(key[len(prefix):]), DelayedScaling):
                self.add_pending(key[len(prefix):], value)

    def _owner(self, key: str) -> nn.Module | None:
        node = self
        for name in key.split(".")[:-1]:
            node = node._modules.get(name)
            if node is None:
                return None
        return node


class QpassState:
    def __init__(
        self, recipe, backend: str, options: dict, kernels: str = "reference", pending: dict | None = None,
        blocks: tuple[str, ...] = (),
    ):
        self.recipe = recipe
        self.backend = backend
        self.options = options  # torch.compile's (dynamic, fullgraph)
        self.kernels = kernels  # qpass.compile's kernels=: "auto", "triton", "interpret" or "reference"
        self.blocks = tuple(blocks)  # qpass.compile's blocks=: globs of modules compiled on their own
        self._model = None  # weak reference to the model this state is attached to
        self.hooks: list = []  # handles of the hooks on the model that go with this state
        self.plans: dict = {}  # site name -> SitePlan, across every captured graph
        self.notes: list[str] = []  # what the passes said about whole graphs (residual rotation)
        self.unrecognized: dict[str, str] = {}  # module -> why its weights are no site's (qpass.experts)
        self.calibration: dict[str, torch.Tensor] = {}  # site -> per-channel input max (qpass.calibrate)
        self.observe = None  # set while calibrating: graphs report their inputs instead of quantizing
        self.calibrated: dict[str, str] = {}  # site -> what calibration did to its weight (GPTQ), for report
        self.smoothing: dict[str, list[float]] = {}  # site -> SmoothQuant's scales (qpass.calibrate)
        self.matched_globs: set[str] = set()  # rule and exclude globs that matched a site
        self.graphs_captured = 0
        self.checked = False  # the first call's checks ran
        self._id = next(_HOLDER_IDS)
        self.states = _States()  # the delayed-scaling states, by site and operand
        for key, value in (pending or {}).items():  # loaded (or copied) before their states exist
            self.states.add_pending(key, value)

    @property
    def model(self) -> nn.Module | None:
        return None if self._model is None else self._model()

    def attach(self, model: nn.Module, hooks: list | None = None) -> None:
        """Hang this state off ``model`` (unregistered) and join its state_dict save and load;
        ``hooks``: the ones a copied model already has (its hook tables are copied with it)."""
        object.__setattr__(model, "_qpass", self)
        self._model = weakref.ref(model)
        self.hooks = hooks if hooks is not None else [
            model.register_state_dict_post_hook(_save_states),
            model.register_load_state_dict_pre_hook(_load_states),
        ]

    def detach_from(self, model: nn.Module) -> None:
        for hook in self.hooks:
            hook.remove()
        del model.__dict__["_qpass"]

    def saved_tensors(self, copy: bool = True) -> dict[str, torch.Tensor]:
        """Every delayed-scaling tensor, made or still pending (a copy's state starts from copies)."""
        tensors = self.states.state_dict()
        return {k: v.detach().clone() for k, v in tensors.items()} if copy else tensors

    def _fqn_modifiers(self) -> dict[str, str]:
        # torch.distributed.checkpoint walks state_dict keys as attribute paths: ``_qpass.<site>...``
        # goes on through the state tree.
        return {name: "states" for name in self.states._modules}

    def record(self, plans, notes: list[str]) -> None:
        """Keep the plans of one captured graph (a recompiled graph's sites replace their old plans)."""
        self.graphs_captured += 1
        plans = [plan.noted(self.calibrated[plan.name]) if plan.name in self.calibrated else plan
                 for plan in plans]
        self.plans.update((plan.name, plan) for plan in plans)
        self.notes += [note for note in notes if note not in self.notes]

    def restart(self, *, observe=None, calibration: dict | None = None) -> None:
        """Forget the captured graphs and set what the next captures use: an observer while
        calibrating, or calibration statistics."""
        self.plans, self.notes, self.unrecognized, self.graphs_captured = {}, [], {}, 0
        self.checked = observe is not None  # the first-call checks are for the quantized graphs
        self.observe = observe
        if calibration is not None:
            self.calibration = calibration

    def delayed_scaling(self, site: str, operand: str, quantizer) -> str:
        """The key of the delayed-scaling state of ``operand`` at ``site``, made on first use
        (with the quantizer's power-of-two option: under delayed scaling the state owns it)."""
        path = f"{site}.{operand}"
        key = f"{self._id}/{path}"
        if key in DELAYED_STATES:
            return key
        *parents, leaf = path.split(".")
        node = self.states.node(parents)
        state = DelayedScaling(self.recipe.history_len, self.recipe.margin, pow2=quantizer.pow2)
        pending = node._modules.get(leaf)  # a namespace of what was loaded for it
        if pending is not None:
            state.load_state_dict(dict(pending.named_buffers()))
        node._modules[leaf] = state
        return DELAYED_STATES.register(state, key)


# The hooks find the state on the module they are called for, so copies of a model (whose hook
# tables are copied with it) save and load their own states. Histories still pending (loaded, or
# copied, before the first call) are saved too: a state_dict never drops them.
def _save_states(module, state_dict, prefix, local_metadata) -> None:
    state = module.__dict__["_qpass"]
    for key, value in state.saved_tensors(copy=False).items():
        state_dict[prefix + STATE_PREFIX + key] = value


def _load_states(
    module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
):
    ours = {k: state_dict.pop(k) for k in list(state_dict) if k.startswith(prefix + STATE_PREFIX)}
    own = {k[len(prefix + STATE_PREFIX) :]: v for k, v in ours.items()}
    result = module.__dict__["_qpass"].states.load_state_dict(own, strict=strict)
    missing_keys += [prefix + STATE_PREFIX + k for k in result.missing_keys]
