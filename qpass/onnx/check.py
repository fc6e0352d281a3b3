"""Running and validating an exported model: ``qpass.onnx.session``, ``run``, ``decode`` and
``generate`` (one step, and greedy generation, of a decoder exported with its KV cache) and ``check``.

A portable export's weights are a subgraph of constants (codes → lookups → scaled values), and
ONNX Runtime's constant folding would compute it once at load and keep fp32 weights. Whether that is
wanted is a trade-off, so :func:`session` makes it a choice: ``fold_weights=False`` (the default)
keeps the weights quantized in memory and expands them at every run; ``fold_weights=True`` pays
fp32 memory for fp32 MatMul speed. bench/onnx_cpu.py measures both.
"""

from __future__ import annotations

import ctypes
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch
from onnx.reference import ReferenceEvaluator
from torch import nn
from torch.utils._pytree import tree_leaves

from qpass.onnx import generation
from qpass.onnx.export import export_fp32
from qpass.quantizer import Quantizer
from qpass.rotation import Rotation


def session(
    path: str | os.PathLike | bytes, fold_weights: bool = False, threads: int | None = None
) -> ort.InferenceSession:
    """An ONNX Runtime CPU session of a file (or serialized model). ``fold_weights``: let it fold
    the quantized weights to fp32 at load (fp32 memory, fp32 speed); otherwise they stay quantized
    in memory and are expanded at every run, with the CPU memory arena off."""
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    # Without folding, each run expands the weights to fp32 temporaries; ONNX Runtime's memory arena
    # would keep them for good, taking back the memory the quantized weights saved.
    options.enable_cpu_mem_arena = fold_weights
    disabled = [] if fold_weights else ["ConstantFolding"]
    return ort.InferenceSession(
        path if isinstance(path, bytes) else str(path), options, providers=["CPUExecutionProvider"],
        disabled_optimizers=disabled,
    )


def run(path: str | os.PathLike, inputs, fold_weights: bool = False) -> list[torch.Tensor]:
    """The model's outputs for ``inputs`` (tensors, in the exported order): ONNX Runtime for a
    portable export, ``onnx.reference`` for a qdq one (ONNX Runtime has no FP4/E8M0 kernels)."""
    return _run(onnx.load(str(path)), inputs, fold_weights)


def decode(
    runner: ort.InferenceSession, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
    past: list[np.ndarray] | None = None,
) -> tuple[torch.Tensor, list[np.ndarray]]:
    """One run of a decoder exported with its KV cache: the logits of ``input_ids`` after ``past``
    (each layer's key and value as the last run returned them; None: an empty past) and the new
    past. ``attention_mask`` covers past and ``input_ids`` (None: all ones)."""
    inputs = {i.name: i for i in runner.get_inputs()}
    if not generation.is_cache_export(list(inputs)):
        raise ValueError(f"not a decoder exported with its KV cache; its inputs: {', '.join(inputs)}")
    past_names = list(inputs)[len(generation.INPUTS):]
    if past is None:
        past = [_empty_past(inputs[name], input_ids.shape[0]) for name in past_names]
    if attention_mask is None:
        length = past[0].shape[2] + input_ids.shape[1]
        attention_mask = torch.ones(input_ids.shape[0], length, dtype=torch.long)
    feeds = {
        "input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy(),
        "position_ids": generation.position_ids(attention_mask, input_ids.shape[1]).numpy(),
        **dict(zip(past_names, past)),
    }
    logits, *presents = runner.run(None, feeds)
    return torch.from_numpy(logits), presents


def generate(
    path: str | os.PathLike | ort.InferenceSession, input_ids: torch.Tensor, max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy generation in ONNX Runtime over a decoder exported with its KV cache: the prompt
    (``attention_mask`` 0 for left padding) and ``max_new_tokens`` tokens, as ``generate(...,
    do_sample=False)`` returns them."""
    runner = path if isinstance(path, ort.InferenceSession) else session(path)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    tokens, new, past = input_ids, input_ids, None
    for _ in range(max_new_tokens):
        logits, past = decode(runner, new, mask, past)
        new = logits[:, -1].argmax(-1, keepdim=True)
        tokens, mask = torch.cat([tokens, new], -1), torch.cat([mask, torch.ones_like(new)], -1)
    return tokens


_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def _empty_past(spec, batch: int) -> np.ndarray:
    """A past of length 0: (batch, kv heads, 0, head dim), the two static dims from the file."""
    if spec.type not in _NUMPY:  # numpy has no bfloat16
        raise ValueError(f"the KV cache input {spec.name} is {spec.type}; decode takes float16/32/64")
    _, heads, _, dim = spec.shape
    return np.zeros((batch, heads, 0, dim), _NUMPY[spec.type])


def _run(model: onnx.ModelProto, inputs, fold_weights: bool = False) -> list[torch.Tensor]:
    reference = dialect(model) == "qdq"
    names = [i.name for i in model.graph.input]
    tensors = [t.detach().cpu() for t in tree_leaves(inputs) if isinstance(t, torch.Tensor)]
    feeds = {name: to_runtime(t, reference) for name, t in zip(names, tensors)}
    if reference:
        outputs = ReferenceEvaluator(model).run(None, feeds)
    else:
        outputs = session(model.SerializeToString(), fold_weights).run_with_ort_values(None, feeds)
    return [from_runtime(o) for o in outputs]


# numpy has no bfloat16: onnx.reference takes ml_dtypes' arrays, ONNX Runtime OrtValues.


def to_runtime(t: torch.Tensor, reference: bool):
    """A tensor as ``onnx.reference`` (numpy) or ONNX Runtime (an OrtValue) takes it."""
    if t.dtype != torch.bfloat16:
        return t.numpy() if reference else ort.OrtValue.ortvalue_from_numpy(t.numpy())
    raw = t.contiguous().view(torch.int16).numpy()
    if reference:
        return raw.view(ml_dtypes.bfloat16)
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(raw, onnx.TensorProto.BFLOAT16)


def from_runtime(value) -> torch.Tensor:
    """Inverse of :func:`to_runtime` (an OrtValue holding bfloat16 is read from its buffer)."""
    if isinstance(value, ort.OrtValue):
        if value.data_type() != "tensor(bfloat16)":
            return torch.from_numpy(value.numpy())
        raw = (ctypes.c_char * value.tensor_size_in_bytes()).from_address(value.data_ptr())
        return torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).reshape(value.shape())
    value = np.asarray(value)
    if value.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(value.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(value)


def _reference(entry: dict, x: torch.Tensor) -> torch.Tensor:
    if entry["op"] == "qdq":
        return Quantizer.from_json(entry["quantizer"])(x, entry["axis"])
    return Rotation.from_json(entry["rotation"])(x, entry["axis"], entry["inverse"])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return bool(((a.view(bits) == b.view(bits)) | (a.isnan() & b.isnan())).all())


def check_quantizers(path: str | os.PathLike, inputs) -> tuple[int, list[str]]:
    """Rerun each activation quantize-dequantize and rotation of an export with qpass's reference,
    on the very values it received when the file ran on ``inputs``: (how many were checked, the
    ones whose output differs in any bit). Runtimes sum the ops between quantizers (matmuls, norms,
    softmax) in their own order, so a quantizer's input may differ from PyTorch's in its last bit
    and round to the other neighbour: this check is the exactness that does not depend on that."""
    checked, mismatches, _ = _run_checking_quantizers(path, inputs)
    return checked, mismatches


def _run_checking_quantizers(path, inputs) -> tuple[int, list[str], list[torch.Tensor]]:
    """:func:`check_quantizers`, and the model's outputs from the same run."""
    model = ir.load(str(path))
    outputs = [v.name for v in model.graph.outputs]
    manifest = json.loads(model.metadata_props.get("qpass.quantizers", "[]"))
    values = {v.name: v for v in model.graph.inputs} | {
        v.name: v for node in model.graph for v in node.outputs
    }
    entries = [e for e in manifest if e["input"] in values and e["output"] in values]
    extra = {name for e in entries for name in (e["input"], e["output"])} - set(outputs)
    model.graph.outputs.extend(values[name] for name in sorted(extra))
    proto = ir.to_proto(model)
    results = dict(zip((o.name for o in proto.graph.output), _run(proto, inputs)))
    mismatches = []
    for entry in entries:
        received, got = results[entry["input"]], results[entry["output"]]
        if not _same_bits(got, _reference(entry, received).to(got.dtype)):
            mismatches.append(
                f"{entry['output']} ({entry.get('quantizer') or entry.get('rotation')}, axis {entry['axis']})"
            )
    return len(entries), mismatches, [results[name] for name in outputs]


def dialect(model: onnx.ModelProto) -> str:
    return {p.key: p.value for p in model.metadata_props}.get("qpass.dialect", "portable")


@dataclass
class CheckResult:
    path: Path
    dialect: str
    runtime: str
    max_abs_error: float
    max_rel_error: float  # max |onnx - torch| / max |torch|, over every output
    size: int  # bytes
    fp32_size: int  # bytes of an fp32 export of the same model
    quantizers_checked: int  # activation quantizers and rotations rerun on the values they received
    quantizer_mismatches: list[str]  # those that gave other bits than qpass's reference

    def __str__(self) -> str:
        if self.quantizer_mismatches:
            quantizers = (
                f"NOT all activation quantizers give qpass's bits ({', '.join(self.quantizer_mismatches)}); "
            )
        elif self.quantizers_checked:
            quantizers = (
                f"all {self.quantizers_checked} activation quantizers and rotations give qpass's bits; "
            )
        else:
            quantizers = "no activation quantizers; "
        return (
            f"{self.path.name} ({self.dialect}, run by {self.runtime}): onnx.checker passed; {quantizers}"
            f"vs qpass in PyTorch: max abs error {self.max_abs_error:.3g}, "
            f"max relative error {self.max_rel_error:.3g}; "
            f"{self.size / 1e6:.3f} MB, {self.size / self.fp32_size:.3f}x the fp32 export's "
            f"{self.fp32_size / 1e6:.3f} MB"
        )


def check(path: str | os.PathLike, model: nn.Module, inputs, fp32_size: int | None = None) -> CheckResult:
    """Validate an export of ``model`` (compiled by qpass): onnx.checker's full check; one run on
    ``inputs``, whose outputs are compared with qpass's PyTorch output and whose activation
    quantizers and rotations with qpass's reference (:func:`check_quantizers`); and the size against
    an fp32 export of the same model (made here unless ``fp32_size`` is given). ``inputs``: the
    file's inputs in order, or for a decoder exported with its KV cache also ``(input_ids,)``, run
    as the next tokens after a past of as many."""
    path = Path(path)
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path), load_external_data=False)
    kind = dialect(proto)
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    cached = generation.is_cache_export([i.name for i in proto.graph.input])
    if cached and len(inputs) == 1:
        inputs = generation.cache_layout(model, inputs[0]).args
    checked, mismatches, got = _run_checking_quantizers(path, inputs)
    with torch.no_grad():
        outputs = generation.call_with_cache(model, model.config, *inputs) if cached else model(*inputs)
        expected = [t.float() for t in tree_leaves(outputs) if isinstance(t, torch.Tensor)]
    if len(got) != len(expected):
        raise ValueError(
            f"the ONNX model has {len(got)} outputs, the PyTorch model {len(expected)}: "
            "is it an export of this model?"
        )
    abs_error = rel_error = 0.0
    for out, ref in zip(got, expected):
        error = (out.float() - ref).abs().max().item()
        abs_error, rel_error = (
            max(abs_error, error), max(rel_error, error / max(ref.abs().max().item(), 1e-30))
        )
    if fp32_size is None:
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = export_fp32(model, inputs[:1] if cached else inputs, Path(tmp) / "fp32.onnx")
            fp32_size = fp32.stat().st_size
    runtime = "onnx.reference" if kind == "qdq" else f"onnxruntime {ort.__version__}"
    return CheckResult(
        path, kind, runtime, abs_error, rel_error, path.stat().st_size, fp32_size, checked, mismatches
    )
