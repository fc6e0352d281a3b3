"""Getting a quantized graph ready for ONNX: weights stored quantized, and nothing that ONNX can't say.

An inference graph quantizes its weights as it runs: ``quantize_dequantize`` of a parameter, after
views, rotations or channel splits computed from it. Before export, :func:`store_weights` evaluates
each such chain once, quantizes the result with the reference (:func:`qpass.quantize`), and puts
``qpass::dequantize_packed`` of the codes and scales in its place; the codes and scales become the
ONNX file's initializers, and the fp32 parameters they came from leave the graph.
:func:`fold_constants` evaluates whatever else the graph reads from parameters alone into buffers.
:func:`check_exportable` then rejects, naming the site, every qpass op an ONNX graph cannot express
exactly, before the exporter would bury the reason in a traceback.

Analysis (:func:`stored_weight_nodes`, :func:`check_exportable`) is kept apart from rewriting
(:func:`store_weights`, :func:`fold_constants`).
"""

from __future__ import annotations

import re

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from qpass.formats import quantize
from qpass.formats.packing import pack_fp6
from qpass.onnx.numerics import QDQ_TYPES
from qpass.passes.sites import module_path
from qpass.quantizer import Quantizer
from qpass.stored import StoredWeight

QDQ = torch.ops.qpass.quantize_dequantize.default
ROTATE = torch.ops.qpass.rotate.default
DEQUANTIZE_PACKED = torch.ops.qpass.dequantize_packed.default

# The torch dtypes that the exporter writes as the ONNX element types of the qdq dialect.
TYPED_CODES = {
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "fp4_e2m1": torch.float4_e2m1fn_x2,
    "int8": torch.int8,
}


E8M0_SCALES = "e8m0_scales"


class UnsupportedSite(ValueError):
    """A site that the ONNX export cannot express: the message names it and says why."""


def site_name(node: fx.Node) -> str:
    """The module a node came from, as ``qpass.report`` names sites, and the module's class."""
    stack = node.meta.get("nn_module_stack") or {}
    kind = list(stack.values())[-1][1] if stack else ""
    module = module_path(node) or "<root>"
    return f"{module} ({kind.rsplit('.', 1)[-1]})" if kind else module


def _constants(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes computed from parameters, buffers and constants only (a stored weight's expansion is
    not one: it is what the ONNX file must compute)."""
    constant: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" or (
            node.op == "call_function" and node.target is not DEQUANTIZE_PACKED
            and node.all_input_nodes and all(n in constant for n in node.all_input_nodes)
        ):
            constant.add(node)
    return constant


def stored_weight_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The ``quantize_dequantize`` nodes of weights: their input is computed from constants only."""
    constant = _constants(gm)
    return [
        n for n in gm.graph.nodes if n.op == "call_function" and n.target is QDQ and n.args[0] in constant
    ]


def _evaluate(gm: fx.GraphModule, node: fx.Node, values: dict[fx.Node, object]):
    if node not in values:
        if node.op == "get_attr":
            values[node] = _fetch(gm, node.target)
        else:
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: _evaluate(gm, n, values))
            values[node] = node.target(*args, **kwargs)
    return values[node]


def _fetch(gm: fx.GraphModule, target: str):
    value = gm
    for name in target.split("."):
        value = getattr(value, name)
    return value


def _source_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """A readable initializer name: the parameter the weight chain starts from."""
    parameters = dict(gm.named_parameters(remove_duplicate=False))
    sources = [n.target for n in _ancestors(node) if n.op == "get_attr" and n.target in parameters]
    return re.sub(r"\W", "_", sources[0] if sources else node.name)


def _ancestors(node: fx.Node) -> list[fx.Node]:
    seen, order, stack = set(), [], [node]
    while stack:
        current = stack.pop()
        for n in current.all_input_nodes:
            if n not in seen:
                seen.add(n)
                order.append(n)
                stack.append(n)
    return order


def _stored_tensors(
    value: torch.Tensor, quantizer: Quantizer, axis: int, dialect: str
) -> tuple[torch.Tensor, ...]:
    """Codes, scales and tensor scale of ``value`` quantized (typed for the qdq dialect)."""
    if quantizer.rounding == "stochastic":
        raise ValueError("stochastic rounding")  # check_exportable's message names the site
    qt = quantize(value.detach(), quantizer.spec, axis, rounding=quantizer.rounding)
    codes = pack_fp6(qt.codes) if quantizer.spec.element.bits == 6 else qt.codes
    return _typed(codes, qt.scales, quantizer, dialect) + (qt.tensor_scale,)


def _typed(codes: torch.Tensor, scales: torch.Tensor, quantizer: Quantizer, dialect: str) -> tuple:
    """Codes and scales as the dialect stores them: the qdq dialect's ONNX element types where it
    has them (fp6 has none below opset 28: both dialects store its codes packed, 6 bits each)."""
    element = quantizer.spec.element.name
    if dialect == "qdq" and element in QDQ_TYPES and quantizer.spec.element.bits != 6:
        codes = codes.view(TYPED_CODES[element])
        if quantizer.spec.scaling == "nvfp4":
            scales = scales.view(torch.float8_e4m3fn)
    return codes, scales


def _suffixes(quantizer: Quantizer, dialect: str) -> tuple[str, str, str]:
    """The stored tensors' name endings; MX scales that the qdq dialect reads as FLOAT8E8M0 say so,
    since the exporter writes them as uint8 and :mod:`qpass.onnx.export` retypes them by name."""
    spec = quantizer.spec
    e8m0 = dialect == "qdq" and spec.scaling == "mx" and spec.element.name in QDQ_TYPES
    return "codes", E8M0_SCALES if e8m0 else "scales", "tensor_scale"


def _dequantize_packed(gm: fx.GraphModule, node: fx.Node, prefix: str, stored, quantizer: Quantizer,
                       shape: list[int], axis: int, dtype: torch.dtype, dialect: str) -> None:
    """``node``'s uses read ``dequantize_packed`` of ``stored`` (codes, scales, tensor scale) instead,
    each stored tensor a module buffer."""
    with gm.graph.inserting_before(node):
        inputs = []
        for suffix, tensor in zip(_suffixes(quantizer, dialect), stored):
            if tensor is None:
                inputs.append(None)
                continue
            name = _unused_name(gm, f"{prefix}_{suffix}")
            gm.register_buffer(name, tensor.contiguous())
            inputs.append(gm.graph.get_attr(name))
        stored_node = gm.graph.call_function(
            DEQUANTIZE_PACKED, (*inputs, quantizer.to_json(), shape, axis % max(len(shape), 1), dtype))
    stored_node.meta = dict(node.meta)
    node.replace_all_uses_with(stored_node)
    gm.graph.erase_node(node)


def store_weights(gm: fx.GraphModule, dialect: str) -> fx.GraphModule:
    """Replace each weight's quantize-dequantize by ``dequantize_packed`` of its stored codes and
    scales (module buffers), and drop the parameters no longer used. A model loaded by
    :func:`qpass.from_pretrained` holds its weights as :class:`~qpass.stored.StoredWeight`: their
    codes and scales go into the file as they are (quantizing their values again would not always
    give them back)."""
    for node in [n for n in gm.graph.nodes if n.op == "get_attr"]:
        loaded = _fetch(gm, node.target)
        if isinstance(loaded, StoredWeight):
            quantizer = Quantizer.from_json(loaded.quantizer)
            stored = (*_typed(loaded.codes, loaded.scales, quantizer, dialect), loaded.tensor_scale)
            _dequantize_packed(gm, node, re.sub(r"\W", "_", node.target), stored, quantizer,
                               list(loaded.shape), loaded.axis, loaded.dtype, dialect)
    for node in stored_weight_nodes(gm):
        quantizer = Quantizer.from_json(node.args[1])
        axis = node.args[2]
        value = _evaluate(gm, node.args[0], {})
        try:
            stored = _stored_tensors(value, quantizer, axis, dialect)
        except ValueError as error:
            raise UnsupportedSite(f"site {site_name(node)}: weight quantizer {quantizer}: {error}") from error
        _dequantize_packed(gm, node, _source_name(gm, node), stored, quantizer, list(value.shape), axis,
                           value.dtype, dialect)
    gm.graph.eliminate_dead_code()
    _drop_unused_attributes(gm)
    gm.recompile()
    return gm


def fold_constants(gm: fx.GraphModule) -> fx.GraphModule:
    """Evaluate each subgraph of constants that the rest of the graph reads into one buffer (after
    :func:`store_weights`: a rotated embedding table, channel-splitting bookkeeping), so that the
    ONNX file holds its value rather than the ops, some of which (bit views) ONNX has no form of."""
    constant = _constants(gm)
    values: dict[fx.Node, object] = {}
    for node in [n for n in constant if n.op == "call_function" and any(u not in constant for u in n.users)]:
        value = _evaluate(gm, node, values)
        if not isinstance(value, torch.Tensor):
            continue
        name = _unused_name(gm, f"{_source_name(gm, node)}_folded")
        gm.register_buffer(name, value.detach().contiguous())
        with gm.graph.inserting_before(node):
            folded = gm.graph.get_attr(name)
        folded.meta = dict(node.meta)
        node.replace_all_uses_with(folded)
    for node in reversed(gm.graph.nodes):  # what nothing reads, asserts on constants included
        if node in constant and node.op == "call_function" and not node.users:
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    _drop_unused_attributes(gm)
    gm.recompile()
    return gm


def _unused_name(gm: fx.GraphModule, name: str) -> str:
    candidate, i = name, 1
    while hasattr(gm, candidate):
        candidate, i = f"{name}_{i}", i + 1
    return candidate


def _drop_unused_attributes(gm: fx.GraphModule) -> None:
    """Delete parameters and buffers no graph node reads: torch.export would still lift them, and
    they would land in the ONNX file as fp32 initializers."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    names = [name for name, _ in gm.named_parameters()] + [name for name, _ in gm.named_buffers()]
    for name in names:
        if name not in used:
            owner, _, attribute = name.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, attribute)


def _unsupported(node: fx.Node) -> str | None:
    """Why an ONNX graph cannot express ``node`` exactly (None: it can)."""
    if node.op != "call_function" or not str(node.target).startswith("qpass."):
        return None
    if node.target is QDQ:
        quantizer = Quantizer.from_json(node.args[1])
        if len(node.args) > 3 and node.args[3]:
            return (
                f"{quantizer} with delayed scaling: its scale comes from an amax history updated at run time"
            )
        if quantizer.rounding == "stochastic":
            return f"{quantizer}: stochastic rounding draws random numbers at run time"
        if quantizer.spec.scaling == "nvfp4" and quantizer.spec.granularity == "tile":
            return f"{quantizer} of an activation: its 16x16 tiles span a dynamic dimension"
        length = node.args[0].meta["val"].shape[node.args[2]]
        if not is_concrete_int(length):
            return f"{quantizer} along an axis of dynamic length {length}"
        return None
    if node.target in (ROTATE, DEQUANTIZE_PACKED):
        return None
    if "gemm_operand" in str(node.target):
        return None  # an operand of a training recipe's quantized GEMM, which is reported
    if "quantized_matmul" in str(node.target):
        return "a training recipe's quantized GEMM (its backward quantizes); export an inference recipe"
    return (
        f"{node.target} has no ONNX translation "
        "(a graph lowered to kernels: compile with kernels='reference')"
    )


def check_exportable(gm: fx.GraphModule) -> None:
    """Raise :class:`UnsupportedSite` listing every site an ONNX graph cannot express exactly."""
    problems = [f"site {site_name(n)}: {why}" for n in gm.graph.nodes if (why := _unsupported(n)) is not None]
    if problems:
        raise UnsupportedSite(
            "cannot export to ONNX without changing what the model computes:\n  " + "\n  ".join(problems)
        )
