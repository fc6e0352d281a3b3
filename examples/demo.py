"""qpass demo: what each low-precision format keeps of a tensor and of a matmul.

Run with `make demo`. Prints, for every named format, its bits per element and QSNR on Gaussian
and heavy-tailed data, then the QSNR of a linear layer's output Y = X·Wᵀ when both operands are
quantized along the reduction axis K (SPEC section 6), with and without planted outlier channels.
"""

from __future__ import annotations

import time

import torch

import qpass
from qpass.cli import print_format_table, student_t
from qpass.formats import NAMED_FORMATS


def matmul_qsnr(x: torch.Tensor, w: torch.Tensor, fmt: str) -> float:
    """QSNR of X·Wᵀ with both operands fake-quantized along K."""
    y = x @ w.T
    y_q = qpass.fake_quantize(x, fmt, axis=-1) @ qpass.fake_quantize(w, fmt, axis=-1).T
    return qpass.qsnr(y, y_q)


def main() -> None:
    start = time.perf_counter()
    print_format_table(rows=128, cols=2048)

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(256, 1024, generator=generator)
    w = torch.randn(512, 1024, generator=generator) / 32
    x_outliers = x.clone()
    x_outliers[:, :8] *= 50  # a few activation channels 50x larger, as in LLM activations
    x_heavy = student_t((256, 1024), 3, generator)

    print("\nQSNR (dB) of Y = X·Wᵀ, X [256, 1024], W [512, 1024], both quantized along K\n")
    print(f"{'format':<12} {'gaussian':>9} {'outliers':>9} {'t(3)':>9}")
    for name in NAMED_FORMATS:
        cells = [matmul_qsnr(a, w, name) for a in (x, x_outliers, x_heavy)]
        print(f"{name:<12} " + " ".join(f"{c:>9.2f}" for c in cells))
    print("\nPer-tensor scales lose the most to outliers; per-block scales (MX, NVFP4) keep them local.")
    print(f"Done in {time.perf_counter() - start:.1f} s.")


if __name__ == "__main__":
    main()
