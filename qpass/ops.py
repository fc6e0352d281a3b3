"""qpass's custom ops, the nodes that the quantization pass inserts into graphs.

``qpass::quantize_dequantize``  one operand's QDQ (inference sites, and per-tensor operands of
                                training sites); straight-through gradient.
``qpass::rotate``               a Hadamard rotation along one axis (:mod:`qpass.rotation`); its
                                gradient is the inverse rotation.
``qpass::quantized_matmul``     ``Q(A) · Q(B)`` for ``A [..., M, K]`` and ``B [..., K, N]``, with
                                a backward that runs the dgrad and wgrad GEMMs of SPEC section 6:
                                each quantizes its operands from the high-precision tensors along
                                its own reduction axis. Independent QDQ nodes on the forward graph
                                cannot express that (dY is needed along N and along M).
``qpass::fake_quantize_kernel`` a rotation and QDQ in one generated Triton kernel on CUDA
                                (:mod:`qpass.codegen`); what the lowering pass puts in place of
                                ``rotate`` and ``quantize_dequantize``.
``qpass::packed_linear``        ``Q(x) · Wᵀ + bias`` with W stored packed (codes and scales), by
                                the generated dequant-matmul kernel on CUDA.

The ``*_kernel`` and ``packed_*`` ops run the reference numerics on any other device, so a lowered
graph computes the same values everywhere (the kernels are tested bit for bit against them).

Every op has a CPU/CUDA implementation (the reference numerics of :mod:`qpass.formats`) and a
fake implementation, so torch.compile traces them without graph breaks, and takes its quantizers
as JSON strings (:meth:`Quantizer.to_json`), so an exported graph says what it computes. Products
accumulate in fp32 whatever the operands' dtype.
"""

from __future__ import annotations

import functools
import itertools
import json
import weakref
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from qpass.formats import QTensor
from qpass.formats.packing import unpack_fp6
from qpass.quantizer import Quantizer
from qpass.rotation import Rotation
from qpass.state import delayed_state


def _quantize(
    quantizer: Quantizer | None, x: Tensor, axis: int, state: str = "", rotation: Rotation | None = None,
    signs: Tensor | None = None, kernels: bool = False,
) -> Tensor:
    """fp32 fake-quantized ``x``, rotated first if asked (``x`` in fp32 when the role stays in high
    precision); ``signs`` are the signs drawn for this GEMM when its rotation is resampled.
    ``kernels``: by the generated Triton kernel where one runs (CUDA, no delayed-scaling state)."""
    x = x.detach().float()
    if kernels and quantizer is not None and _runs_kernel(x, quantizer, rotation, state):
        from qpass import codegen

        return codegen.fake_quantize(x, quantizer, axis, rotation, signs)
    if rotation is not None:
        x = rotation(x, axis, signs=signs)
    return x if quantizer is None else quantizer(x, axis, delayed_state(state, x.device))


# The devices whose tensors go through the generated kernels. Tests add "cpu" to run the kernels of
# a lowered graph in Triton's interpreter.
KERNEL_DEVICES = {"cuda"}


def _runs_kernel(x: Tensor, quantizer: Quantizer, rotation: Rotation | None, state: str = "") -> bool:
    from qpass.codegen.spec import unsupported  # imports triton: only once kernels were asked for

    return x.device.type in KERNEL_DEVICES and not state and unsupported(quantizer, rotation, x.dtype) is None


def _draw_signs(rotation: Rotation | None, length: int) -> Tensor | None:
    """One GEMM's fresh signs, shared by its two operands so that their rotations cancel."""
    return rotation.draw_signs(length) if rotation is not None and rotation.resample else None


# ---- rotation ------------------------------------------------------------------------------------


@torch.library.custom_op("qpass::rotate", mutates_args=())
def rotate(x: Tensor, rotation: str, axis: int, inverse: bool = False) -> Tensor:
    """``x · R`` along ``axis`` (``x · Rᵀ`` for ``inverse``), the axis zero-padded to whole blocks."""
    return Rotation.from_json(rotation)(x, axis, inverse).contiguous()


@rotate.register_fake
def _(x, rotation, axis, inverse=False):
    shape = list(x.shape)
    shape[axis] = Rotation.from_json(rotation).padded(shape[axis])
    return x.new_empty(shape)


def _save_length(ctx, inputs, output):
    x, ctx.rotation, ctx.axis, ctx.inverse = inputs
    ctx.length = x.shape[ctx.axis]


def _rotate_backward(ctx, grad):
    # R is orthogonal: the gradient of x·R is grad·Rᵀ, cut back to x's length where x was padded.
    grad = torch.ops.qpass.rotate(grad, ctx.rotation, ctx.axis, not ctx.inverse)
    return grad.narrow(ctx.axis, 0, ctx.length), None, None, None


rotate.register_autograd(_rotate_backward, setup_context=_save_length)


# ---- quantize-dequantize -------------------------------------------------------------------------


@torch.library.custom_op("qpass::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: Tensor, quantizer: str, axis: int, state: str = "") -> Tensor:
    """``fake_quantize(x)`` with the quantizer given as JSON; ``state`` names a delayed-scaling state."""
    return _quantize(Quantizer.from_json(quantizer), x, axis, state).to(x.dtype).contiguous()


# Outputs are contiguous whatever the inputs' strides (operands are often transposed views): the
# fake implementations must promise exactly that, or Inductor's stride asserts fail.
@quantize_dequantize.register_fake
def _(x, quantizer, axis, state=""):
    return x.new_empty(x.shape)


def _save_for_estimator(ctx, inputs, output):
    x, ctx.quantizer, ctx.axis, _ = inputs
    ctx.save_for_backward(x if Quantizer.from_json(ctx.quantizer).dge else None)


def _estimated_gradient(ctx, grad):
    # Straight through, unless the quantizer's differentiable gradient estimator reshapes it.
    (x,) = ctx.saved_tensors
    grad = grad if x is None else Quantizer.from_json(ctx.quantizer).gradient(grad, x, ctx.axis)
    return grad, None, None, None


quantize_dequantize.register_autograd(_estimated_gradient, setup_context=_save_for_estimator)


# ---- quantized matmul ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MatmulQuantizers:
    """The quantizers of one product ``A · B`` in its three GEMMs (None: high precision).

    ``a``, ``b``: the forward's operands; ``da_grad``, ``da_b``: dY and B in the GEMM that gives dA;
    ``db_grad``, ``db_a``: dY and A in the GEMM that gives dB. ``rotation``, ``da_rotation``,
    ``db_rotation``: the Hadamard rotation of both operands of each GEMM along its reduction axis.
    The ``*_state`` fields name delayed-scaling states (:mod:`qpass.state`) of per-tensor operands.
    ``reuse_forward``: the backward GEMMs take A and B as the forward quantized them (FP4 training,
    arXiv 2501.17116) instead of requantizing them along their own axes.
    ``kernels``: operands are quantized by the generated Triton kernels on CUDA.
    """

    a: Quantizer | None = None
    b: Quantizer | None = None
    da_grad: Quantizer | None = None
    da_b: Quantizer | None = None
    db_grad: Quantizer | None = None
    db_a: Quantizer | None = None
    a_state: str = ""
    b_state: str = ""
    grad_state: str = ""
    rotation: Rotation | None = None
    da_rotation: Rotation | None = None
    db_rotation: Rotation | None = None
    reuse_forward: bool = False
    kernels: bool = False  # quantize by the generated Triton kernels where they run (qpass.passes.lower)

    def __post_init__(self) -> None:
        # A delayed-scaling state records one amax per step: its operand must be quantized once.
        inference = not self.quantizes_backward
        once = {"a_state": self.hoists_a or inference, "b_state": self.hoists_b or inference, "grad_state": self.shares_grad}
        for state, quantized_once in once.items():
            if getattr(self, state) and not quantized_once:
                raise ValueError(f"{state}: delayed scaling needs one per-tensor quantizer for the operand in both its GEMMs")

    @staticmethod
    def _same_per_tensor(first: Quantizer | None, second: Quantizer | None) -> bool:
        return first is not None and first == second and first.per_tensor

    # An operand rotated in either of its GEMMs differs between them: each rotates its own axis.

    def _hoists(self, forward: Quantizer | None, backward: Quantizer | None, backward_rotation: Rotation | None) -> bool:
        if forward is None or self.rotation is not None:
            return False
        return self.reuse_forward or (self._same_per_tensor(forward, backward) and backward_rotation is None)

    @property
    def hoists_a(self) -> bool:
        """A is quantized identically in both its GEMMs, so once, before the product (and saved so)."""
        return self._hoists(self.a, self.db_a, self.db_rotation)

    @property
    def hoists_b(self) -> bool:
        return self._hoists(self.b, self.da_b, self.da_rotation)

    @property
    def shares_grad(self) -> bool:
        """dY is quantized identically for both backward GEMMs, so once per backward."""
        return self._same_per_tensor(self.da_grad, self.db_grad) and self.da_rotation is self.db_rotation is None

    @property
    def quantizes_backward(self) -> bool:
        return any((self.da_grad, self.da_b, self.db_grad, self.db_a))

    def to_json(self) -> str:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return json.dumps({k: v.to_json() if isinstance(v, (Quantizer, Rotation)) else v for k, v in values.items()})

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def from_json(text: str) -> MatmulQuantizers:
        values = json.loads(text)
        for key, value in values.items():
            if key in QUANTIZER_FIELDS and value:
                values[key] = Quantizer.from_json(value)
            elif key in ROTATION_FIELDS and value:
                values[key] = Rotation.from_json(value)
        return MatmulQuantizers(**values)


QUANTIZER_FIELDS = ("a", "b", "da_grad", "da_b", "db_grad", "db_a")
ROTATION_FIELDS = ("rotation", "da_rotation", "db_rotation")


@torch.library.custom_op("qpass::quantized_matmul", mutates_args=())
def quantized_matmul(a: Tensor, b: Tensor, quantizers: str) -> Tensor:
    """fprop: ``Q(A along K) · Q(B along K)`` in fp32, returned in ``a``'s dtype."""
    q = MatmulQuantizers.from_json(quantizers)
    a_q = _quantize(q.a, a, -1, rotation=q.rotation, kernels=q.kernels)
    return torch.matmul(a_q, _quantize(q.b, b, -2, rotation=q.rotation, kernels=q.kernels)).to(a.dtype)


@quantized_matmul.register_fake
def _(a, b, quantizers):
    return torch.matmul(a, b)  # a rotation pads K alike on both sides: the shape is unchanged


@torch.library.custom_op("qpass::quantized_matmul_backward", mutates_args=())
def quantized_matmul_backward(
    grad: Tensor, a: Tensor, b: Tensor, quantizers: str, need_a: bool, need_b: bool
) -> tuple[Tensor, Tensor]:
    """dgrad ``dA = Q(dY along N) · Q(B along N)ᵀ`` and wgrad ``dB = Q(A along M)ᵀ · Q(dY along M)``.

    When B is a matrix shared by every batch entry (a linear layer's weight), M is all of A's
    leading dimensions flattened; otherwise each batch entry has its own M. Gradients not needed
    come back empty. An operand whose forward quantizer has a DGE gets its gradient reshaped by it.
    Random draws (resampled rotation signs, stochastic rounding) come from torch's default
    generators in this order: a shared dY; dgrad's signs, dY, B; wgrad's signs, dY, A.
    """
    q = MatmulQuantizers.from_json(quantizers)
    shared = _quantize(q.da_grad, grad, -1, q.grad_state, kernels=q.kernels) if q.shares_grad else None
    grad_a = grad_b = grad.new_empty(0)
    if need_a:
        signs = _draw_signs(q.da_rotation, grad.shape[-1])
        dy = shared if shared is not None else _quantize(q.da_grad, grad, -1, rotation=q.da_rotation, signs=signs, kernels=q.kernels)
        b_n = _quantize(q.da_b, b, -1, rotation=q.da_rotation, signs=signs, kernels=q.kernels)
        grad_a = (dy @ b_n.mT).sum_to_size(a.shape)
        grad_a = (grad_a if q.a is None else q.a.gradient(grad_a, a, -1)).to(a.dtype).contiguous()
    if need_b:
        if b.ndim == 2:
            a, grad = a.reshape(-1, a.shape[-1]), grad.reshape(-1, grad.shape[-1])
            shared = shared if shared is None else shared.reshape(grad.shape)
        signs = _draw_signs(q.db_rotation, grad.shape[-2])
        dy = shared if shared is not None else _quantize(q.db_grad, grad, -2, rotation=q.db_rotation, signs=signs, kernels=q.kernels)
        a_m = _quantize(q.db_a, a, -2, rotation=q.db_rotation, signs=signs, kernels=q.kernels)
        grad_b = (a_m.mT @ dy).sum_to_size(b.shape)
        grad_b = (grad_b if q.b is None else q.b.gradient(grad_b, b, -2)).to(b.dtype).contiguous()
    return grad_a, grad_b


@quantized_matmul_backward.register_fake
def _(grad, a, b, quantizers, need_a, need_b):
    return (a.new_empty(a.shape) if need_a else grad.new_empty(0)), (b.new_empty(b.shape) if need_b else grad.new_empty(0))


def _save_operands(ctx, inputs, output):
    a, b, quantizers = inputs
    ctx.save_for_backward(a, b)
    ctx.quantizers = quantizers


def _matmul_backward(ctx, grad):
    a, b = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad[:2]
    grad_a, grad_b = torch.ops.qpass.quantized_matmul_backward(grad, a, b, ctx.quantizers, need_a, need_b)
    return (grad_a if need_a else None), (grad_b if need_b else None), None


quantized_matmul.register_autograd(_matmul_backward, setup_context=_save_operands)


# ---- generated kernels (qpass.passes.lower) ------------------------------------------------------


@torch.library.custom_op("qpass::fake_quantize_kernel", mutates_args=())
def fake_quantize_kernel(x: Tensor, quantizer: str, axis: int, rotation: str = "") -> Tensor:
    """``rotate`` then ``quantize_dequantize`` in one generated kernel (the reference off CUDA)."""
    q, r = Quantizer.from_json(quantizer), (Rotation.from_json(rotation) if rotation else None)
    return _quantize(q, x, axis, rotation=r, kernels=True).to(x.dtype).contiguous()


@fake_quantize_kernel.register_fake
def _(x, quantizer, axis, rotation=""):
    shape = list(x.shape)
    if rotation:
        shape[axis] = Rotation.from_json(rotation).padded(shape[axis])
    return x.new_empty(shape)


def _save_for_kernel_gradient(ctx, inputs, output):
    x, ctx.quantizer, ctx.axis, ctx.rotation = inputs
    ctx.length = x.shape[ctx.axis]
    ctx.save_for_backward(x if Quantizer.from_json(ctx.quantizer).dge and not ctx.rotation else None)


def _kernel_gradient(ctx, grad):
    # As rotate followed by quantize_dequantize: the estimator's gradient, then the inverse rotation.
    (x,) = ctx.saved_tensors
    if x is not None:
        grad = Quantizer.from_json(ctx.quantizer).gradient(grad, x, ctx.axis)
    if ctx.rotation:
        grad = torch.ops.qpass.rotate(grad, ctx.rotation, ctx.axis, True).narrow(ctx.axis, 0, ctx.length)
    return grad, None, None, None


fake_quantize_kernel.register_autograd(_kernel_gradient, setup_context=_save_for_kernel_gradient)


# Packed weights live outside the graphs (an op takes no module, and a graph constant would have to
# be a fake tensor while the graph is traced): ops find them by key, as delayed-scaling states.
# The registry holds them weakly; the graph module that uses a weight holds it.
_PACKED_WEIGHTS: weakref.WeakValueDictionary[str, QTensor] = weakref.WeakValueDictionary()
_PACKED_IDS = itertools.count()


def register_packed_weight(weight: QTensor) -> str:
    """A key under which ``qpass::packed_linear`` finds ``weight`` (a caller must keep it alive)."""
    key = f"packed{next(_PACKED_IDS)}"
    _PACKED_WEIGHTS[key] = weight
    return key


@torch.library.custom_op("qpass::packed_linear", mutates_args=())
def packed_linear(x: Tensor, bias: Tensor | None, weight: str, out_features: int, input_quantizer: str, rotation: str) -> Tensor:
    """``Q(rotate(x)) · Wᵀ + bias`` for a weight stored packed (:func:`register_packed_weight`'s
    key ``weight``: a QTensor of W ``[N, K]`` quantized along K, after ``rotation``). On CUDA the
    generated dequant-matmul kernel, which quantizes x on the fly where it can; elsewhere the
    reference, the same values as the unlowered graph."""
    qt = _PACKED_WEIGHTS.get(weight)
    if qt is None:
        raise RuntimeError(f"qpass packed weight {weight!r} no longer exists (was its model deleted?)")
    a_q = Quantizer.from_json(input_quantizer) if input_quantizer else None
    r = Rotation.from_json(rotation) if rotation else None
    if x.device.type in KERNEL_DEVICES:
        from qpass import codegen

        if r is not None:  # a rotated input is quantized by its own kernel, then multiplied as it is
            x = fake_quantize_kernel(x, input_quantizer, -1, rotation) if a_q else torch.ops.qpass.rotate(x, rotation, -1)
            a_q = None
        return codegen.weight_matmul(x, qt, bias, input_quantizer=a_q, out_dtype=x.dtype)
    x = _quantize(a_q, x, -1, rotation=r).to(x.dtype)
    out = torch.matmul(x, qt.dequantize().to(x.dtype).mT.contiguous())  # the unlowered graph's layout: same sums
    return out if bias is None else out + bias


@packed_linear.register_fake
def _(x, bias, weight, out_features, input_quantizer, rotation):
    return x.new_empty((*x.shape[:-1], out_features))


# ---- stored weights (qpass.onnx) -----------------------------------------------------------------


@torch.library.custom_op("qpass::dequantize_packed", mutates_args=())
def dequantize_packed(
    codes: Tensor, scales: Tensor, tensor_scale: Tensor | None, quantizer: str, shape: list[int], axis: int, dtype: torch.dtype
) -> Tensor:
    """``dequantize`` of a QTensor whose codes and scales are graph constants: a weight quantized
    once, at export (:mod:`qpass.onnx.prepare`). ``codes`` and ``scales`` may be typed views of the
    stored bytes (float8, float4 x2, int8), which the ONNX exporter writes as those types; fp6 codes
    are packed four to three bytes (:func:`~qpass.formats.packing.pack_fp6`)."""
    spec = Quantizer.from_json(quantizer).spec
    codes = codes.view(torch.uint8)
    if spec.element.bits == 6:
        codes = unpack_fp6(codes, spec.padded_length(shape[axis] if shape else 1))
    qt = QTensor(
        codes=codes, scales=scales if scales.dtype == torch.float32 else scales.view(torch.uint8),
        format=spec, shape=torch.Size(shape), axis=axis, dtype=dtype, tensor_scale=tensor_scale,
    )
    return qt.dequantize()


@dequantize_packed.register_fake
def _(codes, scales, tensor_scale, quantizer, shape, axis, dtype):
    return codes.new_empty(shape, dtype=dtype)
