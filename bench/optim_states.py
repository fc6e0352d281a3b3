"""qpass.optim.AdamW's state formats on a tiny regression: per-tensor against per-block scales.

Three measurements (docs/optim.md reports them):
- state quantization error: AdamW with fp32 states runs; at a few steps its exact moments (m, v,
  and sqrt(v), the alternative way to store v) are quantized with each candidate format, and the
  QSNR and the fraction of nonzero entries that become zero are measured;
- stalling: the second moment's recurrence alone, requantized every step, after the gradients drop
  tenfold, stored as v or as sqrt(v): its error against the exact recurrence;
- training: the same regression trained with each candidate's states; the final loss, and the
  states' bytes per parameter.
The regression's inputs span four decades of scale per feature, so gradients vary widely within a
tensor, as they do across a language model's rows.

    python bench/optim_states.py [--steps 1000] [--no-write]   (writes its tables to bench/RESULTS.md)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from qpass.formats import dequantize, qsnr, quantize
from qpass.formats.absmax import absmax_encode
from qpass.optim import FP16_MAX, AdamW
from qpass.quantizer import Quantizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import provenance, write_section  # noqa: E402

IN, HIDDEN, OUT, BATCH = 64, 256, 32, 256
CANDIDATES = {  # (exp_avg, exp_avg_sq)
    "fp32 states": ("fp32", "fp32"),
    "E4M3 + FP16, per tensor (default)": ("fp8_e4m3", "fp16"),
    "E4M3 per block 128 + FP16": (Quantizer("fp8_e4m3", granularity=("block", 128)), "fp16"),
    "E4M3 per block 32 + FP16": (Quantizer("fp8_e4m3", granularity=("block", 32)), "fp16"),
    "MXFP8 E4M3 + FP16": ("mxfp8_e4m3", "fp16"),
    "E4M3 + E4M3, per tensor": ("fp8_e4m3", "fp8_e4m3"),
    "E4M3 + E4M3 per block 32": (Quantizer("fp8_e4m3", granularity=("block", 32)),
                                 Quantizer("fp8_e4m3", granularity=("block", 32))),
}


def data(steps: int):
    generator = torch.Generator().manual_seed(0)
    scales = 10.0 ** torch.empty(IN).uniform_(-3, 1, generator=generator)
    teacher = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT))
    batches = []
    for _ in range(steps):
        x = torch.randn(BATCH, IN, generator=generator) * scales
        with torch.no_grad():
            batches.append((x, teacher(x / scales)))
    return batches


def student() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT))


def train(batches, exp_avg, exp_avg_sq, on_step=None) -> tuple[float, float]:
    model = student()
    optimizer = AdamW(model.parameters(), lr=3e-3, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    losses = []
    for step, (x, y) in enumerate(batches, 1):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, optimizer)
    count = sum(p.numel() for p in model.parameters())
    return sum(losses[-20:]) / 20, optimizer.state_bytes() / count


def stored(x: torch.Tensor, fmt) -> torch.Tensor:
    if fmt == "fp16":  # as qpass.optim stores it: a power-of-two scale, then the cast
        encode = absmax_encode(x.abs().amax(), FP16_MAX, pow2_scale=True)
        return (x * encode).half().float() / encode
    if fmt == "fp16 unscaled":
        return x.half().float()
    spec = (fmt if isinstance(fmt, Quantizer) else Quantizer(fmt)).spec
    return dequantize(quantize(x, spec, axis=-1))


def state_errors(batches, at: tuple[int, ...]) -> dict:
    """QSNR and the fraction of nonzero entries flushed to zero, per (state, format), averaged over
    the parameters and the steps ``at``, of fp32 AdamW's exact states."""
    block32 = Quantizer("fp8_e4m3", granularity=("block", 32))
    formats = {"m": ["fp8_e4m3", Quantizer("fp8_e4m3", granularity=("block", 128)), block32, "mxfp8_e4m3"],
               "v": ["fp16", "fp16 unscaled", "fp8_e4m3", block32],
               "sqrt(v)": ["fp16", "fp16 unscaled"]}
    totals: dict = {}

    def measure(step, optimizer):
        if step not in at:
            return
        for state in optimizer.state.values():
            values = {"m": state["exp_avg"], "v": state["exp_avg_sq"], "sqrt(v)": state["exp_avg_sq"].sqrt()}
            for name, fmts in formats.items():
                x = values[name]
                for fmt in fmts:
                    y = stored(x, fmt)
                    flushed = ((y == 0) & (x != 0)).sum().item() / max((x != 0).sum().item(), 1)
                    entry = totals.setdefault((name, str(fmt)), [0.0, 0.0, 0])
                    entry[0] += qsnr(x, y)
                    entry[1] += flushed
                    entry[2] += 1

    train(batches, "fp32", "fp32", measure)
    return {key: (total / n, flushed / n) for key, (total, flushed, n) in totals.items()}


def stalling(beta2: float, fmt: str, steps: int = 3000) -> tuple[float, float]:
    """Mean relative error of sqrt(v) after the gradients drop tenfold, for v stored as v and as
    sqrt(v) in ``fmt``, requantized every step as the optimizer does."""
    generator = torch.Generator().manual_seed(0)
    scale = torch.rand(4096, generator=generator) + 0.5
    exact = as_v = as_root = torch.zeros(4096)
    for step in range(steps):
        g = torch.randn(4096, generator=generator) * scale * (1.0 if step < 100 else 0.1)
        exact = exact * beta2 + g * g * (1 - beta2)
        as_v = stored(as_v * beta2 + g * g * (1 - beta2), fmt)
        as_root = stored((as_root * as_root * beta2 + g * g * (1 - beta2)).sqrt(), fmt)
    return ((as_v.sqrt() / exact.sqrt() - 1).abs().mean().item(),
            (as_root / exact.sqrt() - 1).abs().mean().item())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    batches = data(args.steps)
    lines = ["| state | format | QSNR dB | nonzeros flushed to 0 |", "|---|---|---|---|"]
    at = (10, args.steps // 2, args.steps)
    for (name, fmt), (snr, flushed) in state_errors(batches, at).items():
        lines.append(f"| {name} | {fmt} | {snr:.1f} | {100 * flushed:.2f}% |")
    lines += ["", "| beta2 | format | stored as v | stored as sqrt(v) |", "|---|---|---|---|"]
    for beta2 in (0.95, 0.999, 0.9995):
        for fmt in ("fp16", "fp8_e4m3"):
            as_v, as_root = stalling(beta2, fmt)
            lines.append(f"| {beta2} | {fmt} | {100 * as_v:.2f}% | {100 * as_root:.2f}% |")
    lines += ["", "| states | final loss (mean of last 20) | bytes / parameter |", "|---|---|---|"]
    for name, (exp_avg, exp_avg_sq) in CANDIDATES.items():
        loss, per_param = train(batches, exp_avg, exp_avg_sq)
        lines.append(f"| {name} | {loss:.5f} | {per_param:.4f} |")
    command = "python bench/optim_states.py" + (f" --steps {args.steps}" if args.steps != 1000 else "")
    body = (
        f"Tiny regression: MLP {IN}-{HIDDEN}-{OUT}, batch {BATCH}, {args.steps} AdamW steps (lr 3e-3), "
        f"one seed; {provenance(command, start)}. Which scales qpass.optim.AdamW's states default to, and "
        "why: docs/optim.md.\n\n" + "\n".join(lines) + "\n\n"
    )
    print(body)
    if not args.no_write:
        write_section("optim_states", "Optimizer states: per-tensor against per-block scales (CPU)", body)


if __name__ == "__main__":
    main()
