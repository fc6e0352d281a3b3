"""How one quantized product runs: by the generated kernels or the reference, with which
delayed-scaling states.

These are backend choices, kept out of the numerics (:class:`~qpass.matmul_quantizers.MatmulQuantizers`):
the lowering pass (:mod:`qpass.passes.lower`) decides them once per product, records them on the
site's plan, and the rewritten graph passes them to the ops as JSON beside the quantizers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from qpass.jsontuple import JsonTuple
from qpass.matmul_quantizers import MatmulQuantizers


@dataclass(frozen=True)
class Execution(JsonTuple):
    """``kernels``: the operands are quantized by qpass's generated Triton kernels (CUDA, or Triton's
    interpreter), else by the reference numerics. ``a_state``, ``b_state``, ``grad_state``: keys of
    the delayed-scaling states (:mod:`qpass.ops.registry`) of per-tensor operands ("" for none).
    ``a_codes``, ``b_codes``: backward is saved the operand's low-precision codes where its backward
    GEMM can use them, else the operand itself (a weight: its parameter, which costs no memory).
    ``sync_a``, ``sync_b``, ``sync_grad``: the operand's per-tensor amaxes are the MAX across
    data-parallel ranks (:mod:`qpass.distributed`); a weight's never need to be, it is the same on
    every rank (DDP replicates it, FSDP2 gathers it whole). ``b_stored``: the B operand is a weight
    that arrives already quantized (and rotated) by this product's own quantizer, a
    :class:`~qpass.stored.StoredWeight` loaded from a checkpoint: its values are used as they are."""

    kernels: bool = False
    a_state: str = ""
    b_state: str = ""
    grad_state: str = ""
    a_codes: bool = True
    b_codes: bool = True
    sync_a: bool = False
    sync_b: bool = False
    sync_grad: bool = False
    b_stored: bool = False

    def check(self, quantizers: MatmulQuantizers) -> Execution:
        """``self``, if its states fit ``quantizers``: a state records one amax per step, so its
        operand must be quantized once for both its GEMMs."""
        once = quantizers.quantized_once()
        for operand, state in (("a", self.a_state), ("b", self.b_state), ("grad", self.grad_state)):
            if state and not once[operand]:
                raise ValueError(f"{operand}_state: delayed scaling needs one per-tensor quantizer "
                                 "for the operand in both its GEMMs")
        return self

    @property
    def has_states(self) -> bool:
        return any((self.a_state, self.b_state, self.grad_state))


REFERENCE = Execution()

ProductConfig = tuple[str, str]  # (MatmulQuantizers JSON, Execution JSON): what a quantized form takes


@functools.lru_cache(maxsize=None)
def without_hoisted(config: ProductConfig) -> tuple[MatmulQuantizers, Execution, ProductConfig | None]:
    """The product's quantizers and execution, and the op's config once hoisted operands are taken
    out (None: no op)."""
    q, run = MatmulQuantizers.from_json(config[0]), Execution.from_json(config[1])
    inner, inner_run = q, run
    if q.hoists_a:
        inner, inner_run = replace(inner, a=None, db_a=None), replace(inner_run, a_state="")
    if q.hoists_b:
        inner, inner_run = replace(inner, b=None, da_b=None), replace(inner_run, b_state="")
    op_config = ((inner.to_json(), inner_run.to_json()) if any((inner.a, inner.b, inner.quantizes_backward))
                 else None)
    return q, run, op_config
