"""A weight held as its quantized codes and scales: what :func:`qpass.from_pretrained` loads.

A :class:`StoredWeight` is a tensor subclass in place of a module's weight parameter. It keeps only
the bytes a checkpoint stores (codes, scales and NVFP4's tensor scale, in the file's layout: fp6
packed four codes to three bytes) and the quantizer that made them; the fp32 weight it stands for
never exists. Any op it meets computes with its dequantized values, so a model runs unchanged; a
quantized site whose plan finds its own quantization stored (:mod:`qpass.passes.lower`) takes those
values as its GEMM's weight operand instead of quantizing again, which is what makes a loaded
model's outputs bit-identical to the saved one's. It is traceable (``__tensor_flatten__``): Dynamo
and AOTAutograd see the codes and scales as graph inputs, and the dequantization as a
``qpass::dequantize_packed`` node.

It is read-only: an in-place op (``copy_``, an optimizer's update, ``load_state_dict`` into it)
raises rather than write into values that are not there.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from qpass.formats import QTensor, quantize
from qpass.formats.packing import pack_fp6, unpack_fp6
from qpass.quantizer import Quantizer
from qpass.rotation import Rotation

aten = torch.ops.aten

# Ops that keep a StoredWeight what it is: its own views (nn.Parameter detaches), copies and moves.
_SAME_WEIGHT = (aten.detach.default, aten.alias.default)
_COPIES = (aten.clone.default, aten._to_copy.default)


def quantize_weight(weight: Tensor, quantizer: Quantizer, rotation: Rotation | None, axis: int) -> QTensor:
    """A GEMM's weight operand as codes and scales, computed as the graph computes it: rotated along
    its reduction ``axis`` and rounded to the weight's dtype (as ``qpass::rotate``), then quantized."""
    with torch.no_grad():
        w = weight.detach()
        if rotation is not None:
            w = rotation(w, axis)
        qt = quantize(w.float(), quantizer.spec, axis=axis, rounding=quantizer.rounding)
    return replace(qt, dtype=weight.dtype)


class StoredWeight(Tensor):
    """``dequantize(codes, scales)`` of ``quantizer`` along ``axis``, shaped ``shape``, in ``dtype``;
    ``rotation`` (JSON, "" for none) is the Hadamard rotation the weight went through before it was
    quantized: the values are those of the rotated weight, which only its site's GEMM can use."""

    @staticmethod
    def __new__(cls, codes: Tensor, scales: Tensor, tensor_scale: Tensor | None, quantizer: str,
                shape: tuple[int, ...], axis: int, dtype: torch.dtype, rotation: str = ""):
        return Tensor._make_wrapper_subclass(
            cls, shape, dtype=dtype, device=codes.device, requires_grad=False)

    def __init__(self, codes, scales, tensor_scale, quantizer, shape, axis, dtype, rotation=""):
        self.codes, self.scales, self.tensor_scale = codes, scales, tensor_scale
        self.quantizer, self.axis, self.rotation = quantizer, axis, rotation

    @staticmethod
    def from_qtensor(qt: QTensor, quantizer: Quantizer, rotation: str = "") -> StoredWeight:
        codes = pack_fp6(qt.codes) if qt.format.element.bits == 6 else qt.codes
        return StoredWeight(codes, qt.scales, qt.tensor_scale, quantizer.to_json(), tuple(qt.shape), qt.axis,
                            qt.dtype, rotation)

    def qtensor(self) -> QTensor:
        """The weight as a :class:`~qpass.formats.QTensor` (fp6 codes one per byte again)."""
        spec = Quantizer.from_json(self.quantizer).spec
        codes = self.codes
        if spec.element.bits == 6:
            codes = unpack_fp6(codes, spec.padded_length(self.shape[self.axis]))
        return QTensor(codes=codes, scales=self.scales, format=spec, shape=self.shape, axis=self.axis,
                       dtype=self.dtype, tensor_scale=self.tensor_scale)

    def dequantize(self) -> Tensor:
        return torch.ops.qpass.dequantize_packed(
            self.codes, self.scales, self.tensor_scale, self.quantizer, list(self.shape), self.axis,
            self.dtype)

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.tensor_scale)
                   if t is not None)

    # ---- the tensor-subclass protocol ----------------------------------------------------------

    def __tensor_flatten__(self):
        names = ["codes", "scales"] + ([] if self.tensor_scale is None else ["tensor_scale"])
        return names, (self.quantizer, tuple(self.shape), self.axis, self.dtype, self.rotation)

    @staticmethod
    def __tensor_unflatten__(inner: dict, meta, outer_size, outer_stride) -> StoredWeight:
        return StoredWeight(inner["codes"], inner["scales"], inner.get("tensor_scale"), *meta)

    def _stable_hash_for_caching(self) -> str:
        return repr(self.__tensor_flatten__()[1])

    def _map_inner(self, change) -> StoredWeight:
        return StoredWeight(change(self.codes), change(self.scales),
                            None if self.tensor_scale is None else change(self.tensor_scale),
                            *self.__tensor_flatten__()[1])

    def __repr__(self) -> str:
        rotated = f" after {Rotation.from_json(self.rotation)}" if self.rotation else ""
        return (f"StoredWeight({Quantizer.from_json(self.quantizer)}{rotated}, shape={tuple(self.shape)}, "
                f"dtype={self.dtype}, {self.stored_bytes()} bytes)")

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SAME_WEIGHT:
            return args[0]._map_inner(lambda t: t)
        if func in _COPIES and set(kwargs) <= {"device", "memory_format", "non_blocking"}:
            device = kwargs.get("device")  # a move (module.to(device)) or a copy keeps the codes
            return args[0]._map_inner(lambda t: t.clone() if device is None else t.to(device))
        if func._schema.is_mutable:
            raise RuntimeError(
                f"{func} would write into a StoredWeight, which holds quantized codes only (a weight "
                "loaded by qpass.from_pretrained): it is read-only; load the checkpoint with "
                "qpass.from_pretrained again, or train from the high-precision model")

        def dequantized(value):
            return value.dequantize() if isinstance(value, StoredWeight) else value

        return func(*tree_map(dequantized, args), **tree_map(dequantized, kwargs))
