"""Running and validating an exported model: ``qpass.onnx.session`` and ``qpass.onnx.check``.

A portable export's weights are a subgraph of constants (codes → lookups → scaled values), and
ONNX Runtime's constant folding would compute it once at load and keep fp32 weights. Whether that is
wanted is a trade-off, so :func:`session` makes it a choice: ``fold_weights=False`` (the default)
keeps the weights quantized in memory and expands them at every run; ``fold_weights=True`` pays
fp32 memory for fp32 MatMul speed. bench/onnx_cpu.py measures both.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from onnx.reference import ReferenceEvaluator
from torch import nn
from torch.utils._pytree import tree_leaves

from qpass.onnx.export import export_fp32


def session(path: str | os.PathLike, fold_weights: bool = False, threads: int | None = None) -> ort.InferenceSession:
    """An ONNX Runtime CPU session; ``fold_weights``: let it fold the quantized weights to fp32 at load."""
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    disabled = [] if fold_weights else ["ConstantFolding"]
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


def run(path: str | os.PathLike, inputs, fold_weights: bool = False) -> list:
    """The model's outputs (numpy) for ``inputs`` (tensors, in the exported order): ONNX Runtime for
    a portable export, ``onnx.reference`` for a qdq one (ONNX Runtime has no FP4/E8M0 kernels)."""
    model = onnx.load(str(path))
    names = [i.name for i in model.graph.input]
    feeds = dict(zip(names, (t.detach().cpu().numpy() for t in tree_leaves(inputs) if isinstance(t, torch.Tensor))))
    if dialect(model) == "qdq":
        return ReferenceEvaluator(model).run(None, feeds)
    return session(path, fold_weights).run(None, feeds)


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

    def __str__(self) -> str:
        return (
            f"{self.path.name} ({self.dialect}, run by {self.runtime}): onnx.checker passed; vs qpass in PyTorch: "
            f"max abs error {self.max_abs_error:.3g}, max relative error {self.max_rel_error:.3g}; "
            f"{self.size / 1e6:.3f} MB, {self.size / self.fp32_size:.3f}x the fp32 export's {self.fp32_size / 1e6:.3f} MB"
        )


def check(path: str | os.PathLike, model: nn.Module, inputs, fp32_size: int | None = None) -> CheckResult:
    """Validate an export of ``model`` (compiled by qpass): onnx.checker's full check, then its
    outputs on ``inputs`` (a tuple of tensors) against qpass's PyTorch output, and its size against
    an fp32 export of the same model (made here unless ``fp32_size`` is given)."""
    path = Path(path)
    onnx.checker.check_model(str(path), full_check=True)
    kind = dialect(onnx.load(str(path), load_external_data=False))
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    got = run(path, inputs)
    with torch.no_grad():
        expected = [t.float() for t in tree_leaves(model(*inputs)) if isinstance(t, torch.Tensor)]
    if len(got) != len(expected):
        raise AssertionError(f"the ONNX model has {len(got)} outputs, the PyTorch model {len(expected)}")
    abs_error = rel_error = 0.0
    for out, ref in zip(got, expected):
        error = (torch.from_numpy(out).float() - ref).abs().max().item()
        abs_error, rel_error = max(abs_error, error), max(rel_error, error / max(ref.abs().max().item(), 1e-30))
    if fp32_size is None:
        with tempfile.TemporaryDirectory() as tmp:
            fp32_size = export_fp32(model, inputs, Path(tmp) / "fp32.onnx").stat().st_size
    runtime = "onnx.reference" if kind == "qdq" else f"onnxruntime {ort.__version__}"
    return CheckResult(path, kind, runtime, abs_error, rel_error, path.stat().st_size, fp32_size)
