"""``qpass.calibrate``: what an inference recipe learns from sample batches.

Calibration runs the compiled model on sample batches with its graphs transformed (rotations
included) but not quantized, each linear site reporting its input (:mod:`qpass.passes.observe`),
then has the graphs captured again with what was learnt:

- outlier channel splitting (``ocs=``) chooses the channels to split from each split site's
  per-channel input maximum instead of from the weights;
- SmoothQuant (``smooth=``) takes its per-channel scales from the same maxima
  (:mod:`qpass.passes.smooth`);
- ``method="gptq"`` (or a :class:`~qpass.gptq.GPTQ` with options) replaces each quantized linear
  weight by its GPTQ solution on the site's own grid (:mod:`qpass.gptq`), from ``XᵀX`` of the
  site's inputs after its rotation. The graph is the same; the weights are new, and each is a fixed
  point of its quantizer, so the model quantizes them to GPTQ's codes. ``method="rtn"`` (the
  default) leaves the weights to round-to-nearest.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qpass import capture
from qpass.gptq import GPTQ, gptq_weight
from qpass.passes.plan import SitePlan
from qpass.passes.smooth import smoothing_scales
from qpass.quantizer import Quantizer
from qpass.rotation import Rotation
from qpass.stored import StoredWeight

METHODS = ("rtn", "gptq")


def calibrate(model: nn.Module, batches: Iterable, method: str | GPTQ = "rtn") -> nn.Module:
    """Run ``model`` (compiled by :func:`qpass.compile` with an inference recipe) on ``batches``
    (each a tensor, a tuple of positional arguments or a dict of keyword arguments) and use what
    its sites saw: OCS statistics and SmoothQuant scales where the recipe asks for them, and with
    ``method="gptq"`` new weights; returns ``model``."""
    state = capture.state_of(model, "qpass.calibrate")
    recipe = state.recipe
    gptq = _gptq_config(method)
    splits = recipe.ocs is not None or any("ocs" in overrides for _, overrides in recipe.rules)
    smooths = recipe.smooth is not None or any("smooth" in overrides for _, overrides in recipe.rules)
    if gptq is None and not (splits or smooths):
        raise ValueError("qpass.calibrate with method='rtn' collects statistics for outlier channel "
                         "splitting and SmoothQuant: compile with ocs=<ratio> or smooth=<alpha>, or "
                         "calibrate with method='gptq'")
    if recipe.quantizes_backward:
        raise ValueError(f"calibration (input-driven channel splitting, GPTQ) is for inference recipes; "
                         f"{recipe.name!r} trains, and its weights keep changing")
    if gptq is not None and splits:
        raise ValueError("method='gptq' does not combine with ocs=: a split channel's two halves would "
                         "need weights of their own, which the model's parameter does not have")
    stored = [name for name, p in model.named_parameters() if isinstance(p, StoredWeight)]
    if stored:
        raise ValueError(f"this model's weights are stored quantized ({stored[0]} and {len(stored) - 1} "
                         "more, loaded by qpass.from_pretrained): calibrate the high-precision model, "
                         "then save it")
    batches = list(batches)
    maxima: dict[str, Tensor] = {}
    if splits or smooths:
        plans: dict[str, SitePlan] = {}

        def observe_maxima(plan: SitePlan, x: Tensor) -> None:
            if plan.ocs is not None or plan.smooth is not None:
                channel_max = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float().cpu()
                previous = maxima.get(plan.name)
                maxima[plan.name] = channel_max if previous is None else torch.maximum(previous, channel_max)
                plans[plan.name] = plan

        if smooths:
            state.smoothing = {}  # the maxima are those of the unsmoothed inputs
        _observe(model, batches, observe_maxima)
        if not maxima:
            raise ValueError("calibration saw no input of a site that outlier channel splitting or "
                             "SmoothQuant applies to")
        if smooths:
            state.smoothing = _smoothing_scales(model, plans, maxima)
    if gptq is not None:
        # After SmoothQuant's scales are chosen: its graphs are smoothed while observed, so GPTQ sees
        # the inputs and the weights that the quantizers will.
        inputs: dict[str, _Inputs] = {}
        _observe(model, batches, lambda plan, x: inputs.setdefault(plan.name, _Inputs(plan)).add(x))
        if not inputs:
            raise ValueError("calibration saw no input of a quantized linear site: nothing for GPTQ")
        state.calibrated = _replace_weights(model, inputs, gptq, state.smoothing)
    capture.recapture(model, calibration=maxima if splits else None)
    return model


def _smoothing_scales(model: nn.Module, plans: dict[str, SitePlan], maxima: dict[str, Tensor]) -> dict:
    """SmoothQuant's ``s`` per smoothed site; the sites that fold into one norm share theirs."""
    groups: dict[tuple, list[SitePlan]] = {}
    for plan in plans.values():
        if plan.smooth is not None:
            groups.setdefault(plan.smooth_norm or (plan.name,), []).append(plan)
    scales = {}
    for group in groups.values():
        weight_max = torch.stack([
            model.get_parameter(p.site.parameter).detach().abs().movedim(p.site.op.weight_k_axis, -1)
            .reshape(-1, maxima[p.name].numel()).amax(0).float().cpu() for p in group]).amax(0)
        input_max = torch.stack([maxima[p.name] for p in group]).amax(0)
        s = smoothing_scales(group[0].smooth, input_max, weight_max)
        scales.update((p.name, s) for p in group)
    return scales


def _observe(model: nn.Module, batches: list, observe) -> None:
    """Run ``batches`` through graphs captured anew that report each site's input to ``observe``."""
    capture.recapture(model, observe=observe)
    with torch.no_grad():
        for batch in batches:
            _run(model, batch)


def _gptq_config(method: str | GPTQ) -> GPTQ | None:
    if isinstance(method, GPTQ):
        return method
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {', '.join(METHODS)} "
                         "or a qpass.GPTQ with options")
    return GPTQ() if method == "gptq" else None


def _run(model: nn.Module, batch) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


class _Inputs:
    """``Σ XᵀX`` (float64) of one site's inputs as its GEMM sees them, rotated, and their count."""

    def __init__(self, plan: SitePlan):
        self.plan = plan
        self.sum: Tensor | None = None
        self.count = 0

    @property
    def quantizers(self):
        return self.plan.products[0].quantizers

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        rotation = self.quantizers.rotation
        if rotation is not None:
            x = rotation(x, -1)
        xtx = x.T @ x
        self.sum = xtx if self.sum is None else self.sum + xtx
        self.count += x.shape[0]


@dataclass(frozen=True)
class _Target:
    """Where a site's new weight goes: its parameter, with what the graph does to it before the
    quantizer: SmoothQuant's scales (powers of two, so exact both ways) and the site's rotation."""

    parameter: nn.Parameter
    k_axis: int
    quantizer: Quantizer
    rotation: Rotation | None
    smoothing: list[float] | None

    def gemm_weight(self) -> Tensor:
        """The ``[N, K]`` weight as the quantizer receives it."""
        weight = self.parameter.detach().movedim(self.k_axis, -1).float().cpu()
        if self.smoothing is not None:
            weight = weight * torch.tensor(self.smoothing, dtype=torch.float32)
        return weight if self.rotation is None else self.rotation(weight, -1)

    def store(self, gemm_weight: Tensor) -> None:
        """Set the parameter to what the graph turns into ``gemm_weight``."""
        weight = gemm_weight.double()
        if self.rotation is not None:
            weight = self.rotation(weight, -1, inverse=True)
        if self.smoothing is not None:
            weight = weight / torch.tensor(self.smoothing, dtype=torch.float64)
        self.parameter.copy_(weight.float().movedim(-1, self.k_axis))


def _target(model: nn.Module, plan: SitePlan, smoothing: dict[str, list[float]]) -> _Target | str:
    """The site's GPTQ target, or why it has none."""
    if plan.rotated_weight:
        return "the residual-stream rotation computes its weight from several parameters"
    q = plan.products[0].quantizers
    if q.b is None:
        return "the recipe does not quantize its weight"
    if not plan.site.parameter:
        return "its weight is not a parameter"
    parameter = model.get_parameter(plan.site.parameter)
    if parameter.ndim != 2 or parameter.dtype != torch.float32:
        return f"its weight is {parameter.ndim}-D {parameter.dtype}; GPTQ here takes 2-D fp32 weights"
    return _Target(parameter, plan.site.op.weight_k_axis, q.b, q.rotation, smoothing.get(plan.name))


def _replace_weights(
    model: nn.Module, inputs: dict[str, _Inputs], config: GPTQ, smoothing: dict[str, list[float]]
) -> dict[str, str]:
    """Each observed site's weight replaced by GPTQ's; returns a note per site for the report."""
    targets = {name: _target(model, seen.plan, smoothing) for name, seen in inputs.items()}
    shared: dict[int, list[str]] = {}
    for name, target in targets.items():
        if isinstance(target, _Target):
            shared.setdefault(id(target.parameter), []).append(name)
    notes = {}
    done = 0
    todo = sum(isinstance(t, _Target) for t in targets.values())
    for name, target in targets.items():
        if not isinstance(target, _Target):
            notes[name] = f"gptq: not applied ({target})"
            continue
        others = len(shared[id(target.parameter)]) - 1
        if others:
            notes[name] = f"gptq: not applied (its weight is shared with {others} other site(s))"
            continue
        seen = inputs[name]
        with torch.no_grad():
            solved = gptq_weight(target.gemm_weight(), seen.sum / seen.count, target.quantizer, config)
            target.store(solved.weight)
            notes[name] = "gptq: " + _fidelity(target, solved.values)
        done += 1
        print(f"\rqpass.calibrate: GPTQ {done}/{todo} sites", end="", file=sys.stderr, flush=True)
    if todo:
        print(file=sys.stderr)
    return notes


def _fidelity(target: _Target, values: Tensor) -> str:
    """Whether the site now quantizes its weight to GPTQ's values (under a rotation the weight is
    stored unrotated, in fp32, and that rounding can move a value across a grid boundary)."""
    runs = target.quantizer(target.gemm_weight(), -1)
    differ = int((runs != values).sum())
    if differ == 0:
        return "weight replaced; the site quantizes it to GPTQ's values exactly"
    return (f"weight replaced; {differ} of {runs.numel()} quantized values differ from GPTQ's "
            "(the rotated weight is rounded to fp32)")
