"""Export to compressed-tensors: ``qpass.save_pretrained(qm, path, format="compressed-tensors")``.

compressed-tensors is the checkpoint format llm-compressor writes and vLLM, SGLang and
``transformers`` load: a Hugging Face model directory whose ``config.json`` has a
``quantization_config`` (config groups of weight and input-activation schemes, and an ignore list of
the linear layers left in high precision) and whose ``model.safetensors`` holds each quantized
weight under compressed-tensors' own names (``weight`` + ``weight_scale`` for FP8 and MXFP8,
``weight_packed`` + ``weight_scale`` for MXFP4 and MXFP6, and ``weight_global_scale`` for NVFP4).

SPEC section 11 allows an export only where the format says exactly what qpass computes: the
compressed-tensors package's own decompressor must give back each site's dequantized weight bit for
bit. The tensors written are qpass's codes and scales themselves: SPEC section 4's layout is the
format's (fp4 two codes a byte low nibble first, fp6 four codes to three bytes, E8M0 exponent bytes,
E4M3 scale bytes), so nothing is quantized again. compressed-tensors' compressors would quantize the
dequantized weight a second time, and their FP4 and FP6 rounding reads the sign from ``x < 0``, which
turns qpass's negative zeros positive. Every weight is then decompressed by the compressor its
scheme names and compared with qpass's bits before anything is written; the one encoding qpass
chooses is NVFP4's global scale, since compressed-tensors dequantizes ``code * (scale / G)`` where
qpass computes ``code * (scale * g)``: ``G`` is the fp32 nearest ``1 / g`` for which the two agree.

What the format cannot express is refused with a ValueError naming the sites and the reason
(docs/compressed_tensors.md has the table): rotations, online SmoothQuant scales, formats it has
no scheme for, weights qpass keeps in high precision, quantized attention. Inputs are quantized the
way compressed-tensors' scheme says, dynamically per token (FP8) or per block of 32 (MX), with its
own scale rule; NVFP4 inputs need a static global scale from calibration, which qpass does not
have, so an NVFP4 site is exported weight-only, with a warning.
"""

from __future__ import annotations

import copy
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from compressed_tensors.compressors import BaseCompressor, ModelCompressor
from compressed_tensors.compressors.format import infer_module_format
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    QuantizationStrategy,
    QuantizationType,
)
from torch import Tensor, nn

from qpass import capture
from qpass.formats import QTensor, dequantize
from qpass.formats.packing import pack_fp6
from qpass.formats.spec import MX_BLOCK, NVFP4_BLOCK
from qpass.quantizer import Quantizer
from qpass.state import STATE_PREFIX, QpassState
from qpass.weight_quantization import WeightQuantization, weight_quantizations

WEIGHTS_FILE = "model.safetensors"
# The MX formats compressed-tensors has a compressor for, by element bits: E4M3, E2M3 and E2M1 only.
MX_FORMATS = {"mxfp8_e4m3": 8, "mxfp6_e2m3": 6, "mxfp4": 4}
# compressed-tensors decompresses MX and NVFP4 weights to bfloat16 whatever the model's dtype.
DECOMPRESSED_DTYPE = torch.bfloat16
SAME_SIZE_INTEGER = {4: torch.int32, 2: torch.int16}  # to compare floats bit for bit (signed zeros too)
NVFP4_GLOBAL_SCALE_ULPS = 4  # how far from fl(1 / g) the search for NVFP4's global scale goes

ROTATED = ("its GEMM rotates both operands by a Hadamard ({rotation}); compressed-tensors' hadamard "
           "transform is the same matrix, but it rotates inputs online with its own arithmetic (a dense "
           "fp32 matmul divided by sqrt(n)), so the inputs it quantizes are not qpass's: compile with "
           "hadamard=None")
ONLINE_SMOOTHING = ("SmoothQuant divides its input by per-channel scales at run time (no norm takes "
                    "them); compressed-tensors has no per-channel input scaling")
ACTIVATION_PRODUCT = ("a product of two activations (attention=True); compressed-tensors quantizes "
                      "linear layers' weights and inputs")
NOT_WHOLE_BLOCKS = "K = {k} is not a multiple of its scaling block ({block}): compressed-tensors does not pad"
NOT_BFLOAT16 = ("compressed-tensors decompresses {format} weights to bfloat16 whatever the model's dtype, "
                "so a {dtype} weight would not come back (and transformers' default loading fails on "
                "{dtype} inputs): export a bfloat16 model")


@dataclass(frozen=True)
class _Linear:
    """One linear layer as the export writes it."""

    module: str
    scheme: QuantizationScheme  # its targets are set when the config groups are made
    tensors: dict[str, Tensor]  # compressed-tensors' local names: weight_packed, weight_scale, ...
    norms: dict[str, Tensor]  # SmoothQuant's 1/s folded into a norm's weight (and bias), by path
    weight_only: Quantizer | None  # the input quantizer the format cannot express (NVFP4), if any


def save(model: nn.Module, path) -> Path:
    """Write ``model`` (compiled by :func:`qpass.compile` with an inference recipe, run at least
    once) to the directory ``path`` in compressed-tensors' format; returns the directory. Raises
    ValueError, naming the sites and why, when the format cannot express what the model computes."""
    from safetensors.torch import save_file
    from transformers import PreTrainedModel

    what = "qpass.save_pretrained(format='compressed-tensors')"
    state = capture.state_of(model, what)
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"{what} writes a Hugging Face model directory; a {type(model).__name__} is not a "
                         "transformers model (save it with format='qpass')")
    linears = _linears(model, state)
    dropped = sorted({str(linear.weight_only) for linear in linears if linear.weight_only is not None})
    if dropped:
        warnings.warn(
            f"compressed-tensors quantizes NVFP4 inputs with a static global scale that calibration "
            f"chose; qpass's {', '.join(dropped)} inputs take theirs from each call, which the format "
            "cannot say: those layers are exported weight-only (NVFP4A16), their inputs in high precision",
            stacklevel=3)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(_tensors(model, linears), path / WEIGHTS_FILE, metadata={"format": "pt"})
    config = copy.deepcopy(model.config)  # as transformers' save_pretrained writes it
    config.dtype = str(model.dtype).removeprefix("torch.")
    config.architectures = [type(model).__name__]
    config.save_pretrained(path)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(path)
    ModelCompressor(quantization_config=_config(model, linears)).update_config(str(path))
    return path


# ---- what each site becomes ------------------------------------------------------------------------


def _linears(model: nn.Module, state: QpassState) -> list[_Linear]:
    """Every quantized weight as a compressed-tensors linear layer, or a ValueError that lists, per
    reason, the sites the format cannot express."""
    stored, kept = weight_quantizations(model)
    refused: dict[str, list[str]] = defaultdict(list)
    for name, plan in sorted(state.plans.items()):
        if plan.excluded is not None:
            continue
        parameter = plan.site.parameter or plan.name
        if parameter in kept:
            refused[f"qpass keeps its weight in high precision: {kept[parameter]}"].append(name)
        elif not plan.site.parameter:
            refused[ACTIVATION_PRODUCT].append(name)
    linears = []
    for weight in stored.values():
        found = _linear(model, state, weight)
        if isinstance(found, str):
            refused[found] += weight.sites
        else:
            linears.append(found)
    if refused:
        reasons = "\n".join(
            f"- {sites[0]}{f' and {len(sites) - 1} more sites' if len(sites) > 1 else ''}: {reason}"
            for reason, sites in refused.items())
        raise ValueError(f"compressed-tensors cannot express what this model (recipe "
                         f"{state.recipe.name!r}) computes:\n{reasons}")
    return linears


def _linear(model: nn.Module, state: QpassState, weight: WeightQuantization) -> _Linear | str:
    module_name, _, leaf = weight.parameter.rpartition(".")
    module = model.get_submodule(module_name)
    if not isinstance(module, nn.Linear) or leaf != "weight":
        return f"compressed-tensors quantizes nn.Linear weights, not a {type(module).__name__}'s {leaf}"
    if weight.rotation is not None:
        return ROTATED.format(rotation=weight.rotation)
    if weight.smoothing is not None and weight.smoothing.online:
        return ONLINE_SMOOTHING
    plans = [state.plans[site] for site in weight.sites]
    if any(plan.occ is not None for plan in plans):
        return "outlier clamping with a high-precision compensation GEMM, which compressed-tensors cannot say"
    inputs = {plan.products[0].quantizers.a for plan in plans}
    if len(inputs) > 1:
        return "its sites quantize their inputs differently"
    (input_quantizer,) = inputs
    parameter = model.get_parameter(weight.parameter)
    weight_args = _weight_args(weight.quantizer, parameter)
    if isinstance(weight_args, str):
        return weight_args
    nvfp4_input = input_quantizer is not None and input_quantizer.spec.scaling == "nvfp4"
    weight_only = input_quantizer if nvfp4_input else None
    input_args = None if nvfp4_input else _input_args(input_quantizer, parameter.shape[-1])
    if isinstance(input_args, str):
        return input_args
    scheme = QuantizationScheme(targets=[module_name], weights=weight_args, input_activations=input_args)
    scheme.format = infer_module_format(nn.Linear, scheme).value
    tensors = _compressed(weight, parameter, scheme)
    if isinstance(tensors, str):
        return tensors
    norms = {}
    if weight.smoothing is not None:  # folded into the norms, as the graph folds it (qpass.passes.smooth)
        norms = {path: weight.smoothing.scale_norm(model.get_parameter(path).detach())
                 for plan in plans for path in plan.smooth_norm}
    return _Linear(module_name, scheme, tensors, norms, weight_only)


def _weight_args(quantizer: Quantizer, weight: Tensor) -> QuantizationArgs | str:
    """compressed-tensors' scheme for a weight ``[N, K]`` quantized along K, or why it has none."""
    spec = quantizer.spec
    k = weight.shape[-1]
    if spec.scaling == "absmax":
        if spec.name != "fp8_e4m3":
            return (f"{spec.name} weights: compressed-tensors' float weights are E4M3 (per tensor, channel "
                    "or group), MXFP8/6/4 and NVFP4")
        return _fp8_args(spec, k, dynamic=False)
    if weight.dtype != DECOMPRESSED_DTYPE:
        return NOT_BFLOAT16.format(format=spec.name, dtype=str(weight.dtype).removeprefix("torch."))
    if spec.scaling == "mx":
        if spec.name not in MX_FORMATS:
            return f"{spec.name} weights: compressed-tensors' MX formats are {', '.join(MX_FORMATS)}"
        if k % MX_BLOCK:
            return NOT_WHOLE_BLOCKS.format(k=k, block=MX_BLOCK)
        return _mx_args(MX_FORMATS[spec.name], dynamic=False)
    if k % NVFP4_BLOCK:
        return NOT_WHOLE_BLOCKS.format(k=k, block=NVFP4_BLOCK)
    # One E4M3 scale per 1x16 block (a 16x16 tile's scale is stored on each of its rows: the same
    # values), an fp32 global scale per tensor. 4over6 changes how scales are chosen, not what they mean.
    return QuantizationArgs(num_bits=4, type=QuantizationType.FLOAT, group_size=NVFP4_BLOCK,
                            strategy=QuantizationStrategy.TENSOR_GROUP, symmetric=True, dynamic=False,
                            scale_dtype=torch.float8_e4m3fn, zp_dtype=torch.float8_e4m3fn)


def _input_args(quantizer: Quantizer | None, k: int) -> QuantizationArgs | None | str:
    """compressed-tensors' dynamic scheme for a linear's input, or why it has none. The scales are
    the format's own: FP8's is ``amax / 448`` (in the input's dtype) where qpass takes
    ``1 / (448 / amax)`` in fp32; an MX block's exponent is that of its amax rounded up at 1.75
    (E4M3, E2M1) or 1.9375 (E2M3), which is qpass's ``"even"`` for MXFP6 and MXFP4 and its
    ``"rceil"`` for MXFP8 but for an amax of exactly 1.75 times a power of two. Other scale modes
    give other inputs; docs/compressed_tensors.md measures how far."""
    if quantizer is None:
        return None
    spec = quantizer.spec
    if quantizer.rounding != "rne":
        return f"{quantizer.rounding} rounding of the inputs; compressed-tensors rounds to nearest even"
    if spec.scaling == "absmax" and spec.name == "fp8_e4m3" and not spec.pow2:
        return _fp8_args(spec, k, dynamic=True)
    if spec.scaling == "mx" and spec.name in MX_FORMATS:
        return _mx_args(MX_FORMATS[spec.name], dynamic=True)
    return (f"{quantizer} inputs: compressed-tensors' dynamic input schemes are E4M3 per token, tensor or "
            f"group (absmax scales, not powers of two) and {', '.join(MX_FORMATS)}")


def _fp8_args(spec, k: int, dynamic: bool) -> QuantizationArgs | str:
    if spec.granularity == "block" and k % spec.block_size:
        return NOT_WHOLE_BLOCKS.format(k=k, block=spec.block_size)
    strategy, group_size = {
        "tensor": (QuantizationStrategy.TENSOR, None),
        # A linear's per-channel input scale is one per token.
        "channel": (QuantizationStrategy.TOKEN if dynamic else QuantizationStrategy.CHANNEL, None),
        "block": (QuantizationStrategy.GROUP, spec.block_size),
    }[spec.granularity]
    return QuantizationArgs(num_bits=8, type=QuantizationType.FLOAT, strategy=strategy, group_size=group_size,
                            symmetric=True, dynamic=dynamic)


def _mx_args(bits: int, dynamic: bool) -> QuantizationArgs:
    # uint8 scales in blocks of 32 are what makes compressed-tensors read a scheme as MX.
    return QuantizationArgs(num_bits=bits, type=QuantizationType.FLOAT, strategy=QuantizationStrategy.GROUP,
                            group_size=MX_BLOCK, symmetric=True, dynamic=dynamic, scale_dtype=torch.uint8,
                            zp_dtype=torch.uint8)


# ---- the compressed weights ------------------------------------------------------------------------


def _compressed(
    weight: WeightQuantization, parameter: Tensor, scheme: QuantizationScheme
) -> dict[str, Tensor] | str:
    """The weight's compressed tensors under compressed-tensors' local names, checked against
    qpass's dequantized weight with compressed-tensors' own decompressor; or why they cannot be."""
    qt = weight.quantize(parameter)
    expected = dequantize(qt).cpu()
    if not expected.isfinite().all():
        return "its weight holds NaN or Inf, which qpass keeps as NaN groups and compressed-tensors cannot"
    tensors = _qpass_tensors(qt)
    decompressor = BaseCompressor.get_value_from_registry(scheme.format)

    def differing(candidate: dict[str, Tensor]) -> int:
        back = decompressor.decompress(dict(candidate), scheme)["weight"].to(expected.dtype)
        integer = SAME_SIZE_INTEGER[expected.element_size()]
        return int((back.view(integer) != expected.view(integer)).sum())

    if qt.format.scaling != "nvfp4":
        mismatches = differing(tensors)
        return tensors if mismatches == 0 else (
            f"compressed-tensors' decompressor does not give back its dequantized weight bit for bit "
            f"({mismatches} of {expected.numel()} elements differ)")
    for global_scale in _global_scale_candidates(qt.tensor_scale.cpu()):
        candidate = {**tensors, "weight_global_scale": global_scale}
        if differing(candidate) == 0:
            return candidate
    return (f"compressed-tensors dequantizes NVFP4 as code * (scale / global_scale), qpass as code * "
            f"(scale * g) (SPEC section 2), and no fp32 global scale within {NVFP4_GLOBAL_SCALE_ULPS} ulps "
            f"of 1/g gives the same bfloat16 weight: g = {qt.tensor_scale.item():.9g} makes some products "
            "exact bfloat16 ties, which the rounded quotient breaks the other way")


def _qpass_tensors(qt: QTensor) -> dict[str, Tensor]:
    """qpass's codes and scales (SPEC section 4, quantized along the last axis) by the names
    compressed-tensors gives them; the NVFP4 global scale is added by the caller."""
    spec = qt.format
    codes, scales = qt.codes.cpu(), qt.scales.cpu()
    if spec.scaling == "absmax":  # fp32 decode scales: [N, 1] per channel, [N, K / k] per block, [1]
        return {"weight": codes.view(torch.float8_e4m3fn), "weight_scale": scales.reshape(scales.shape or 1)}
    if spec.scaling == "mx":  # E8M0 codes are compressed-tensors' biased exponents
        if spec.element.bits == 8:
            return {"weight": codes.view(torch.float8_e4m3fn), "weight_scale": scales}
        return {"weight_packed": pack_fp6(codes) if spec.element.bits == 6 else codes, "weight_scale": scales}
    return {"weight_packed": codes, "weight_scale": scales.view(torch.float8_e4m3fn)}


def _global_scale_candidates(g: Tensor) -> list[Tensor]:
    """fl(1 / g) first, then its fp32 neighbours, nearest first: compressed-tensors' ``scale / G``
    rounds once, as qpass's ``scale * g`` does, but from another exact value, so the nearest
    quotient is not always the one that rounds alike."""
    bits = (1.0 / g.float()).reshape(1).view(torch.int32)
    offsets = [0] + [sign * step for step in range(1, NVFP4_GLOBAL_SCALE_ULPS + 1) for sign in (1, -1)]
    return [(bits + offset).view(torch.float32) for offset in offsets]


# ---- the directory ---------------------------------------------------------------------------------


def _tensors(model: nn.Module, linears: list[_Linear]) -> dict[str, Tensor]:
    """What ``model.safetensors`` holds: every tensor of the model's state dict, each tied one once
    (transformers ties it again on loading), the quantized weights as their compressed tensors."""
    compressed = {f"{linear.module}.weight": linear for linear in linears}
    norms = {path: value for linear in linears for path, value in linear.norms.items()}
    tensors, seen = {}, set()
    for key, value in model.state_dict(keep_vars=True).items():
        if key.startswith(STATE_PREFIX) or id(value) in seen:
            continue
        seen.add(id(value))
        if key in compressed:
            linear = compressed[key]
            tensors.update((f"{linear.module}.{name}", t.contiguous()) for name, t in linear.tensors.items())
        else:
            tensors[key] = norms.get(key, value).detach().cpu().contiguous()
    return tensors


def _config(model: nn.Module, linears: list[_Linear]) -> QuantizationConfig:
    """One config group per scheme; a single group targets the class ``Linear`` (as llm-compressor
    writes it), several target their modules by name. The ignore list names every other linear layer."""
    groups: dict[str, list[_Linear]] = defaultdict(list)
    for linear in linears:
        groups[linear.scheme.model_dump_json(exclude={"targets"})].append(linear)
    modules = dict(model.named_modules())
    by_class = len(groups) == 1 and all(type(modules[linear.module]) is nn.Linear for linear in linears)
    config_groups = {}
    for i, members in enumerate(groups.values()):
        scheme = members[0].scheme.model_copy(deep=True)
        scheme.targets = ["Linear"] if by_class else [linear.module for linear in members]
        config_groups[f"group_{i}"] = scheme
    exported = {linear.module for linear in linears}
    ignore = [name for name, module in modules.items()
              if isinstance(module, nn.Linear) and name not in exported]
    formats = {scheme.format for scheme in config_groups.values()}
    return QuantizationConfig(
        config_groups=config_groups, quantization_status=QuantizationStatus.COMPRESSED, ignore=ignore,
        format=formats.pop() if len(formats) == 1 else CompressionFormat.mixed_precision.value)
