"""The ONNX translations of qpass's ops (:mod:`qpass.onnx.numerics`) against qpass's plain-torch
reference (:mod:`qpass.formats`, :mod:`qpass.hadamard`), bit for bit, in both dialects.

What "the same" means: every output compares by its bits, ``-0.0`` included; NaNs compare by
position only (which NaN, and its sign, is whatever the runtime's arithmetic propagates). The
portable dialect runs in ONNX Runtime's CPU provider twice, at ``ORT_ENABLE_ALL`` (its optimizer has
changed bits before: it fused ``Div(1, x) · y`` into ``y / x``) and at ``ORT_DISABLE_ALL``; the qdq
dialect runs in ``onnx.reference``.

Covered, and why:

- quantize-dequantize of activations for every named format and every option that changes its
  numerics (absmax granularity tensor/channel/block32/block16 and pow2, each MX scale_mode, NVFP4),
  rounding rne and away, along axis -1, axis 0 and axis 1 of a 3-D tensor, with ragged lengths
  (40, 33, 72: a partial last block, an odd fp4 axis). Inputs are built per scaling group to hit
  the corners where a translation can go wrong: exact ties of the element grid (odd multiples of
  half a step times a power-of-two scale), values one fp32 ulp either side of them, saturation
  (MX floor/even scales leave the block amax above max normal), scale boundaries (amax a power of
  two, one ulp off it, the "even" rounding's carry point), fp32 subnormals, tiny amax (NVFP4's g
  underflowing), zero groups and signed zeros (ONNX Runtime's ``Where`` and ``Add(x, 0)`` lose
  -0), NaN/±Inf in a group and whole NaN groups, values near fp32's max. A test checks that the
  ties are real ties. ``bfloat16`` and ``float16`` activations.
- rotations: blocks of 16..128 with and without signs (seeded or explicit), inverse, a length the
  block does not divide, full size on powers of two (all exact: butterflies in the reference's
  order), and full size with a Paley factor (a MatMul: close, not exact).
- stored weights (``dequantize_packed``): every named format, both axes, ragged K, bf16/fp16
  outputs, bit exact, and in the qdq dialect the ONNX types of the initializers (the point of that
  dialect); a saved file through :func:`qpass.onnx.check.run`.
- what cannot be exported exactly raises (stochastic rounding, NVFP4 tiles of an activation,
  delayed scaling, resampled rotations), with the reason in the exception chain.
- the building blocks ``numerics.floor_log2`` and ``numerics.pow2`` over every fp32 binade.

Exports are the slow part (a few seconds each, plus tens of milliseconds per op), so each is made
once (cached) for many sites: one module per dialect holds every quantize-dequantize site, each
with its own input, and every input kind runs through the same session; likewise one module per
dialect for the rotations and one for the stored weights. The tests then only compare.

Checked by mutation (each caught): ``Div(1, x)`` for ``Reciprocal`` (only at ORT_ENABLE_ALL), the
final ``Where``'s operands swapped (only at ORT_DISABLE_ALL), ``Add(x, 0)`` for int8's -0,
``x < 0`` for away's sign, MX ``>``/``>=`` off by one at each scale boundary, no clamp of the
absmax or NVFP4 scales, NaN dropped from amax, ``floor(log2)`` uncorrected, fp4 nibbles swapped,
``1/sqrt(n)`` applied before the butterflies.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import warnings
import zlib
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnx_ir
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator

import qpass
from qpass.formats import NAMED_FORMATS, SCALE_MODES, FormatSpec
from qpass.formats.bits import floor_log2 as reference_floor_log2
from qpass.formats.element import code_table
from qpass.formats.nvfp4 import global_divisor
from qpass.hadamard import random_signs
from qpass.onnx import numerics
from qpass.onnx.check import from_runtime, run, to_runtime
from qpass.onnx.export import OPSETS, to_onnx
from qpass.onnx.prepare import _stored_tensors, _suffixes
from qpass.onnx.translation import translation_table
from qpass.quantizer import Quantizer
from qpass.rotation import Rotation

F32_MAX = float(np.finfo(np.float32).max)
RUNTIMES = {"portable": ("ort-all", "ort-none"), "qdq": ("reference",)}
RUNS = [(dialect, runtime) for dialect, runtimes in RUNTIMES.items() for runtime in runtimes]
RUN_IDS = [f"{dialect}-{runtime}" for dialect, runtime in RUNS]


# ---- running an exported model -------------------------------------------------------------------


@contextlib.contextmanager
def quiet():
    """The exporter prints progress and warns about what does not concern these tests."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def export(module: torch.nn.Module, dialect: str, args: tuple) -> onnx.ModelProto:
    with quiet():
        return onnx_ir.to_proto(to_onnx(module, dialect, args))


def runner(proto: onnx.ModelProto, runtime: str):
    """``run(inputs) -> outputs`` (tensors, in the exported order) for one runtime."""
    names = [i.name for i in proto.graph.input]
    if runtime == "reference":
        evaluator = ReferenceEvaluator(proto)
        execute = functools.partial(evaluator.run, None)
    else:
        options = ort.SessionOptions()
        levels = {"ort-all": "ORT_ENABLE_ALL", "ort-none": "ORT_DISABLE_ALL"}
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, levels[runtime])
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        execute = functools.partial(session.run_with_ort_values, None)

    def run(inputs) -> list[torch.Tensor]:
        assert len(inputs) == len(names), f"{len(inputs)} inputs for the model's {names}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # onnx.reference's numpy: inf - inf, 0 * inf
            outputs = execute(dict(zip(names, (to_runtime(t, runtime == "reference") for t in inputs))))
        return [from_runtime(o) for o in outputs]

    return run


# ---- comparisons ---------------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _show(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value!r} ({float(value).hex()})"


def mismatch(got: torch.Tensor, expected: torch.Tensor, x: torch.Tensor | None = None) -> str | None:
    """Why ``got`` is not ``expected`` bit for bit (NaNs by position only), or None."""
    if (got.dtype, got.shape) != (expected.dtype, expected.shape):
        return f"got {got.dtype} {tuple(got.shape)}, expected {expected.dtype} {tuple(expected.shape)}"
    nan = expected.isnan().reshape(-1)
    wrong = ((_bits(got) != _bits(expected)) & ~nan) | (got.isnan().reshape(-1) != nan)
    if not wrong.any():
        return None
    i = int(wrong.nonzero()[0])
    shown = x is not None and x.shape == expected.shape
    where = f" (input {_show(x.reshape(-1)[i].item())})" if shown else ""
    return (
        f"{int(wrong.sum())} of {nan.numel()} values differ; the first, at flat index {i}{where}: "
        f"got {_show(got.reshape(-1)[i].item())}, expected {_show(expected.reshape(-1)[i].item())}"
    )


def assert_same_bits(got: torch.Tensor, expected: torch.Tensor, x: torch.Tensor | None = None) -> None:
    problem = mismatch(got, expected, x)
    assert problem is None, problem


def messages(error: BaseException) -> str:
    """Every message in an exception's chain (the exporter wraps a translation's error)."""
    seen, parts = set(), []
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        parts.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return "\n".join(parts)


# ---- adversarial inputs --------------------------------------------------------------------------


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


@functools.cache
def _grid(spec: FormatSpec) -> tuple[np.ndarray, np.ndarray]:
    """The element grid's non-negative finite values, and the midpoints between neighbours."""
    table = code_table(spec.element).double().numpy()
    values = np.unique(np.abs(table[np.isfinite(table)]))
    return values, (values[:-1] + values[1:]) / 2


def _f32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).astype(np.float32)


def _toward(values, target: float) -> np.ndarray:
    """fp32 ``values`` moved one ulp toward ``target``."""
    return np.nextafter(_f32(values), np.float32(target)).astype(np.float64)


def _signs(rng, n: int) -> np.ndarray:
    return rng.choice([-1.0, 1.0], n)


def _with_amax(values: np.ndarray, amax: float, rng) -> np.ndarray:
    values[rng.integers(len(values))] = amax * rng.choice([-1.0, 1.0])
    return values


class Group:
    """Filling one scaling group of ``n`` values with one kind of corner case.

    ``k`` is the group's scale exponent: its amax is the element's max normal times ``2^k``, so
    every scaling rule takes the group to element units by the power of two ``2^-k``, except MX
    ceil, by ``2^-(k+1)`` (max normal is no power of two): ``unit`` is the inverse."""

    def __init__(self, spec: FormatSpec, rng):
        self.spec, self.rng = spec, rng
        self.element = spec.element
        self.top = self.element.max_normal
        self.grid, midpoints = _grid(spec)
        self.shift = 1 if spec.scale_mode == "ceil" else 0
        self.midpoints = midpoints[midpoints * 2**self.shift <= self.top]  # below the amax

    def unit(self, k):
        return 2.0 ** (k + self.shift)

    def ties(self, n, k):
        v = self.rng.choice(self.midpoints, n) * _signs(self.rng, n) * self.unit(k)
        return _with_amax(v, self.top * 2.0**k, self.rng)

    def near_ties(self, n, k):
        """One fp32 ulp either side of a tie, and values on the grid."""
        m = self.rng.choice(self.midpoints, n) * self.unit(k)
        v = np.where(self.rng.random(n) < 0.5, _toward(m, 0), _toward(m, np.inf))
        on_grid = self.rng.random(n) < 0.25
        v[on_grid] = self.rng.choice(self.grid, on_grid.sum()) * 2.0**k
        return _with_amax(v * _signs(self.rng, n), self.top * 2.0**k, self.rng)

    def saturate(self, n, k):
        """The amax's significand above max normal's: MX floor and even scales leave it beyond max normal."""
        emax = self.element.emax
        significand = self.top / 2.0**emax
        amax = (significand + (2 - significand) * self.rng.uniform(0.05, 1, n)) * 2.0 ** (emax + k)
        amax = np.minimum(_f32(amax), _toward(2.0 ** (emax + k + 1), 0))
        low = self.top * 2.0**k * self.rng.uniform(0.5, 1, n)
        v = np.where(self.rng.random(n) < 0.5, amax, low)
        return v * _signs(self.rng, n)

    def boundary(self, n, k):
        """amax at a scale boundary: a power of two, one ulp either side, the even rule's carry point."""
        j = k + self.element.emax
        carry = (2 - 2.0 ** -(self.element.mbits + 1)) * 2.0**j
        candidates = [2.0**j, carry, self.top * 2.0**k]
        candidates = np.concatenate([_f32(candidates), _toward(candidates, 0), _toward(candidates, np.inf)])
        amax = float(self.rng.choice(candidates))
        v = self.rng.uniform(0, amax, n) * _signs(self.rng, n)
        return _with_amax(v, amax, self.rng)

    def tiny(self, n, k):
        """fp32 subnormals, amax about 1e-40, 2^-149, fp32's smallest normal (or one ulp less)..."""
        amax = float(self.rng.choice(_f32([1e-40, 2.0**-149, 3 * 2.0**-149, 2.0**-140, 2.0**-126, 1e-38])))
        if self.rng.random() < 0.2 and amax > 2.0**-149:
            amax = float(_toward(amax, 0))
        steps = max(int(amax / 2.0**-149), 1)
        v = self.rng.integers(0, steps + 1, n) * 2.0**-149 * _signs(self.rng, n)
        return _with_amax(v, amax, self.rng)

    def deep_subnormals(self, n, k):
        """Only the smallest fp32 subnormals (amax below 2688 * 2^-149: NVFP4's g underflows)."""
        return self.rng.integers(0, 17, n) * 2.0**-149 * _signs(self.rng, n)

    def zeros(self, n, k):
        return 0.0 * _signs(self.rng, n)

    def signed_zeros(self, n, k):
        """±0, values far below a step (they round to a signed zero), exact halves of the smallest step."""
        step = self.element.min_subnormal * self.unit(k)
        choices = np.array([0.0, step * 2.0**-30, step / 4, step / 2, 1.5 * step])
        v = self.rng.choice(choices, n) * _signs(self.rng, n)
        return _with_amax(v, self.top * 2.0**k, self.rng)

    def huge(self, n, k):
        """Near fp32's max: amax fp32's max, one ulp less, 2^127, 1.5 * 2^127, 3e38; and grid values
        times the largest scale."""
        amax = float(self.rng.choice(_f32([F32_MAX, _toward(F32_MAX, 0), 2.0**127, 1.5 * 2.0**127, 3e38])))
        k_top = 127 - self.element.emax - 1
        v = np.where(
            self.rng.random(n) < 0.5,
            self.rng.uniform(1e37, amax, n),
            self.rng.choice(self.midpoints, n) * 2.0**k_top,
        )
        return _with_amax(v * _signs(self.rng, n), amax, self.rng)

    def random(self, n, k):
        return self.rng.standard_normal(n) * self.top * 2.0**k / 3

    def nan(self, n, k):
        v = self.random(n, k)
        v[self.rng.integers(n)] = self.rng.choice([math.nan, -math.nan])
        return v

    def inf(self, n, k):
        v = self.ties(n, k)
        v[self.rng.integers(n)] = self.rng.choice([math.inf, -math.inf])
        return v

    def nan_and_inf(self, n, k):
        v = self.random(n, k)
        i, j = self.rng.choice(n, 2, replace=False) if n > 1 else (0, 0)
        v[i], v[j] = math.inf, math.nan
        return v

    def all_nan(self, n, k):
        return np.full(n, math.nan)


KINDS = [
    "ties", "near_ties", "saturate", "boundary", "tiny", "deep_subnormals", "zeros", "signed_zeros", "huge",
    "random", "nan", "inf", "nan_and_inf", "all_nan",
]
INPUT_KINDS = [*KINDS, "mixed"]  # mixed: a different kind per group
# NVFP4: the kinds where a tensor amax of 2688 * 2^t (4over6: 1536 * 2^t) is added, so that g = 2^t
# and each block's E4M3 scale is the power of two 2^(k - t): its ties are then exact ties.
NVFP4_ANCHORED = {"ties", "near_ties", "signed_zeros", "random"}


def _groups(spec: FormatSpec, rows: int, length: int) -> list[np.ndarray]:
    """Flat indices of each scaling group of a ``[rows, length]`` tensor quantized along its last axis."""
    index = np.arange(rows * length).reshape(rows, length)
    if spec.granularity == "tensor":
        return [index.reshape(-1)]
    if spec.granularity == "channel":
        return list(index)
    size = spec.block_size
    return [row[start:start + size] for row in index for start in range(0, length, size)]


def adversarial(spec: FormatSpec, kind: str, rows: int, length: int, seed: int) -> torch.Tensor:
    """``[rows, length]`` fp32 whose scaling groups (along the last axis) are corner cases of ``kind``."""
    rng = np.random.default_rng(seed)
    fill = Group(spec, rng)
    out = np.zeros(rows * length)
    t = int(rng.integers(-12, 12))  # NVFP4's tensor scale exponent
    groups = _groups(spec, rows, length)
    # mixed: every kind in turn (in a random order), so that each is there once there are enough groups
    kinds = np.resize(rng.permutation(KINDS), len(groups)) if kind == "mixed" else [kind] * len(groups)
    for group, group_kind in zip(groups, kinds):
        k = int(rng.integers(t - 6, t + 9)) if spec.scaling == "nvfp4" else int(rng.integers(-30, 31))
        out[group] = getattr(fill, group_kind)(len(group), k)
    if spec.scaling == "nvfp4" and kind in NVFP4_ANCHORED:
        out[rng.integers(out.size)] = global_divisor(spec.scale_mode) * 2.0**t * rng.choice([-1.0, 1.0])
    return torch.from_numpy(_f32(out).reshape(rows, length))


# name: (axis, length of the axis, rows): each input is made as [rows, length] groups, then laid out.
LAYOUTS = {"axis-1": (-1, 40, 12), "axis0": (0, 33, 12), "3d-axis1": (1, 72, 12)}


def lay_out(rows: torch.Tensor, layout: str) -> torch.Tensor:
    """``[rows, length]`` as the layout's input: the same groups along its quantization axis."""
    if layout == "axis-1":
        return rows
    if layout == "axis0":
        return rows.t().contiguous()
    return rows.reshape(3, 4, -1).transpose(1, 2).contiguous()  # [3, length, 4], axis 1


def layout_input(spec: FormatSpec, kind: str, layout: str, seed: int) -> torch.Tensor:
    _, length, rows = LAYOUTS[layout]
    return lay_out(adversarial(spec, kind, rows, length, seed), layout)


# ---- quantize-dequantize of activations ----------------------------------------------------------


@dataclass(frozen=True)
class Site:
    quantizer: Quantizer
    layout: str = "axis-1"

    @property
    def axis(self) -> int:
        return LAYOUTS[self.layout][0]

    def __str__(self) -> str:
        return f"{self.quantizer}-{self.layout}"


GRANULARITIES = ["tensor", "channel", ("block", 32), ("block", 16)]
ROUNDINGS = ["rne", "away"]


def format_sites(name: str) -> list[Site]:
    """Along axis -1, every option of format ``name`` that changes its numerics (absmax: each
    granularity with rne and away, and pow2; MX: each scale_mode with rne and away; NVFP4: each
    block-scale rule with rne and away); then the
    layouts, axis 0 and axis 1 of a 3-D tensor (absmax: axis 0 for each granularity)."""
    spec = NAMED_FORMATS[name]
    if spec.scaling == "absmax":
        sites = [Site(Quantizer(name, granularity=g, rounding=r)) for g in GRANULARITIES for r in ROUNDINGS]
        sites += [Site(Quantizer(name, granularity=g, pow2=True)) for g in GRANULARITIES]
        sites += [Site(Quantizer(name, granularity=g), "axis0") for g in GRANULARITIES]
        last = Quantizer(name, granularity=("block", 16), pow2=True, rounding="away")
        return sites + [Site(last, "3d-axis1")]
    if spec.scaling == "mx":
        sites = [Site(Quantizer(name, scale_mode=m, rounding=r)) for m in SCALE_MODES for r in ROUNDINGS]
        last = Quantizer(name, scale_mode="rceil", rounding="away")
        return sites + [Site(Quantizer(name), "axis0"), Site(last, "3d-axis1")]
    modes = (None, "4over6")  # nvfp4's block-scale rules
    sites = [Site(Quantizer(name, scale_mode=m, rounding=r)) for m in modes for r in ROUNDINGS]
    sites += [Site(Quantizer(name, scale_mode=m), "axis0") for m in modes]
    return sites + [Site(Quantizer(name, scale_mode=m, rounding="away"), "3d-axis1") for m in modes]


class Quantizes(torch.nn.Module):
    """One ``qpass::quantize_dequantize`` per site, each of its own input."""

    def __init__(self, sites: list[Site]):
        super().__init__()
        self.ops = [(site.quantizer.to_json(), site.axis) for site in sites]

    def forward(self, *xs):
        return tuple(torch.ops.qpass.quantize_dequantize(x, q, axis) for x, (q, axis) in zip(xs, self.ops))


# Every site of every format, exported together: one export per dialect (an export costs seconds
# whatever its size, and a site tens of milliseconds).
SITES = [site for name in NAMED_FORMATS for site in format_sites(name)]


@functools.cache
def activation_inputs() -> dict[str, list[torch.Tensor]]:
    """Per input kind, one input per site."""
    return {
        kind: [layout_input(site.quantizer.spec, kind, site.layout, _seed(site, kind)) for site in SITES]
        for kind in INPUT_KINDS
    }


@functools.cache
def activation_model(dialect: str) -> onnx.ModelProto:
    return export(Quantizes(SITES), dialect, tuple(activation_inputs()["random"]))


@functools.cache
def activation_outputs(dialect: str, runtime: str) -> dict[str, list[torch.Tensor]]:
    run = runner(activation_model(dialect), runtime)
    return {kind: run(xs) for kind, xs in activation_inputs().items()}


@functools.cache
def activation_reference(index: int) -> dict[str, torch.Tensor]:
    site = SITES[index]
    return {kind: site.quantizer(xs[index], site.axis) for kind, xs in activation_inputs().items()}


@pytest.mark.slow
@pytest.mark.parametrize(("dialect", "runtime"), RUNS, ids=RUN_IDS)
@pytest.mark.parametrize("index", range(len(SITES)), ids=[str(site) for site in SITES])
def test_quantize_dequantize_gives_the_reference_bits(index, dialect, runtime):
    site = SITES[index]
    outputs = activation_outputs(dialect, runtime)
    expected = activation_reference(index)
    problems = []
    for kind, xs in activation_inputs().items():
        problem = mismatch(outputs[kind][index], expected[kind], xs[index])
        if problem:
            problems.append(f"{kind} input: {problem}")
    assert not problems, f"{site} ({dialect}, {runtime}):\n" + "\n".join(problems)


@pytest.mark.parametrize("name", list(NAMED_FORMATS))
def test_the_inputs_hit_the_corners(name):
    """The corner cases are real: rne and away disagree on many values of the ties inputs (they
    are exact ties, also under MX ceil scales; not under nvfp4's 4over6, which takes the map-to-4
    scale for a block of ties, where they are ties no longer: its own ties are in
    test_nvfp4_4over6_candidates), and the mixed inputs of blocks hold NaN, fp32 subnormals, and
    values that quantize to -0.0 and to +0.0."""
    inputs = activation_inputs()
    for i, site in enumerate(SITES):
        q = site.quantizer
        if q.format == name and site.layout == "axis-1" and q.rounding == "rne" and q.scale_mode != "4over6":
            x = inputs["ties"][i]
            away = replace(site.quantizer, rounding="away")
            differ = site.quantizer(x, site.axis) != away(x, site.axis)
            assert differ.float().mean() > 0.1, f"{site}: few ties"
    i = next(i for i, s in enumerate(SITES) if s.quantizer.format == name and s.quantizer.spec.blocked)
    x = inputs["mixed"][i]
    assert x.isnan().any() and ((x.abs() < 2.0**-126) & (x != 0)).any()
    x = inputs["signed_zeros"][i]
    zeros = SITES[i].quantizer(x, SITES[i].axis) == 0
    assert (~x[zeros].signbit()).any()
    assert x[zeros].signbit().any() and x[zeros].ne(0).any()


# Exports that are expected to fail are tried once.
_EXPORTS: dict = {}


def cached_export(key, module: torch.nn.Module, dialect: str, args: tuple) -> onnx.ModelProto:
    if key not in _EXPORTS:
        try:
            _EXPORTS[key] = export(module, dialect, args)
        except Exception as error:  # noqa: BLE001 -- kept and raised again for each test that needs it
            _EXPORTS[key] = error
    if isinstance(_EXPORTS[key], Exception):
        raise _EXPORTS[key]
    return _EXPORTS[key]


SIGNED_ZERO_QUANTIZERS = [
    Quantizer("fp8_e4m3"), Quantizer("fp8_e5m2", granularity="channel"),
    Quantizer("fp4_e2m1", pow2=True, rounding="away"), Quantizer("mxfp4", rounding="away"),
    Quantizer("mxfp8_e4m3"), Quantizer("mxint8"), Quantizer("nvfp4"),
    Quantizer("mxfp6_e3m2", rounding="away"),
]


def signed_zeros() -> torch.Tensor:
    x = torch.tensor([[-0.0, 0.0, -1e-30, 1e-30, -2.0**-140, 1.0, -3.0, 0.0] * 4] * 2)
    x[1] = -0.0
    x[1, 5] = 1.0
    return x


@pytest.mark.parametrize(("dialect", "runtime"), RUNS, ids=RUN_IDS)
@pytest.mark.parametrize("index", range(len(SIGNED_ZERO_QUANTIZERS)), ids=map(str, SIGNED_ZERO_QUANTIZERS))
def test_signs_of_zero_survive(index, dialect, runtime):
    """-0.0 stays -0.0 (int8, two's complement, has none: +0), also where a tiny negative value
    rounds to zero; +0.0 stays +0.0. ONNX Runtime's Where turns a -0 in its first value slot into
    +0, and its optimizer removes an Add(x, 0)."""
    sites = [Site(q) for q in SIGNED_ZERO_QUANTIZERS]
    x = signed_zeros()
    model = cached_export(("signed zeros", dialect), Quantizes(sites), dialect, (x,) * len(sites))
    got = runner(model, runtime)([x] * len(sites))[index]
    quantizer = SIGNED_ZERO_QUANTIZERS[index]
    expected = quantizer(x, -1)
    zeros = expected == 0
    assert zeros.sum() > 8
    if quantizer.spec.element.is_int:
        assert not expected[zeros].signbit().any()
    else:
        assert torch.equal(expected[zeros].signbit(), x[zeros].signbit())
    assert_same_bits(got, expected, x)


FOUR_OVER_SIX_SITES = [
    Site(Quantizer("nvfp4", scale_mode="4over6")),
    Site(Quantizer("nvfp4", scale_mode="4over6", rounding="away")),
    Site(Quantizer("nvfp4", scale_mode="4over6"), "axis0"),
]
# 16-element blocks with g = 1 (a tensor amax of 1536), worked out in tests/formats/test_nvfp4.py: with
# amax 12, s6 = 2 and s4 = 3. Both errors 0 (a tie: map-to-6); both 1 (a tie); map-to-4 wins; s6
# saturates; fp32 subnormals (errors underflow: a tie); ratios below the 2^-6 clamp; map-to-6 wins
# with an E2M1 tie in it (5 / 2 = 2.5, where rne and away differ).
FOUR_OVER_SIX_BLOCKS = [
    [12.0, 6.0, 3.0, 0.0, -3.0, -12.0], [12.0, 7.0], [12.0, 9.5], [56.4], [1e-40, -3e-41],
    [0.05, -0.02, 0.001], [12.0, 5.0] + [1.0] * 14, [-12.0, -9.5, 4.5, 1.5],
]


def four_over_six_input(layout: str, seed: int) -> torch.Tensor:
    """The layout's ``[rows, length]`` random blocks, the hand-worked ones among them, and 1536."""
    _, length, rows = LAYOUTS[layout]
    x = torch.randn(rows, length, generator=torch.Generator().manual_seed(seed)) * 20
    for i, case in enumerate(FOUR_OVER_SIX_BLOCKS):
        row, block = divmod(i, length // 16)
        x[row, 16 * block:16 * block + 16] = torch.tensor(case + [0.0] * (16 - len(case)))
    x[-1, -1] = 1536.0
    return lay_out(x, layout)


@pytest.mark.parametrize(("dialect", "runtime"), RUNS, ids=RUN_IDS)
def test_nvfp4_4over6_candidates(dialect, runtime):
    """4over6's choice of scale per block, exact ties of the two candidates' errors included (the
    map-to-6 one): the reference's bits on its hand-worked blocks and on the adversarial kinds."""
    sites = FOUR_OVER_SIX_SITES
    inputs = [[four_over_six_input(site.layout, i) for i, site in enumerate(sites)]]
    inputs += [[layout_input(site.quantizer.spec, kind, site.layout, _seed("4over6", kind, i))
                for i, site in enumerate(sites)] for kind in ("mixed", "ties", "near_ties", "random", "nan")]
    model = cached_export(("4over6", dialect), Quantizes(sites), dialect, tuple(inputs[0]))
    run = runner(model, runtime)
    for xs in inputs:
        for site, x, got in zip(sites, xs, run(xs)):
            assert_same_bits(got, site.quantizer(x, site.axis), x)
    scales = qpass.quantize(inputs[0][0], sites[0].quantizer.spec).scales
    # Two blocks a row: tie, tie; 4 (s4 = 3), 4 (s4 = 14); one scale, one scale; 6 with an E2M1 tie.
    assert scales[:4, :2].tolist() == [[0x40, 0x40], [0x44, 0x56], [0x08, 0x08], [0x40, scales[3, 1]]]


HALF_SITES = [
    Site(Quantizer("fp8_e4m3")), Site(Quantizer("fp4_e2m1", granularity="channel")),
    Site(Quantizer("mxfp4")), Site(Quantizer("mxint8")), Site(Quantizer("nvfp4", rounding="away")),
    Site(Quantizer("mxfp6_e2m3"), "axis0"),
]
HALF_DTYPES = [torch.bfloat16, torch.float16]


def half_inputs() -> list[torch.Tensor]:
    xs = []
    for dtype in HALF_DTYPES:
        for i, site in enumerate(HALF_SITES):
            kind = "random" if site.quantizer.per_tensor else "mixed"  # per tensor, one NaN makes all NaN
            xs.append(layout_input(site.quantizer.spec, kind, site.layout, _seed("half", i)).to(dtype))
    return xs


@pytest.mark.parametrize(("dialect", "runtime"), RUNS, ids=RUN_IDS)
def test_half_precision_activations(dialect, runtime):
    """bf16/fp16 in, the same dtype out: computed in fp32 and cast back, as the reference does
    (absmax decode scales are not powers of two, so the cast back rounds)."""
    sites = [Site(s.quantizer, s.layout) for _ in HALF_DTYPES for s in HALF_SITES]
    xs = half_inputs()
    got = runner(cached_export(("half", dialect), Quantizes(sites), dialect, tuple(xs)), runtime)(xs)
    for site, x, out in zip(sites, xs, got):
        assert_same_bits(out, site.quantizer(x, site.axis), x)


# ---- rotations -----------------------------------------------------------------------------------


def _dtype_suffix(dtype: torch.dtype) -> str:
    return "" if dtype == torch.float32 else "-" + str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Rotated:
    rotation: Rotation
    shape: tuple[int, ...]
    axis: int = -1
    inverse: bool = False
    exact: bool = True
    dtype: torch.dtype = torch.float32

    def __str__(self) -> str:
        shape = "x".join(map(str, self.shape))
        inverse = "-inverse" if self.inverse else ""
        return f"{self.rotation}-{shape}-axis{self.axis}{inverse}{_dtype_suffix(self.dtype)}"


SIGNS16 = tuple(int(s) for s in random_signs(16, seed=5))
ROTATIONS = [
    Rotated(Rotation(16), (6, 64)),
    Rotated(Rotation(32), (6, 64)),
    Rotated(Rotation(64), (6, 128)),
    Rotated(Rotation(128), (6, 256)),
    Rotated(Rotation(128), (6, 256), inverse=True),
    Rotated(Rotation(32, seed=0), (6, 96)),
    Rotated(Rotation(32, seed=0), (6, 96), inverse=True),
    Rotated(Rotation(16, signs=SIGNS16), (6, 48)),
    Rotated(Rotation(16, signs=SIGNS16), (6, 48), inverse=True),
    Rotated(Rotation(32), (6, 40)),  # zero-padded to 64
    Rotated(Rotation(64, seed=3), (6, 33), inverse=True),  # zero-padded to 64
    Rotated(Rotation(32), (40, 6), axis=0),
    Rotated(Rotation(16, seed=1), (3, 40, 4), axis=1),
    Rotated(Rotation(None), (6, 64)),
    Rotated(Rotation(None, seed=0), (6, 128)),
    Rotated(Rotation(None, seed=0), (6, 128), inverse=True),
    Rotated(Rotation(None), (32, 5), axis=0),
    Rotated(Rotation(None), (6, 96), exact=False),  # 8 x Paley 12: a MatMul
    Rotated(Rotation(None, seed=2), (6, 12), inverse=True, exact=False),
    Rotated(Rotation(None), (2, 28, 3), axis=1, exact=False),
    Rotated(Rotation(32, seed=0), (6, 64), dtype=torch.bfloat16),  # computed in fp32, cast back
    Rotated(Rotation(None), (6, 64), inverse=True, dtype=torch.float16),
]
ROTATION_KINDS = ["random", "integers", "specials"]


class Rotates(torch.nn.Module):
    def __init__(self, sites: list[Rotated]):
        super().__init__()
        self.ops = [(site.rotation.to_json(), site.axis, site.inverse) for site in sites]

    def forward(self, *xs):
        return tuple(torch.ops.qpass.rotate(x, *op) for x, op in zip(xs, self.ops))


def rotation_input(site: Rotated, kind: str, seed: int) -> torch.Tensor:
    return _rotation_input(site, kind, seed).to(site.dtype)


def _rotation_input(site: Rotated, kind: str, seed: int) -> torch.Tensor:
    """Gaussian values; small integers (every sum exact); or specials: NaN, ±Inf, signed zeros,
    fp32 subnormals and values near fp32's max (whose sums overflow) among ordinary values."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(site.shape, generator=gen) * 10
    if kind == "integers":
        return torch.randint(-8, 9, site.shape, generator=gen).float()
    x = torch.randn(site.shape, generator=gen).reshape(-1)
    picks = torch.randint(0, 6, x.shape, generator=gen)
    x = torch.where(picks == 0, torch.randint(1, 50, x.shape, generator=gen) * 2.0**-149, x)
    x = torch.where(picks == 1, torch.full_like(x, -0.0), x)
    x = torch.where(picks == 2, (0.5 + torch.rand(x.shape, generator=gen) / 2) * F32_MAX, x)
    x[[0, 7, 13]] = torch.tensor([math.nan, math.inf, -math.inf])
    x = x.reshape(site.shape).movedim(site.axis, -1)
    x[..., 1, :] = -0.0  # a whole line of -0.0 along the axis
    return x.movedim(-1, site.axis).contiguous()


@functools.cache
def rotation_outputs(dialect: str, runtime: str) -> dict[str, list[torch.Tensor]]:
    inputs = {
        kind: [rotation_input(s, kind, _seed("rotate", kind, i)) for i, s in enumerate(ROTATIONS)]
        for kind in ROTATION_KINDS
    }
    run = runner(rotation_model(dialect), runtime)
    return {kind: (xs, run(xs)) for kind, xs in inputs.items()}


@functools.cache
def rotation_model(dialect: str) -> onnx.ModelProto:
    return export(Rotates(ROTATIONS), dialect, tuple(torch.randn(s.shape, dtype=s.dtype) for s in ROTATIONS))


@pytest.mark.slow
@pytest.mark.parametrize(("dialect", "runtime"), RUNS, ids=RUN_IDS)
@pytest.mark.parametrize("index", range(len(ROTATIONS)), ids=[str(s) for s in ROTATIONS])
def test_rotation(index, dialect, runtime):
    """Power-of-two blocks and full sizes: the reference's bits. A Paley factor: a MatMul, whose
    summation order is the runtime's, so only close (on finite inputs)."""
    site = ROTATIONS[index]
    for kind, (xs, outputs) in rotation_outputs(dialect, runtime).items():
        x, got = xs[index], outputs[index]
        expected = site.rotation(x, site.axis, site.inverse)
        if site.exact:
            assert_same_bits(got, expected, x)
        elif kind != "specials":
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---- stored weights ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Weight:
    quantizer: Quantizer
    kind: str
    axis: int  # 1: [12, 40] along K = 40; 0: [33, 12] along K = 33
    dtype: torch.dtype = torch.float32

    def value(self) -> torch.Tensor:
        length = 40 if self.axis == 1 else 33
        rows = adversarial(self.quantizer.spec, self.kind, 12, length, _seed("weight", self))
        return (rows if self.axis == 1 else rows.t().contiguous()).to(self.dtype)

    def __str__(self) -> str:
        return f"{self.quantizer}-{self.kind}-axis{self.axis}{_dtype_suffix(self.dtype)}"


def format_weights(name: str) -> list[Weight]:
    """Each granularity of format ``name``, along both axes, on mixed corner cases (per tensor, where
    one NaN would make every value NaN: on ties, tiny and huge values, signed zeros, and a NaN)."""
    spec = NAMED_FORMATS[name]
    if spec.scaling == "absmax":
        channel, block32, block16 = (Quantizer(name, granularity=g) for g in GRANULARITIES[1:])
        tensor = Quantizer(name, granularity="tensor")
        return [
            Weight(channel, "mixed", 1), Weight(channel, "mixed", 0), Weight(block32, "mixed", 1),
            Weight(block16, "mixed", 0),
            *(Weight(tensor, kind, 1) for kind in ("ties", "tiny", "huge", "nan")),
            Weight(tensor, "signed_zeros", 0),
        ]
    if spec.scaling == "nvfp4":
        tiles = Quantizer(name, granularity=("tile", 16))
        four_over_six = [Quantizer(name, scale_mode="4over6"), replace(tiles, scale_mode="4over6")]
        return [Weight(q, "mixed", axis) for q in (Quantizer(name), tiles, *four_over_six) for axis in (1, 0)]
    return [Weight(Quantizer(name), "mixed", 1), Weight(Quantizer(name), "mixed", 0),
            Weight(Quantizer(name, scale_mode="rceil"), "mixed", 1)]


class StoredWeights(torch.nn.Module):
    """``dequantize_packed`` of weights stored as :func:`qpass.onnx.prepare.store_weights` stores
    them: codes, scales and tensor scale as buffers, typed per dialect and named with its suffixes
    (the export gives the qdq dialect's MX scales their E8M0 type by name). Its input only keeps the
    graph from being inputless."""

    def __init__(self, weights: list[Weight], dialect: str):
        super().__init__()
        self.calls = []
        for i, weight in enumerate(weights):
            value = weight.value()
            stored = _stored_tensors(value, weight.quantizer, weight.axis, dialect)
            names = [f"w{i}_{suffix}" for suffix in _suffixes(weight.quantizer, dialect)]
            for name, tensor in zip(names, stored):
                self.register_buffer(name, tensor)
            call = (names, weight.quantizer.to_json(), list(value.shape), weight.axis, weight.dtype)
            self.calls.append(call)

    def forward(self, x):
        out = [
            torch.ops.qpass.dequantize_packed(*(getattr(self, name) for name in names), q, shape, axis, dtype)
            for names, q, shape, axis, dtype in self.calls
        ]
        return (*out, x + 1)


def stored_types(dialect: str, index: int) -> dict[str, str]:
    """The ONNX types of weight ``index``'s initializers in the export, by part."""
    initializers = weights_model(dialect).graph.initializer
    types = {i.name: onnx.TensorProto.DataType.Name(i.data_type) for i in initializers}
    names = [f"w{index}_{suffix}" for suffix in _suffixes(ALL_WEIGHTS[index].quantizer, dialect)]
    parts = ("codes", "scales", "tensor_scale")
    return {part: types[name] for part, name in zip(parts, names) if name in types}


ALL_WEIGHTS = [w for name in NAMED_FORMATS for w in format_weights(name)] + [
    # dequantized in fp32, then cast (rounded: these decode scales are no powers of two)
    Weight(Quantizer("fp8_e4m3", granularity="channel"), "mixed", 1, torch.bfloat16),
    Weight(Quantizer("nvfp4"), "mixed", 0, torch.float16),
]


@functools.cache
def weights_model(dialect: str) -> onnx.ModelProto:
    return export(StoredWeights(ALL_WEIGHTS, dialect), dialect, (torch.zeros(1),))


@functools.cache
def weights_outputs(dialect: str, runtime: str) -> list[torch.Tensor]:
    return runner(weights_model(dialect), runtime)([torch.zeros(1)])


WEIGHT_CASES = [
    pytest.param(i, dialect, runtime, id=f"{w}-{dialect}-{runtime}")
    for i, w in enumerate(ALL_WEIGHTS)
    for dialect, runtime in RUNS
]


@pytest.mark.slow
@pytest.mark.parametrize(("index", "dialect", "runtime"), WEIGHT_CASES)
def test_stored_weight_gives_the_reference_bits(index, dialect, runtime):
    weight = ALL_WEIGHTS[index]
    value = weight.value()
    expected = qpass.dequantize(qpass.quantize(value, weight.quantizer.spec, weight.axis))
    assert_same_bits(weights_outputs(dialect, runtime)[index], expected, value)


# The ONNX types the qdq dialect stores each element format's codes in (fp6: bytes, no ONNX type
# below opset 28), and its MX scales in.
QDQ_CODE_TYPES = {
    "fp8_e4m3": "FLOAT8E4M3FN", "fp8_e5m2": "FLOAT8E5M2", "fp4_e2m1": "FLOAT4E2M1", "int8": "INT8",
    "fp6_e2m3": "UINT8", "fp6_e3m2": "UINT8",
}


def _scale_type(spec: FormatSpec) -> str:
    if spec.scaling == "absmax":
        return "FLOAT"
    if spec.scaling == "nvfp4":
        return "FLOAT8E4M3FN"
    return "UINT8" if spec.element.bits == 6 else "FLOAT8E8M0"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NAMED_FORMATS))
def test_qdq_stores_weights_in_onnx_element_types(name):
    spec = NAMED_FORMATS[name]
    expected = {"codes": QDQ_CODE_TYPES[spec.element.name], "scales": _scale_type(spec)}
    if spec.scaling == "nvfp4":
        expected["tensor_scale"] = "FLOAT"
    for i, weight in enumerate(ALL_WEIGHTS):
        if (weight.quantizer.spec.element, weight.quantizer.spec.scaling) == (spec.element, spec.scaling):
            assert stored_types("qdq", i) == expected, weight


@pytest.mark.slow
def test_portable_stores_weights_as_bytes():
    for i, weight in enumerate(ALL_WEIGHTS):
        scaling = weight.quantizer.spec.scaling
        expected = {"codes": "UINT8", "scales": "FLOAT" if scaling == "absmax" else "UINT8"}
        if scaling == "nvfp4":
            expected["tensor_scale"] = "FLOAT"
        assert stored_types("portable", i) == expected, weight


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # onnx.reference on Inf/NaN inputs
@pytest.mark.slow
@pytest.mark.parametrize("dialect", list(RUNTIMES))
def test_a_saved_file_runs_the_same(dialect, tmp_path):
    """Through a file and :func:`qpass.onnx.check.run`, which picks the runtime a dialect is meant
    for (ONNX Runtime with constant folding off, or onnx.reference)."""

    path = tmp_path / f"{dialect}.onnx"
    onnx.save(activation_model(dialect), path)
    xs = activation_inputs()["mixed"]
    for out, expected in zip(run(path, xs), activation_outputs(dialect, RUNTIMES[dialect][0])["mixed"]):
        assert_same_bits(out, expected)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.slow
@pytest.mark.parametrize(
    "dialect",
    [
        "portable",
        "qdq",
    ],
)
def test_a_saved_file_with_a_bfloat16_output_runs(dialect, tmp_path):

    path = tmp_path / f"{dialect}.onnx"
    onnx.save(weights_model(dialect), path)
    got = run(path, (torch.zeros(1),))
    index = next(i for i, w in enumerate(ALL_WEIGHTS) if w.dtype == torch.bfloat16)
    assert_same_bits(got[index], weights_outputs(dialect, RUNTIMES[dialect][0])[index])


# ---- what cannot be exported exactly -------------------------------------------------------------


@pytest.mark.parametrize(
    ("format", "dialect"), [("mxfp4", "portable"), ("nvfp4", "qdq"), ("fp6_e3m2", "qdq")],
)
def test_stochastic_rounding_raises(format, dialect):
    quantizer = Quantizer(format, rounding="stochastic")
    with pytest.raises(Exception) as caught:
        export(Quantizes([Site(quantizer)]), dialect, (torch.randn(4, 32),))
    assert "stochastic" in messages(caught.value)


def test_stochastic_rounding_of_a_stored_weight_raises():
    with pytest.raises(ValueError, match="stochastic"):
        _stored_tensors(torch.randn(4, 32), Quantizer("mxfp4", rounding="stochastic"), 1, "qdq")


class _Delayed(torch.nn.Module):
    def forward(self, x):
        return torch.ops.qpass.quantize_dequantize(x, Quantizer("fp8_e4m3").to_json(), -1, "some_state")


NVFP4_TILES = Quantizes([Site(Quantizer("nvfp4", granularity=("tile", 16)))])
RESAMPLED = Rotates([Rotated(Rotation(32, resample=True), (4, 32))])


@pytest.mark.parametrize(
    ("module", "reason"),
    [
        pytest.param(NVFP4_TILES, "tiles", id="nvfp4-tiles"),
        pytest.param(_Delayed(), "delayed scaling", id="delayed-scaling"),
        pytest.param(RESAMPLED, "fresh random signs", id="resampled-rotation"),
    ],
)
def test_what_has_no_exact_onnx_form_raises(module, reason):
    with pytest.raises(Exception) as caught:
        export(module, "portable", (torch.randn(4, 32),))
    assert reason in messages(caught.value)


# ---- building blocks -----------------------------------------------------------------------------


@torch.library.custom_op("qpass_test::floor_log2", mutates_args=())
def _floor_log2(x: torch.Tensor) -> torch.Tensor:
    """The reference's floor(log2 x) (finite x > 0), and 0 elsewhere as numerics.floor_log2 says."""
    defined = x.isfinite() & (x > 0)
    return torch.where(defined, reference_floor_log2(torch.where(defined, x, 1.0)).float(), 0.0)


@_floor_log2.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("qpass_test::pow2", mutates_args=())
def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    one = torch.ones_like(exponent, dtype=torch.float64)
    return torch.ldexp(one, exponent.double()).float()  # 2^128 rounds to inf


@_pow2.register_fake
def _(exponent):
    return torch.empty_like(exponent)


class _Blocks(torch.nn.Module):
    def forward(self, x, e):
        return torch.ops.qpass_test.floor_log2(x), torch.ops.qpass_test.pow2(e)


def every_binade() -> torch.Tensor:
    """Each power of two of fp32 (2^-149 .. 2^127), one ulp either side, random significands in
    each binade, fp32's max; and where floor_log2 is 0 by definition: 0, -0, negatives, ±Inf, NaN."""
    powers = _pow2(torch.arange(-149, 128).float())
    below = torch.nextafter(powers, torch.zeros(()))
    above = torch.nextafter(powers, torch.full((), math.inf))
    gen = torch.Generator().manual_seed(0)
    inside = (powers[:, None] * (1 + torch.rand(277, 8, generator=gen))).reshape(-1)
    specials = torch.tensor([0.0, -0.0, -1.0, -2.0**-149, math.inf, -math.inf, math.nan, F32_MAX])
    return torch.cat([powers, below, above, inside, specials])


@functools.cache
def blocks_model(dialect: str) -> onnx.ModelProto:
    x, e = every_binade(), torch.arange(-149, 129).float()
    table = {
        **translation_table(dialect),
        torch.ops.qpass_test.floor_log2.default: numerics.floor_log2,
        torch.ops.qpass_test.pow2.default: numerics.pow2,
    }
    with quiet():
        program = torch.onnx.export(
            _Blocks(), (x, e), dynamo=True, opset_version=OPSETS[dialect], optimize=False,
            custom_translation_table=table, verbose=False,
        )
    return onnx_ir.to_proto(program.model)


@pytest.mark.parametrize(("dialect", "runtime"), RUNS, ids=RUN_IDS)
def test_floor_log2_and_pow2_are_exact_over_every_binade(dialect, runtime):
    x, e = every_binade(), torch.arange(-149, 129).float()
    floor_log2, powers = runner(blocks_model(dialect), runtime)([x, e])
    assert_same_bits(floor_log2, _floor_log2(x), x)
    assert_same_bits(powers, _pow2(e), e)
    assert powers[-1].item() == math.inf and powers[0].item() == 2.0**-149
