"""A two-operand einsum read as a batched matmul ``[batch, M, K] · [batch, K, N]``: the one parser
of its equation."""

from __future__ import annotations

import functools
from dataclasses import dataclass


@dataclass(frozen=True)
class EinsumLayout:
    """Index strings of ``"<a>,<b>-><out>"``: each operand's and the output's, and their roles."""

    a: str
    b: str
    out: str

    @property
    def batch(self) -> str:
        return "".join(i for i in self.a if i in self.b and i in self.out)

    @property
    def free_a(self) -> str:  # M
        return "".join(i for i in self.a if i not in self.b)

    @property
    def contracted(self) -> str:  # K
        return "".join(i for i in self.a if i in self.b and i not in self.out)

    @property
    def free_b(self) -> str:  # N
        return "".join(i for i in self.b if i not in self.a)

    def unsupported(self) -> str | None:
        """Why the einsum is not a batched matmul (None when it is one)."""
        equation = f"{self.a},{self.b}->{self.out}"
        if any(len(set(term)) != len(term) for term in (self.a, self.b, self.out)):
            return f"einsum {equation!r} takes a diagonal (a repeated index)"
        if not self.contracted:
            return f"einsum {equation!r} contracts no index"
        if (set(self.a) ^ set(self.b)) - set(self.out) or set(self.out) - set(self.a) - set(self.b):
            return f"einsum {equation!r} sums over or invents an index outside the contraction"
        return None


@functools.lru_cache(maxsize=None)
def einsum_layout(equation: str, num_operands: int = 2) -> EinsumLayout | str:
    """The layout of ``equation``, or why it is not a two-operand batched matmul."""
    equation = equation.replace(" ", "")
    if num_operands != 2 or "->" not in equation or "." in equation or equation.count(",") != 1:
        return f"einsum {equation!r} is not a two-operand batched matmul with an explicit output"
    inputs, out = equation.split("->")
    layout = EinsumLayout(*inputs.split(","), out)
    return layout.unsupported() or layout
