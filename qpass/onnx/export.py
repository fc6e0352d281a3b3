"""``qpass.export_onnx``: an ONNX model of a qpass inference recipe, weights stored quantized.

The path: :func:`qpass.export` (torch.export with qpass's passes) → :func:`~qpass.onnx.prepare.store_weights`
(each weight quantized once, its codes and scales kept) → :func:`~qpass.onnx.prepare.check_exportable`
→ torch.export again → ``torch.onnx.export(dynamo=True)`` with qpass's ops translated by
:mod:`qpass.onnx.translation`. The exporter's optimizer is off: it would fold small dequantized
weights back into fp32 constants.

Dialects:

- ``"portable"`` (opset 21): only operators that ONNX Runtime's CPU provider runs. Weights are uint8
  codes and scales expanded by table lookups; activations are fake-quantized in arithmetic.
- ``"qdq"`` (opset 24): the ONNX standard form. Weights are FLOAT8E4M3FN / FLOAT8E5M2 /
  FLOAT4E2M1 / INT8 initializers with (blocked) DequantizeLinear, MX scales FLOAT8E8M0, NVFP4's
  scales two chained DequantizeLinear; activations QuantizeLinear → DequantizeLinear with scales
  computed in the graph. ``onnx.reference`` runs it; ONNX Runtime's CPU provider does not (it has
  no FLOAT4E2M1 or FLOAT8E8M0 kernels).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from qpass.capture import uncompiled
from qpass.compile import export as qpass_export
from qpass.onnx import generation
from qpass.onnx.prepare import E8M0_SCALES, check_exportable, fold_constants, store_weights
from qpass.onnx.translation import DIALECTS, translation_table
from qpass.report import report as qpass_report
from qpass.state import QpassState

OPSETS = {"portable": 21, "qdq": 24}


def _shapes_like(args: tuple, kwargs: dict | None, spec) -> tuple | dict:
    """torch.export's ``dynamic_shapes`` for these inputs: ``spec(i, tensor)`` per tensor input."""
    leaves = [*args, *(kwargs or {}).values()]
    specs = [spec(i, v) if isinstance(v, torch.Tensor) else None for i, v in enumerate(leaves)]
    if not kwargs:
        return tuple(specs)
    return {**dict(zip(range(len(args)), specs[: len(args)])), **dict(zip(kwargs, specs[len(args):]))}


def auto_dynamic_shapes(args: tuple, kwargs: dict | None = None):
    """Every dim of every input tensor ``Dim.AUTO``: dynamic unless the model pins it (a hidden
    size), which is how batch and sequence lengths come out dynamic."""
    return _shapes_like(args, kwargs, lambda i, t: {d: torch.export.Dim.AUTO for d in range(t.ndim)})


def _resolved_shapes(program: torch.export.ExportedProgram, args: tuple, kwargs: dict | None):
    """The dims that an ``AUTO`` export left dynamic, as ``Dim.DYNAMIC``, and every other dim static:
    exporting again with these gives static dims as plain ints (the quantization axes must be)."""
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    shapes = [placeholders[name].meta["val"].shape for name in program.graph_signature.user_inputs]

    def spec(i, tensor):
        return {d: torch.export.Dim.DYNAMIC for d, size in enumerate(shapes[i]) if not is_concrete_int(size)}

    return _shapes_like(args, kwargs, spec)


class Traced(NamedTuple):
    """What torch.export traces: the example inputs, the dims that ``dynamic_shapes="auto"`` makes
    dynamic, and the file's input and output names (None: the exporter's)."""

    args: tuple
    dynamic_shapes: object
    input_names: list[str] | None = None
    output_names: list[str] | None = None


@contextlib.contextmanager
def traced_as(model: nn.Module, args: tuple, kwargs: dict | None, use_cache: bool | None):
    """``model`` set up for torch.export, and what to trace. A Hugging Face causal LM with
    ``use_cache`` (None: as configured) is traced as a decoder with its KV cache as inputs and
    outputs (:mod:`qpass.onnx.generation`); any other model as it is, an HF one returning no cache."""
    if use_cache is None:
        use_cache = generation.is_cached_decoder(model)
    if not use_cache:
        with generation.without_cache(model):
            yield Traced(args, auto_dynamic_shapes(args, kwargs))
        return
    if kwargs or len(args) != 1:
        raise ValueError(
            "exporting a decoder with its KV cache takes (input_ids,) and no kwargs: its attention mask, "
            "positions and cache are inputs of the file; pass use_cache=False to export the plain forward"
        )
    layout = generation.cache_layout(model, args[0])
    with generation.flat_forward(model, layout):
        yield Traced(layout.args, layout.dynamic_shapes, layout.input_names, layout.output_names)


def to_onnx(
    program: torch.export.ExportedProgram | nn.Module, dialect: str, args: tuple = (),
    kwargs: dict | None = None, dynamic_shapes=None, names: tuple[list | None, list | None] = (None, None),
) -> ir.Model:
    """The ONNX model of a program (or module) holding ATen and qpass ops, in ``dialect``;
    ``names``: its inputs' and outputs' (None: the exporter's)."""
    translated: list[dict] = []
    table = translation_table(dialect, translated)
    with _quiet():
        onnx_program = torch.onnx.export(
            program, args, kwargs=kwargs, dynamo=True, opset_version=OPSETS[dialect], optimize=False,
            custom_translation_table=table, dynamic_shapes=dynamic_shapes, verbose=False,
            input_names=names[0], output_names=names[1],
        )
    model = onnx_program.model
    # Per node, the exporter records a stack trace: most of a small model's file. And the numerics'
    # tables and constants are built per op: one copy of each is enough.
    ir.passes.common.ClearMetadataAndDocStringPass()(model)
    _share_constants(model)
    ir.passes.common.CommonSubexpressionEliminationPass()(model)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    if dialect == "qdq":
        _type_e8m0_scales(model)
    model.metadata_props["qpass.dialect"] = dialect
    # The activation quantizers and rotations by the names their values ended up with (the exporter
    # renames them): qpass.onnx.check reruns each on the values it received.
    manifest = [
        entry | {"input": entry["input"].name, "output": entry["output"].name} for entry in translated
    ]
    model.metadata_props["qpass.quantizers"] = json.dumps(manifest)
    return model


def _onnx_of(program: torch.export.ExportedProgram, dialect: str, traced: Traced) -> ir.Model:
    model = to_onnx(program, dialect, names=(traced.input_names, traced.output_names))
    if traced.input_names is not None:
        generation.name_dims(model)
    return model


@contextlib.contextmanager
def _quiet():
    """The exporter prints its progress, warns and logs about things that do not concern qpass's
    users (torchvision's ops missing from its registry, among others)."""
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry.level
    registry.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        registry.setLevel(level)


def _share_constants(model: ir.Model) -> None:
    """One Constant node per distinct value (tensors compare by identity in the CSE pass, and NaN
    never equals itself)."""
    first: dict[tuple, ir.Value] = {}
    for node in list(model.graph):
        if node.op_type != "Constant" or len(node.attributes) != 1:
            continue
        (name, attribute), = node.attributes.items()
        if name == "value":
            tensor = attribute.as_tensor()
            key = (name, tensor.dtype, tuple(tensor.shape), tensor.tobytes())
        else:  # value_float(s), value_int(s)
            key = (name, np.asarray(attribute.value, np.float32 if "float" in name else np.int64).tobytes())
        if key in first:
            node.outputs[0].replace_all_uses_with(first[key])
            model.graph.remove(node, safe=True)
        else:
            first[key] = node.outputs[0]


def _type_e8m0_scales(model: ir.Model) -> None:
    """MX scales are stored as uint8 in torch (the exporter has no E8M0 type): the ones the qdq
    dialect reads as FLOAT8E8M0 (:data:`~qpass.onnx.prepare.E8M0_SCALES`) get that type, same bytes."""
    for value in model.graph.initializers.values():
        if value.name.endswith(E8M0_SCALES) and value.dtype == ir.DataType.UINT8:
            value.const_value = ir.Tensor(
                value.const_value.numpy().view(ml_dtypes.float8_e8m0fnu), name=value.name
            )
            value.dtype = ir.DataType.FLOAT8E8M0


def export_onnx(
    model: nn.Module,
    example_inputs: tuple,
    path: str | os.PathLike,
    dialect: str = "portable",
    *,
    kwargs: dict | None = None,
    dynamic_shapes="auto",
    use_cache: bool | None = None,
) -> Path:
    """Write ``model`` (compiled by :func:`qpass.compile` with an inference recipe) to ``path``.

    ``example_inputs`` are traced; ``dynamic_shapes`` is torch.export's (``"auto"``: every input
    dim dynamic unless the model pins it; None: all static). A Hugging Face causal LM is exported,
    as configured (``config.use_cache``) or as ``use_cache`` says, as its decoder with the KV cache
    as inputs and outputs (:mod:`qpass.onnx.generation`; ``example_inputs`` is then ``(input_ids,)``),
    or as its plain forward. Raises
    :class:`~qpass.onnx.prepare.UnsupportedSite`, naming each site, for what ONNX cannot express
    exactly (training recipes, delayed scaling, stochastic rounding, ...).
    """
    if dialect not in DIALECTS:
        raise ValueError(f"unknown ONNX dialect {dialect!r}; expected one of {', '.join(DIALECTS)}")
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if dynamic_shapes == "auto" and any(
        1 in t.shape for t in [*args, *(kwargs or {}).values()] if isinstance(t, torch.Tensor)
    ):
        warnings.warn(
            "an example input has a dimension of size 1, which torch.export makes static: the ONNX model "
            "will accept only size 1 there (give an example of size 2 or more to keep it dynamic)",
            stacklevel=2,
        )
    compiled = _decisions(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), traced_as(model, args, kwargs, use_cache) as traced:
            args = traced.args
            shapes = traced.dynamic_shapes if dynamic_shapes == "auto" else dynamic_shapes
            # The program holds qpass's ops (the quantize pass's graph calls Python functions).
            program = qpass_export(model, args, kwargs, dynamic_shapes=shapes)
            if dynamic_shapes == "auto":
                shapes = _resolved_shapes(program, args, kwargs)
            gm = program.module()
            fold_constants(store_weights(gm, dialect))
            check_exportable(gm)
            with _quiet():
                program = torch.export.export(gm, args, kwargs, dynamic_shapes=shapes)
            onnx_model = _onnx_of(program, dialect, traced)
    finally:
        model.train(was_training)
    exported = _decisions(model)
    if compiled and exported != compiled:
        changed = sorted(set(compiled.items()) ^ set(exported.items()))
        warnings.warn(
            "torch.export's graph was quantized differently from the graph qpass.compile ran "
            f"({changed[:4]}...): "
            "the ONNX model follows the export (qpass.report shows it now); please report this", stacklevel=2,
        )
    return _save(onnx_model, path, model._qpass.recipe.name)


def _decisions(model: nn.Module) -> dict[str, str]:
    """Each site's quantization and the graph-wide notes, as qpass.report has them (empty before a
    compiled model first ran)."""
    state = getattr(model, "_qpass", None)
    if not isinstance(state, QpassState):
        return {}
    report = qpass_report(model)
    if not report.rows:
        return {}
    return {row["site"]: str(row["formats"]) for row in report.rows} | {
        f"note {i}": note for i, note in enumerate(report.notes)
    }


def _save(onnx_model: ir.Model, path: str | os.PathLike, recipe: str) -> Path:
    onnx_model.metadata_props["qpass.recipe"] = recipe
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ir.save(onnx_model, path)
    return path


def export_fp32(
    model: nn.Module, example_inputs: tuple, path: str | os.PathLike, *, kwargs: dict | None = None,
    use_cache: bool | None = None,
) -> Path:
    """``model`` without qpass, exported the same way (the baseline that sizes and speeds compare to)."""
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    was_training = model.training
    model.eval()
    try:
        with uncompiled(model), torch.no_grad(), traced_as(model, args, kwargs, use_cache) as traced:
            with _quiet():
                program = torch.export.export(
                    model, traced.args, kwargs, dynamic_shapes=traced.dynamic_shapes)
            onnx_model = _onnx_of(program, "portable", traced)
    finally:
        model.train(was_training)
    return _save(onnx_model, path, "none (fp32)")
