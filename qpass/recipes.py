"""Recipes: which quantizer each operand role of each GEMM gets (SPEC sections 6 and 8).

A linear layer's training step runs three GEMMs, each with two operand roles:

    fprop  Y  = Q(X)  · Q(W)ᵀ        roles input, weight
    dgrad  dX = Q(dY) · Q(W)         roles grad_output, weight
    wgrad  dW = Q(dY)ᵀ · Q(X)        roles grad_output, input

A :class:`Recipe` names a quantizer per role (``input``, ``weight``, ``grad_output``, the same in
every GEMM that role appears in) and may change single GEMM roles through ``per_gemm``, a typed
:class:`GemmOverrides` (one field per GEMM role, as torchao's float8 per-role cast configs; built
from keys such as ``"wgrad.input"`` too). A recipe that quantizes nothing in backward is an
inference recipe: its sites get plain quantize-dequantize nodes and a straight-through backward.

Two function-preserving transforms keep low-bit formats accurate: ``hadamard`` rotates GEMM
operands (:mod:`qpass.rotation`, and the residual stream of Llama-style models) and ``ocs``
splits outlier channels (:mod:`qpass.passes.ocs`).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, fields, replace

from qpass.formats.dge import DGE
from qpass.formats.spec import NVFP4_SCALE_MODES, SCALE_MODES, scale_modes_by_family
from qpass.quantizer import Quantizer, as_quantizer
from qpass.rotation import Hadamard, Rotation

GEMM_ROLES: dict[str, tuple[str, str]] = {
    "fprop": ("input", "weight"),
    "dgrad": ("grad_output", "weight"),
    "wgrad": ("grad_output", "input"),
}
ROLES = ("input", "weight", "grad_output")
# Plus "dgrad.input": in a product of two activations (attention's Q·Kᵀ and P·V) the dgrad's second
# operand is an activation where a linear layer's is the weight.
GEMM_ROLE_KEYS = (*(f"{gemm}.{role}" for gemm, roles in GEMM_ROLES.items() for role in roles), "dgrad.input")
REUSED_FORWARD_KEYS = ("dgrad.weight", "dgrad.input", "wgrad.input")
SCALINGS = ("current", "delayed")


class _Unset:
    """One object, kept by copies and pickles (roles are tested against it by identity)."""

    def __repr__(self) -> str:
        return "UNSET"

    def __reduce__(self) -> str:
        return "UNSET"

    def __deepcopy__(self, memo) -> _Unset:
        return self


UNSET = _Unset()  # a GEMM role that follows its role's quantizer (None would keep it in high precision)


@dataclass(frozen=True)
class GemmOverrides:
    """Quantizers of single GEMM roles, each overriding its role's quantizer in that GEMM only
    (None: high precision there; :data:`UNSET`: as the role). Read as a mapping from the keys of
    :data:`GEMM_ROLE_KEYS` (``"wgrad.input"``) to the roles that are set."""

    fprop_input: Quantizer | None | _Unset = UNSET
    fprop_weight: Quantizer | None | _Unset = UNSET
    dgrad_grad_output: Quantizer | None | _Unset = UNSET
    dgrad_weight: Quantizer | None | _Unset = UNSET
    dgrad_input: Quantizer | None | _Unset = UNSET  # a product of two activations (attention)
    wgrad_grad_output: Quantizer | None | _Unset = UNSET
    wgrad_input: Quantizer | None | _Unset = UNSET

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not UNSET:
                object.__setattr__(self, f.name, as_quantizer(value))

    @staticmethod
    def _field(key: str) -> str:
        return key.replace(".", "_")  # "wgrad.input" -> wgrad_input

    @staticmethod
    def parse(value) -> GemmOverrides:
        """From a GemmOverrides or a dict keyed ``"gemm.role"``."""
        if isinstance(value, GemmOverrides):
            return value
        unknown = set(value) - set(GEMM_ROLE_KEYS)
        if unknown:
            raise ValueError(
                f"unknown per_gemm keys {sorted(unknown)}; expected some of {', '.join(GEMM_ROLE_KEYS)}")
        return GemmOverrides(**{GemmOverrides._field(key): quantizer for key, quantizer in value.items()})

    def items(self) -> list[tuple[str, Quantizer | None]]:
        return [(key, q) for key in GEMM_ROLE_KEYS
                if (q := getattr(self, GemmOverrides._field(key))) is not UNSET]

    def __iter__(self):
        return iter(key for key, _ in self.items())

    def __contains__(self, key: str) -> bool:
        return key in GEMM_ROLE_KEYS and getattr(self, GemmOverrides._field(key)) is not UNSET

    def __getitem__(self, key: str) -> Quantizer | None:
        if key not in self:
            raise KeyError(key)
        return getattr(self, GemmOverrides._field(key))

    def merged(self, other: GemmOverrides) -> GemmOverrides:
        """These overrides with ``other``'s set roles on top."""
        return replace(self, **{GemmOverrides._field(key): q for key, q in other.items()})

    def map(self, change) -> GemmOverrides:
        """Every set quantizer changed by ``change`` (None stays None)."""
        return replace(
            self, **{GemmOverrides._field(key): q if q is None else change(q) for key, q in self.items()})


@dataclass
class Recipe:
    name: str = "custom"
    input: Quantizer | None = None
    weight: Quantizer | None = None
    grad_output: Quantizer | None = None
    per_gemm: GemmOverrides = field(default_factory=GemmOverrides)  # or {"wgrad.input": None}
    scaling: str = "current"  # "delayed": per-tensor scales from an amax history (FP8-LM, TE)
    history_len: int = 16
    margin: int = 0
    attention: bool = False  # quantize Q·Kᵀ and P·V with the input quantizer
    exclude: list[str] = field(default_factory=list)  # globs over site names
    rules: list[tuple[str, dict]] = field(default_factory=list)  # (glob, overrides), later rules win
    hadamard: Hadamard = field(default_factory=Hadamard)  # or any form Hadamard.parse takes
    ocs: float | None = None  # outlier channel splitting: extra input channels per channel
    smooth: float | None = None  # SmoothQuant's α (calibrated): input outliers migrated into the weights
    # FP4 training (arXiv 2501.17116): the differentiable gradient estimator on the forward's weight
    # quantization (True: DGE(k=5, clamp=3)); outlier clamping at this per-token quantile, with the
    # clamped-off residual multiplied in high precision; backward GEMMs on the forward's operands.
    dge: DGE | bool | None = None
    occ: float | None = None
    reuse_forward: bool = False
    # Under a process group of several ranks, per-tensor amaxes are the MAX across them (qpass.distributed).
    sync_amax: bool = True
    description: str = ""
    notes: str = ""  # shown by qpass.report: what the recipe asks for that is not applied yet

    def __post_init__(self) -> None:
        for role in ROLES:
            setattr(self, role, as_quantizer(getattr(self, role)))
        self.per_gemm = GemmOverrides.parse(self.per_gemm)
        if self.scaling not in SCALINGS:
            raise ValueError(f"unknown scaling {self.scaling!r}; expected one of {', '.join(SCALINGS)}")
        if self.scaling == "delayed":
            not_per_tensor = [str(q) for q in self.quantizers() if not q.per_tensor]
            if not_per_tensor:
                raise ValueError(
                    f"scaling='delayed' needs per-tensor absmax quantizers (fp8_*/fp6_*/fp4_e2m1 with "
                    f"granularity 'tensor'); recipe {self.name!r} has {', '.join(not_per_tensor)}"
                )
        self.hadamard = Hadamard.parse(self.hadamard)
        rotates_gemms = any((self.hadamard.fprop, self.hadamard.dgrad, self.hadamard.wgrad))
        if self.scaling == "delayed" and rotates_gemms:
            raise ValueError("scaling='delayed' quantizes each operand once for both its GEMMs; "
                             "a GEMM rotation makes them differ")
        if self.hadamard.fprop is not None and self.hadamard.fprop.resample:
            raise ValueError(
                "a resampled rotation (fresh signs per call) applies to the backward GEMMs, dgrad and wgrad")
        self.dge = DGE() if self.dge is True else (self.dge or None)
        self._check_fp4_training(rotates_gemms)
        if self.ocs is not None and not (isinstance(self.ocs, (int, float)) and 0 < self.ocs <= 1):
            raise ValueError(f"ocs= is an expand ratio in (0, 1] (0.01-0.05 is typical), got {self.ocs!r}")
        if self.smooth is not None:
            if not (isinstance(self.smooth, (int, float)) and 0 < self.smooth < 1):
                raise ValueError(f"smooth= is SmoothQuant's migration strength alpha in (0, 1) (0.5 is "
                                 f"typical), got {self.smooth!r}")
            if self.hadamard.residual is not None:
                raise ValueError("smooth= scales the norms' weights, which the residual-stream rotation "
                                 "folds into the linears: use one or the other")
        if self.attention and self.input is None:
            raise ValueError(f"attention=True quantizes Q, K, P and V with the input quantizer; "
                             f"recipe {self.name!r} has none")
        for rule in self.rules:
            if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
                    and isinstance(rule[1], dict)):
                raise TypeError(f"a rule is (glob, {{override: value}}), got {rule!r}")
            check_override_keys(rule[1], RULE_KEYS, "rule")
            if Hadamard.parse(rule[1].get("hadamard")).residual:
                raise ValueError("the residual-stream rotation is whole-model: "
                                 "set hadamard='residual' on the recipe, not in a rule")
            # A rule's values are checked now, not when a site it matches is first traced.
            changes = {key: value for key, value in rule[1].items() if key != "exclude"}
            replace(self, rules=[]).with_overrides(**changes)

    def _check_fp4_training(self, rotates_gemms: bool) -> None:
        if self.dge is not None and not isinstance(self.dge, DGE):
            raise TypeError(f"dge= takes True, False/None or a qpass.DGE, got {self.dge!r}")
        if self.dge is not None and (self.weight is None or self.scaling == "delayed"):
            raise ValueError("dge= reshapes the weight's gradient with its current-scaled quantizer: "
                             "it needs weight= and scaling='current'")
        if self.dge is not None and self.hadamard.fprop is not None:
            raise ValueError("dge= works on the weight's own grid; "
                             "a forward rotation quantizes the rotated weight instead")
        if self.occ is not None and not (isinstance(self.occ, (int, float)) and 0.5 < self.occ <= 1):
            raise ValueError(
                f"occ= is the clamping quantile alpha in (0.5, 1] (0.99 in the paper), got {self.occ!r}")
        if self.occ is not None and self.input is None:
            raise ValueError(
                f"occ= clamps the input before its quantizer; recipe {self.name!r} quantizes no input")
        if self.reuse_forward:
            requantized = sorted(set(self.per_gemm) & set(REUSED_FORWARD_KEYS))
            if requantized:
                raise ValueError(f"reuse_forward=True takes the backward's weight and input from the "
                                 f"forward, so per_gemm cannot set {requantized}")
            if rotates_gemms:
                raise ValueError("reuse_forward=True reuses unrotated forward operands in backward: "
                                 "it cannot be combined with GEMM rotations")

    def quantizer(self, gemm: str, role: str) -> Quantizer | None:
        key = f"{gemm}.{role}"
        if key in self.per_gemm:
            return self.per_gemm[key]
        if gemm != "fprop" and not self.quantizes_backward:
            return None  # an inference recipe: backward is the straight-through estimator
        if self.reuse_forward and key in REUSED_FORWARD_KEYS:
            return self.quantizer("fprop", role)
        quantizer = getattr(self, role)
        if gemm == "fprop" and role == "weight" and quantizer is not None and self.dge is not None:
            quantizer = replace(quantizer, dge=self.dge)
        return quantizer

    def quantizers(self) -> list[Quantizer]:
        found = (self.quantizer(gemm, role) for gemm, roles in GEMM_ROLES.items() for role in roles)
        return [q for q in found if q is not None]

    @property
    def quantizes_backward(self) -> bool:
        """Training recipes name a grad_output quantizer (or backward GEMM roles in ``per_gemm``)."""
        backward = [q for key, q in self.per_gemm.items() if not key.startswith("fprop.")]
        return self.grad_output is not None or any(backward)

    def with_overrides(self, **overrides) -> Recipe:
        """A copy with overrides applied (the keyword arguments of :func:`qpass.compile`)."""
        check_override_keys(overrides, OVERRIDE_KEYS, "override")
        recipe = copy.deepcopy(self)
        rounding = overrides.pop("rounding", None)
        scale_mode = overrides.pop("scale_mode", None)
        per_gemm = GemmOverrides.parse(
            {key: overrides.pop(key) for key in GEMM_ROLE_KEYS if key in overrides})
        if "per_gemm" in overrides:
            per_gemm = GemmOverrides.parse(overrides.pop("per_gemm")).merged(per_gemm)
        recipe = replace(recipe, per_gemm=recipe.per_gemm.merged(per_gemm), **overrides)
        if rounding is not None:
            recipe = _map_quantizers(recipe, lambda q: replace(q, rounding=rounding))
        if scale_mode is not None:
            # An MX mode goes to the MX quantizers, an NVFP4 one ("4over6") to the nvfp4 ones.
            families = {"mx": SCALE_MODES, "nvfp4": NVFP4_SCALE_MODES}
            family = next((f for f, modes in families.items() if scale_mode in modes), None)
            if family is None:
                raise ValueError(f"unknown scale_mode {scale_mode!r}; accepted: {scale_modes_by_family()}")
            if not any(q.spec.scaling == family for q in recipe.quantizers()):
                formats = "MX formats" if family == "mx" else "nvfp4"
                raise ValueError(f"scale_mode={scale_mode!r} applies to {formats}; recipe {recipe.name!r} "
                                 f"has none (accepted: {scale_modes_by_family()})")
            recipe = _map_quantizers(
                recipe, lambda q: replace(q, scale_mode=scale_mode) if q.spec.scaling == family else q)
        return recipe


    def to_json(self) -> str:
        """The recipe as JSON (what a checkpoint keeps); :meth:`from_json` rebuilds an equal one."""
        return json.dumps(_encoded(self))

    @staticmethod
    def from_json(text: str) -> Recipe:
        recipe = _decoded(json.loads(text))
        if not isinstance(recipe, Recipe):
            raise ValueError(f"not the JSON of a qpass Recipe: {text[:80]!r}")
        return recipe


# The JSON of a recipe tags each of its config objects with its type ({"Quantizer": {fields}}); tuples
# are tagged too, since rules and granularities hold them and JSON would hand back lists.
_CONFIG_TYPES = {cls.__name__: cls for cls in (Recipe, Quantizer, Rotation, Hadamard, DGE)}


def _encoded(value):
    if isinstance(value, tuple(_CONFIG_TYPES.values())):
        return {type(value).__name__: {f.name: _encoded(getattr(value, f.name)) for f in fields(value)}}
    if isinstance(value, GemmOverrides):
        return {"GemmOverrides": {key: _encoded(q) for key, q in value.items()}}
    if isinstance(value, tuple):
        return {"tuple": [_encoded(v) for v in value]}
    if isinstance(value, list):
        return [_encoded(v) for v in value]
    if isinstance(value, dict):
        return {"dict": {key: _encoded(v) for key, v in value.items()}}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a recipe holds {value!r}, which has no JSON form")


def _decoded(value):
    if isinstance(value, list):
        return [_decoded(v) for v in value]
    if not isinstance(value, dict):
        return value
    ((tag, content),) = value.items()
    if tag == "tuple":
        return tuple(_decoded(v) for v in content)
    if tag == "dict":
        return {key: _decoded(v) for key, v in content.items()}
    if tag == "GemmOverrides":
        return GemmOverrides.parse({key: _decoded(q) for key, q in content.items()})
    if tag not in _CONFIG_TYPES:
        raise ValueError(
            f"unknown type {tag!r} in a recipe's JSON; expected one of {', '.join(_CONFIG_TYPES)}")
    return _CONFIG_TYPES[tag](**{key: _decoded(v) for key, v in content.items()})


def _map_quantizers(recipe: Recipe, change) -> Recipe:
    roles = {role: change(q) for role in ROLES if (q := getattr(recipe, role)) is not None}
    return replace(recipe, per_gemm=recipe.per_gemm.map(change), **roles)


_FIELDS = tuple(f.name for f in fields(Recipe) if f.name not in ("name", "description", "notes"))
OVERRIDE_KEYS = (*_FIELDS, *GEMM_ROLE_KEYS, "rounding", "scale_mode")
RULE_KEYS = (*ROLES, *GEMM_ROLE_KEYS, "rounding", "scale_mode", "hadamard", "ocs", "smooth", "dge", "occ",
             "exclude")


def check_override_keys(overrides: dict, valid: tuple[str, ...], what: str) -> None:
    unknown = [key for key in overrides if key not in valid]
    if unknown:
        raise ValueError(
            f"unknown {what} key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(valid)}")


def _all(quantizer: Quantizer) -> dict[str, Quantizer]:
    return {"input": quantizer, "weight": quantizer, "grad_output": quantizer}


_E4M3, _E5M2 = Quantizer("fp8_e4m3"), Quantizer("fp8_e5m2")
_PER_CHANNEL_E4M3 = Quantizer("fp8_e4m3", granularity="channel")
# The sign vector of Transformer Engine's 16-point random Hadamard transform (NVFP4 recipe).
TE_RHT_SIGNS = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)
# rceil scales never saturate (the block max lands at or below max normal), which stochastic
# rounding needs to stay unbiased; a floor scale clips up to a third of the top binade.
_MXFP4, _MXFP4_SR = (Quantizer("mxfp4", scale_mode="rceil"),
                     Quantizer("mxfp4", scale_mode="rceil", rounding="stochastic"))

_MXFP8_RCEIL = Quantizer("mxfp8_e4m3", scale_mode="rceil")

BUILTIN_RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            "fp8-train", input=_E4M3, weight=_E4M3, grad_output=_E5M2,
            description="E4M3 input/weight, E5M2 grad_output, per-tensor scales (FP8-LM, TE HYBRID)",
        ),
        Recipe(
            # Each GEMM's operands scaled per row along its own reduction axis: the forward per
            # token x per output channel, dgrad and wgrad per row of dY and of W or X (torchao's
            # float8 "rowwise"); all of it runs on _scaled_mm's rowwise FP8 GEMM.
            "fp8-rowwise-train", **_all(_PER_CHANNEL_E4M3),
            description="E4M3 for every operand, one scale per row along each GEMM's reduction axis "
            "(torchao float8 rowwise)",
        ),
        Recipe(
            "mxfp8-train", **_all(_MXFP8_RCEIL),
            description="MXFP8 E4M3 for every operand of every GEMM, rceil scales (arXiv 2506.08027)",
        ),
        Recipe(
            "mxfp6-train", **_all(Quantizer("mxfp6_e3m2")),
            description="MXFP6 E3M2 for every operand of every GEMM (MX paper)",
        ),
        Recipe(
            "fp4-train",
            input=Quantizer("fp4_e2m1", granularity="channel"),  # per token
            weight=Quantizer("fp4_e2m1", granularity="channel"),  # per output channel
            grad_output=_E5M2, dge=True, occ=0.99, reuse_forward=True,
            description="E2M1 per-token input with outlier clamping (0.99) and compensation, "
            "per-channel weight with the DGE, E5M2 grad_output; backward on the forward's FP4 operands "
            "(arXiv 2501.17116)",
        ),
        Recipe(
            "nvfp4-train",
            input=Quantizer("nvfp4"), weight=Quantizer("nvfp4", granularity=("tile", 16)),
            grad_output=Quantizer("nvfp4", rounding="stochastic"),
            hadamard={"wgrad": Rotation(16, signs=TE_RHT_SIGNS)},
            description="NVFP4 1x16 input, 16x16 weight, stochastically rounded grad_output; "
            "16-point random Hadamard on the wgrad operands (Transformer Engine)",
        ),
        Recipe(
            "mxfp4-train", **_all(_MXFP4),
            per_gemm={key: _MXFP4_SR for key in GEMM_ROLE_KEYS if not key.startswith("fprop.")},
            hadamard={"fprop": Rotation(32, seed=0), "dgrad": Rotation(32, resample=True),
                      "wgrad": Rotation(32, resample=True)},
            description="MXFP4 everywhere with 32-point block Hadamard: fixed signs forward, "
            "fresh signs and stochastic rounding backward (Quartet)",
        ),
        Recipe(
            "fp8-infer", input=_PER_CHANNEL_E4M3, weight=_PER_CHANNEL_E4M3,
            description="E4M3 weight per output channel, input per token (dynamic)",
        ),
        Recipe(
            # Chosen on SmolLM2-135M (bench/ptq_real.py): floor scales saturate the top of about one
            # block in five, which on the activations alone cost +5.6% perplexity against +1.8% with
            # rceil; the block rotation then takes the gap from +4.0% to +1.8% (round to nearest).
            "mxfp8-infer", input=_MXFP8_RCEIL, weight=_MXFP8_RCEIL, hadamard="block32",
            description="MXFP8 E4M3 weight and input, rceil scales, 32-point block Hadamard on both "
            "(chosen on a real LLM: floor scales saturate block maxima)",
        ),
        Recipe(
            # E2M3 rather than E3M2: inference has no gradients' range to cover, so the extra
            # mantissa bit is worth more than the exponent bit (the MX paper's direct-cast choice).
            "mxfp6-infer", input=Quantizer("mxfp6_e2m3"), weight=Quantizer("mxfp6_e2m3"),
            description="MXFP6 E2M3 weight and input",
        ),
        Recipe(
            "mxfp4-infer", input=Quantizer("mxfp4"), weight=Quantizer("mxfp4"), hadamard="block32",
            description="MXFP4 weight and input, 32-point block Hadamard on both (QuaRot/MR-GPTQ style)",
        ),
        Recipe(
            "nvfp4-infer", input=Quantizer("nvfp4"), weight=Quantizer("nvfp4"),
            description="NVFP4 weight and input (E4M3 scales per 16, fp32 per tensor)",
        ),
        Recipe(
            "mxfp4-weight-only", weight=Quantizer("mxfp4"),
            description="MXFP4 weights, high-precision inputs (the memory-bound decode path)",
        ),
    )
}


def recipes() -> list[str]:
    """Names of the built-in recipes."""
    return list(BUILTIN_RECIPES)


def get_recipe(name: str) -> Recipe:
    """A copy of a built-in recipe, to edit or pass to :func:`qpass.compile`."""
    if isinstance(name, Recipe):
        return copy.deepcopy(name)
    if name not in BUILTIN_RECIPES:
        raise ValueError(f"unknown recipe {name!r}; expected one of {', '.join(BUILTIN_RECIPES)}")
    return copy.deepcopy(BUILTIN_RECIPES[name])
