"""qpass checkpoints: ``qpass.save_pretrained`` and ``qpass.from_pretrained`` (SPEC section 11).

A checkpoint is a directory:

- ``qpass-model.safetensors``: every quantized weight as its codes and scales, in the layout of SPEC
  section 4 (fp4 two codes per byte, E8M0 and E4M3 scale bytes) except that fp6 codes are packed
  four to three bytes (as in the ONNX export), keyed ``<parameter>.qpass.codes`` / ``.qpass.scales``
  / ``.qpass.tensor_scale``; every other tensor of the model as it is (parameters, persistent and
  non-persistent buffers, delayed-scaling histories ``_qpass.*``), and calibration's statistics;
- ``qpass.json``: the format version, the recipe, ``qpass.compile``'s options, how each stored weight
  was quantized, why each other quantized site's weight was kept in high precision, the per-site
  plans (what ``qpass.report`` showed), calibration's SmoothQuant scales and GPTQ notes, tied
  parameters, and the SHA-256 of the tensors file;
- for a Hugging Face model, its ``config.json`` (and generation config), so the directory is also a
  Hugging Face model directory for ``AutoConfig`` and tokenizers (its weights are qpass's own file,
  which ``transformers`` does not read: use ``format="compressed-tensors"`` for that).

A weight is stored quantized when its site's GEMM quantizes the parameter itself: an inference
recipe's weight quantizer, after the site's Hadamard rotation and SmoothQuant scales, which are
applied before storing. What the graph computes from several parameters or rewrites (channel
splitting, the residual-stream rotation), expert weights, and every weight of a training recipe
(whose checkpoints keep high-precision master weights) stay in their own dtype, each with its reason.

Loading builds the model without weights (a Hugging Face model from its config, on the meta device),
puts each stored weight in place as a :class:`~qpass.stored.StoredWeight` (no fp32 copy is made),
and compiles it with the saved recipe and options; its sites then use the stored values as they are,
so its outputs are bit-identical to the saved model's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from qpass import capture
from qpass.passes.plan import SitePlan
from qpass.quantizer import Quantizer
from qpass.recipes import Recipe
from qpass.rotation import Rotation
from qpass.state import STATE_PREFIX
from qpass.stored import StoredWeight
from qpass.weight_quantization import WeightQuantization, weight_quantizations

FORMAT_VERSION = 1
TENSORS_FILE = "qpass-model.safetensors"
MANIFEST_FILE = "qpass.json"
STORED_PARTS = ("codes", "scales", "tensor_scale")
CALIBRATION_PREFIX = "qpass.calibration."  # a site's per-channel input maxima (OCS)
FORMATS = ("qpass", "compressed-tensors")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it was saved: the message names the file and the field."""


# ---- saving --------------------------------------------------------------------------------------


def save_pretrained(model: nn.Module, path, format: str = "qpass") -> Path:
    """Write ``model`` (compiled by :func:`qpass.compile`, run at least once) to the directory
    ``path``: a qpass checkpoint, or with ``format="compressed-tensors"`` the format serving engines
    and ``transformers`` load (:mod:`qpass.compressed_tensors`). Returns the directory."""
    if format not in FORMATS:
        raise ValueError(f"unknown checkpoint format {format!r}; expected one of {', '.join(FORMATS)}")
    if format == "compressed-tensors":
        from qpass.compressed_tensors import save  # needs the compressed-tensors package

        return save(model, path)
    from safetensors.torch import save_file

    state = capture.state_of(model, "qpass.save_pretrained")
    stored, kept = weight_quantizations(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, aliases = _tensors(model, stored)
    tensors.update({CALIBRATION_PREFIX + site: v.detach().cpu().contiguous()
                    for site, v in state.calibration.items()})
    save_file(tensors, path / TENSORS_FILE)
    manifest = {
        "format": "qpass",
        "version": FORMAT_VERSION,
        "sha256": _sha256(path / TENSORS_FILE),
        "recipe": json.loads(state.recipe.to_json()),
        "compile": {"backend": state.backend, "kernels": state.kernels, "blocks": list(state.blocks),
                    **state.options},
        "model": _model_kind(model),
        "stored": {name: _stored_entry(w, model.get_parameter(name)) for name, w in stored.items()},
        "high_precision": kept,
        "aliases": aliases,
        "frozen": [name for name, p in model.named_parameters() if not p.requires_grad],
        "training": [name for name, module in model.named_modules() if module.training],
        "smoothing": state.smoothing,
        "calibrated": state.calibrated,
        "plans": {name: {"kind": plan.site.kind, "formats": _formats(plan), "excluded": plan.excluded}
                  for name, plan in sorted(state.plans.items())},
    }
    (path / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    if manifest["model"]["library"] == "transformers":
        model.config.save_pretrained(path)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(path)
    return path


def _formats(plan: SitePlan) -> dict[str, str]:
    return {f"{name}.{key}" if name else key: value
            for product, name in zip(plan.products, plan.site.op.product_names)
            for key, value in product.formats().items()}


def _model_kind(model: nn.Module) -> dict:
    cls = type(model)
    hugging_face = cls.__module__.startswith("transformers.") and hasattr(model, "config")
    library = "transformers" if hugging_face else ""
    return {"library": library, "class": f"{cls.__module__}.{cls.__qualname__}"}


def _non_persistent_buffers(model: nn.Module) -> set[str]:
    """Buffers a ``state_dict`` leaves out (rotary frequencies): a model built on the meta device
    has no values for them, so the checkpoint keeps them."""
    names = set()
    for prefix, module in model.named_modules():
        for name in module._non_persistent_buffers_set:
            if module._buffers.get(name) is not None:
                names.add(f"{prefix}.{name}" if prefix else name)
    return names


def _tensors(model: nn.Module, stored: dict[str, WeightQuantization]) -> tuple[dict[str, Tensor], dict]:
    """The file's tensors, and ``{key: the key it is tied to}`` (safetensors holds each tensor once)."""
    tensors, aliases, seen = {}, {}, {}
    entries = dict(model.state_dict(keep_vars=True))
    entries.update((name, model.get_buffer(name)) for name in _non_persistent_buffers(model))
    for key, value in entries.items():
        if id(value) in seen:
            aliases[key] = seen[id(value)]
            continue
        seen[id(value)] = key
        if key in stored:
            qt = stored[key].stored(value)
            for part in STORED_PARTS:
                if getattr(qt, part) is not None:
                    tensors[f"{key}.qpass.{part}"] = getattr(qt, part).detach().cpu().contiguous()
        elif isinstance(value, StoredWeight):
            raise ValueError(f"{key} is stored quantized, but no quantized site uses it now")
        else:
            tensors[key] = value.detach().cpu().contiguous().clone()
    return tensors, aliases


def _stored_entry(w: WeightQuantization, weight: Tensor) -> dict:
    return {"quantizer": json.loads(w.quantizer.to_json()),
            "rotation": json.loads(w.rotation.to_json()) if w.rotation else None,
            "shape": list(weight.shape), "axis": w.k_axis % weight.ndim,
            "dtype": str(weight.dtype).split(".")[-1],
            "sites": list(w.sites)}


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---- loading -------------------------------------------------------------------------------------


def from_pretrained(path, model: nn.Module | None = None, **compile_options) -> nn.Module:
    """The model saved by :func:`save_pretrained` in ``path``, compiled with its recipe; its outputs
    are bit-identical to the saved model's. A Hugging Face model is rebuilt from its config; any
    other model is given as ``model`` (its structure: it may be on the meta device). Quantized
    weights are loaded as :class:`~qpass.stored.StoredWeight` (codes and scales only).
    ``compile_options`` change ``qpass.compile``'s options (``backend=``, ``kernels=``), not the recipe."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    manifest = _manifest(path)
    tensors_file = path / TENSORS_FILE
    if not tensors_file.is_file():
        raise CheckpointError(f"{tensors_file}: missing (qpass.json names it as the checkpoint's tensors)")
    if _sha256(tensors_file) != manifest["sha256"]:
        raise CheckpointError(f"{tensors_file}: its SHA-256 is not the one {MANIFEST_FILE} recorded "
                              "(the file is corrupted, truncated or from another checkpoint)")
    try:
        tensors = load_file(tensors_file)
    except SafetensorError as error:
        raise CheckpointError(f"{tensors_file}: not a readable safetensors file ({error})") from error
    try:
        recipe = Recipe.from_json(json.dumps(manifest["recipe"]))
    except (TypeError, ValueError) as error:
        raise CheckpointError(
            f"{path / MANIFEST_FILE}: field 'recipe' is not a valid recipe ({error})") from error
    if model is None:
        model = _skeleton(path, manifest)
    _load_tensors(model, tensors, manifest, tensors_file)
    training = set(manifest["training"])  # dropout, and what else a module does in training mode
    for name, module in model.named_modules():
        module.training = name in training
    options = {**manifest["compile"], **compile_options}
    backend, kernels, blocks = options.pop("backend"), options.pop("kernels"), options.pop("blocks")
    from qpass.compile import compile

    model = compile(model, recipe, backend=backend, kernels=kernels, blocks=blocks, **options)
    state = model._qpass
    state.calibration = {key[len(CALIBRATION_PREFIX):]: tensors[key] for key in tensors
                         if key.startswith(CALIBRATION_PREFIX)}
    state.smoothing = manifest["smoothing"]
    state.calibrated = manifest["calibrated"]
    for key in tensors:
        if key.startswith(STATE_PREFIX):
            state.states.add_pending(key[len(STATE_PREFIX):], tensors[key])
    return model


def _manifest(path: Path) -> dict:
    file = path / MANIFEST_FILE
    if not file.is_file():
        raise CheckpointError(
            f"{file}: missing; {path} is not a qpass checkpoint (qpass.save_pretrained writes one)")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{file}: not valid JSON ({error})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != "qpass":
        raise CheckpointError(f"{file}: field 'format' is {manifest.get('format')!r}, expected 'qpass'")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{file}: field 'version' is {manifest.get('version')!r}; this qpass reads "
                              f"checkpoint format version {FORMAT_VERSION}")
    required = ("sha256", "recipe", "compile", "model", "stored", "aliases", "frozen", "training",
                "smoothing", "calibrated")
    missing = [key for key in required if key not in manifest]
    if missing:
        raise CheckpointError(f"{file}: missing field(s) {', '.join(missing)}")
    return manifest


def _skeleton(path: Path, manifest: dict) -> nn.Module:
    """A Hugging Face model built from the directory's config on the meta device."""
    kind = manifest["model"]
    if kind.get("library") != "transformers":
        raise ValueError(f"{path} holds a {kind.get('class')}, which qpass cannot build by itself: pass its "
                         "structure as qpass.from_pretrained(path, model=...) (it may be on the meta device)")
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    cls = getattr(transformers, kind["class"].rsplit(".", 1)[-1], None)
    if cls is None:
        raise CheckpointError(f"{path / MANIFEST_FILE}: field 'model' names {kind['class']}, which this "
                              f"transformers {transformers.__version__} does not have")
    with torch.device("meta"):
        return cls._from_config(config, dtype=config.dtype)


def _load_tensors(model: nn.Module, tensors: dict[str, Tensor], manifest: dict, file: Path) -> None:
    """Every parameter and buffer of ``model`` from the file: stored weights as StoredWeights, ties
    as they were; a tensor the model lacks or one it needs and the file lacks is an error."""
    stored = manifest["stored"]
    values: dict[str, Tensor] = {}
    for name, entry in stored.items():
        values[name] = _stored_weight(name, entry, tensors, file)
    stored_keys = {f"{name}.qpass.{part}" for name in stored for part in STORED_PARTS}
    state_keys = {key for key in tensors if key.startswith((STATE_PREFIX, CALIBRATION_PREFIX))}
    values.update((key, value) for key, value in tensors.items()
                  if key not in stored_keys and key not in state_keys)
    for key, target in manifest["aliases"].items():
        values[key] = values[target]
    expected = dict(model.named_parameters(remove_duplicate=False))
    expected.update(model.named_buffers(remove_duplicate=False))
    missing = sorted(set(expected) - set(values))
    unexpected = sorted(set(values) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{file}: does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    frozen = set(manifest["frozen"])
    made: dict[int, Tensor] = {}
    for key in expected:
        value = values[key]
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{file}: {key} has shape {tuple(value.shape)}, the model's is "
                                  f"{tuple(expected[key].shape)}")
        module_path, _, name = key.rpartition(".")
        module = model.get_submodule(module_path)
        if name in module._parameters:
            if id(value) not in made:  # a tied parameter is one Parameter again
                made[id(value)] = nn.Parameter(value, requires_grad=not (key in frozen or isinstance(
                    value, StoredWeight) or not value.is_floating_point()))
            module._parameters[name] = made[id(value)]
        else:
            module._buffers[name] = value


def _stored_weight(name: str, entry: dict, tensors: dict[str, Tensor], file: Path) -> StoredWeight:
    try:
        quantizer = Quantizer(*entry["quantizer"])
        rotation = Rotation(*entry["rotation"]) if entry["rotation"] else None
        shape, axis, dtype = tuple(entry["shape"]), int(entry["axis"]), getattr(torch, entry["dtype"])
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{file.parent / MANIFEST_FILE}: field stored[{name!r}] is not a stored "
                              f"weight's description ({error})") from error
    parts = {part: tensors.get(f"{name}.qpass.{part}") for part in STORED_PARTS}
    spec = quantizer.spec
    if parts["codes"] is None or parts["scales"] is None or (spec.scaling == "nvfp4") != (
            parts["tensor_scale"] is not None):
        raise CheckpointError(f"{file}: {name}'s codes, scales or tensor scale are missing")
    weight = StoredWeight(parts["codes"], parts["scales"], parts["tensor_scale"], quantizer.to_json(), shape,
                          axis, dtype, rotation.to_json() if rotation else "")
    expected = _expected_codes(spec, shape, axis)
    if weight.codes.numel() != expected:
        raise CheckpointError(f"{file}: {name}.qpass.codes has {weight.codes.numel()} bytes; a {spec.name} "
                              f"weight of shape {shape} has {expected}")
    return weight


def _expected_codes(spec, shape: tuple[int, ...], axis: int) -> int:
    rows = 1
    for i, size in enumerate(shape):
        rows *= 1 if i == axis else size
    length = spec.padded_length(shape[axis])
    return rows * (-(-length // 4) * 3 if spec.element.bits == 6 else length * spec.element.bits // 8)
