"""How closely a portable ONNX export agrees with qpass in PyTorch, per inference recipe, and why.

Run with `make bench`, or `python bench/onnx_agreement.py [--inputs 20]` (`--no-write` only prints).
Writes its table to bench/RESULTS.md between this benchmark's markers.

The demo's Llama (examples/demo.py, random weights) is compiled under each inference recipe,
exported once with dynamic batch and sequence, and run by ONNX Runtime on random token sequences.
Per input it measures the logits' largest error relative to qpass's PyTorch output, and reruns every
activation quantizer and rotation of the file with qpass's reference on the values that quantizer
received (``qpass.onnx.check_quantizers``). The first tells how often the two runtimes agree to fp32
rounding; the second tells whether a disagreement comes from the quantizers (it must not) or from
the ops between them, which ONNX Runtime and PyTorch sum in different orders: a last-bit difference
in a quantizer's input, at a rounding boundary, moves one element one grid step.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "bench"))

import demo  # noqa: E402
from results import write_section  # noqa: E402

import qpass  # noqa: E402
from qpass.onnx.check import check_quantizers  # noqa: E402

RECIPES = ("fp8-infer", "mxfp8-infer", "mxfp6-infer", "mxfp4-infer", "nvfp4-infer", "mxfp4-weight-only")
EXACT = 1e-5  # relative: fp32 rounding of a different summation order


def measure(model: torch.nn.Module, recipe: str, inputs: list[torch.Tensor], directory: Path) -> dict:
    torch.compiler.reset()
    qm = qpass.compile(copy.deepcopy(model), recipe, backend="aot_eager")
    path = qpass.export_onnx(qm, (inputs[0],), directory / f"{recipe}.onnx")
    session = qpass.onnx.session(path)
    errors, quantizers, mismatched = [], 0, 0
    for ids in inputs:
        with torch.no_grad():
            expected = qm(ids).logits
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0])
        errors.append(((got - expected).abs().max() / expected.abs().max()).item())
        checked, mismatches = check_quantizers(path, (ids,))
        quantizers, mismatched = checked, mismatched + len(mismatches)
    return {"recipe": recipe, "errors": errors, "quantizers": quantizers, "mismatched": mismatched}


def table(rows: list[dict], count: int) -> str:
    lines = [
        f"| recipe | inputs within {EXACT:g} | median relative error | max relative error "
        "| activation quantizers | bits differing from the reference |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        errors = row["errors"]
        within = sum(e <= EXACT for e in errors)
        lines.append(
            f"| {row['recipe']} | {within}/{count} | {statistics.median(errors):.1e} | {max(errors):.1e} | "
            f"{row['quantizers']} per input | {row['mismatched']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=20, help="random token sequences per recipe")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=12)
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    demo_args = demo.parse_args([])
    model = demo.build_model(demo_args).eval()
    model.config.use_cache = False
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, 256, (args.batch, args.seq), generator=generator) for _ in range(args.inputs)]
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(model, recipe, inputs, Path(tmp)) for recipe in RECIPES]
    command = "python bench/onnx_agreement.py" + (f" --inputs {args.inputs}" if args.inputs != 20 else "")
    body = (
        f"The demo's Llama ({demo_args.layers} layers, hidden {demo_args.hidden}, random weights), exported "
        f"portable with dynamic shapes, run by onnxruntime {ort.__version__} (CPU) on {args.inputs} random "
        f"{args.batch}x{args.seq} token sequences; `{command}`, "
        f"{platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {time.time() - start:.0f} s.\n\n" + table(rows, args.inputs) + "\n"
        "Every activation quantizer and rotation, rerun by qpass's reference on the values it received in "
        "the ONNX run, gives the same bits (last column). Where the logits still differ by more than fp32 "
        "rounding, a quantizer's input differed from PyTorch's in its last bit (the matmuls, norms and "
        "softmax between quantizers are summed in another order) and rounded to the other neighbour. "
        "Weight-only quantization cannot flip: the weights are quantized once, from the same parameters.\n\n"
    )
    print(body)
    if not args.no_write:
        write_section("onnx-agreement", "ONNX export: agreement with qpass in PyTorch (CPU)", body)


if __name__ == "__main__":
    main()
