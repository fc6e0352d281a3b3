"""The per-GEMM quantizer configuration of one product ``A · B``: what planning decides and the ops take.

A product runs three GEMMs in training (SPEC section 6): the forward, the one that gives dA and the
one that gives dB. :class:`MatmulQuantizers` names the quantizer of each operand in each of them
and the Hadamard rotation of each GEMM, and says which operands are the same in both their GEMMs
(quantized once, before the product: "hoisted"). It holds numerics only: how a product runs (by
which kernels, with which delayed-scaling states) is :class:`qpass.execution.Execution`'s.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, fields

from qpass.quantizer import Quantizer
from qpass.rotation import Rotation

QUANTIZER_FIELDS = ("a", "b", "da_grad", "da_b", "db_grad", "db_a")
ROTATION_FIELDS = ("rotation", "da_rotation", "db_rotation")


@dataclass(frozen=True)
class MatmulQuantizers:
    """The quantizers of one product ``A · B`` in its three GEMMs (None: high precision).

    ``a``, ``b``: the forward's operands; ``da_grad``, ``da_b``: dY and B in the GEMM that gives dA;
    ``db_grad``, ``db_a``: dY and A in the GEMM that gives dB. ``rotation``, ``da_rotation``,
    ``db_rotation``: the Hadamard rotation of both operands of each GEMM along its reduction axis.
    ``reuse_forward``: the backward GEMMs take A and B as the forward quantized them (FP4 training,
    arXiv 2501.17116) instead of requantizing them along their own axes.
    """

    a: Quantizer | None = None
    b: Quantizer | None = None
    da_grad: Quantizer | None = None
    da_b: Quantizer | None = None
    db_grad: Quantizer | None = None
    db_a: Quantizer | None = None
    rotation: Rotation | None = None
    da_rotation: Rotation | None = None
    db_rotation: Rotation | None = None
    reuse_forward: bool = False

    @staticmethod
    def _same_per_tensor(first: Quantizer | None, second: Quantizer | None) -> bool:
        return first is not None and first == second and first.per_tensor

    # An operand rotated in either of its GEMMs differs between them: each rotates its own axis.

    def _shares(self, forward: Quantizer | None, backward: Quantizer | None,
                backward_rotation: Rotation | None) -> bool:
        return (self._same_per_tensor(forward, backward) and self.rotation is None
                and backward_rotation is None and not self.reuse_forward)

    @property
    def shares_a(self) -> bool:
        """A is quantized per tensor identically in both its GEMMs: once, its codes serving both."""
        return self._shares(self.a, self.db_a, self.db_rotation)

    @property
    def shares_b(self) -> bool:
        return self._shares(self.b, self.da_b, self.da_rotation)

    @property
    def hoists_a(self) -> bool:
        """The backward GEMMs take A as the forward quantized it (``reuse_forward``): quantized once,
        before the product, and its quantized values saved."""
        return self.reuse_forward and self.a is not None and self.rotation is None

    @property
    def hoists_b(self) -> bool:
        return self.reuse_forward and self.b is not None and self.rotation is None

    @property
    def shares_grad(self) -> bool:
        """dY is quantized identically for both backward GEMMs, so once per backward."""
        return (self._same_per_tensor(self.da_grad, self.db_grad)
                and self.da_rotation is self.db_rotation is None)

    @property
    def quantizes_backward(self) -> bool:
        return any((self.da_grad, self.da_b, self.db_grad, self.db_a))

    def quantized_once(self) -> dict[str, bool]:
        """Per operand (``a``, ``b``, ``grad``): whether it is quantized once per step, the condition
        for a delayed-scaling state, which records one amax per step."""
        inference = not self.quantizes_backward
        return {"a": self.hoists_a or self.shares_a or inference,
                "b": self.hoists_b or self.shares_b or inference,
                "grad": self.shares_grad}

    def to_json(self) -> str:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return json.dumps(
            {k: v.to_json() if isinstance(v, (Quantizer, Rotation)) else v for k, v in values.items()})

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
