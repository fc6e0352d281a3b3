"""Throughput of fake-quantization (quantize + dequantize) on the CPU: qpass vs torchao's emulation.

Run with `make bench` (which installs torchao into the bench environment only), or
`python bench/formats_cpu.py [--size 4096] [--repeats 5]`. Prints a table and writes it to
bench/RESULTS.md between this benchmark's markers. Both libraries run in the same process, on the
same tensor, interleaved, best of `repeats` timings each. Absolute CPU timings on shared machines
are noise; the ratio column is the result.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from results import write_section  # noqa: E402

import qpass  # noqa: E402

MX_ELEMENTS = {  # qpass name -> torchao elem_dtype
    "mxfp8_e4m3": torch.float8_e4m3fn,
    "mxfp8_e5m2": torch.float8_e5m2,
    "mxfp6_e2m3": "fp6_e2m3",
    "mxfp6_e3m2": "fp6_e3m2",
    "mxfp4": torch.float4_e2m1fn_x2,
    "mxint8": None,  # torchao dropped MX int8
}


def torchao_peers() -> dict:
    """torchao's emulated fake-quant for each format it has, or {} when torchao is not installed."""
    try:
        import torchao  # noqa: F401
    except ImportError:
        return {}
    # torchao is installed: a failing import below is a broken peer, and must not read as "no peer".
    from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
    from torchao.float8.float8_training_tensor import LinearMMConfig
    from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

    def mx(elem):
        def run(x):
            scale, data = to_mx(x, elem, 32)
            return to_dtype(data, scale, elem, 32, torch.float32)

        return run

    def nvfp4(x):
        scale = per_tensor_amax_to_scale(x.abs().amax())
        return NVFP4Tensor.to_nvfp4(x, 16, per_tensor_scale=scale).dequantize(torch.float32)

    def fp8_tensorwise(x):
        return hp_tensor_to_float8_dynamic(x, torch.float8_e4m3fn, LinearMMConfig()).to_original_precision()

    peers = {name: mx(elem) for name, elem in MX_ELEMENTS.items() if elem is not None}
    peers["nvfp4"] = nvfp4
    peers["fp8_e4m3"] = fp8_tensorwise
    return peers


def best_time(fn, x, repeats: int) -> float:
    fn(x)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(args.size, args.size)
    numel = x.numel()
    peers = torchao_peers()
    rows = []
    for name in [*MX_ELEMENTS, "nvfp4", "fp8_e4m3"]:
        ours = best_time(lambda t: qpass.fake_quantize(t, name), x, args.repeats)
        peer = peers.get(name)
        theirs = best_time(peer, x, args.repeats) if peer else None
        rows.append((name, numel / ours / 1e6, theirs and numel / theirs / 1e6))
        print(_row(rows[-1]), flush=True)

    try:
        import torchao

        peer_version = f"torchao {torchao.__version__}"
    except ImportError:
        peer_version = "torchao not installed"
    header = (
        f"fake_quantize of a {args.size}x{args.size} fp32 tensor, best of {args.repeats}, "
        f"torch {torch.__version__}, {peer_version}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}.\n"
        "Reproduce: `make bench` "
        f"(or `python bench/formats_cpu.py --size {args.size} --repeats {args.repeats}`).\n\n"
        "Throughput in million elements per second (eager PyTorch on both sides).\n\n"
        "| format | qpass | torchao | qpass / torchao |\n|---|---|---|---|\n"
    )
    table = header + "\n".join(_row(r) for r in rows) + "\n"
    if not args.no_write:
        write_section("formats_cpu", "Format throughput on the CPU (bench/formats_cpu.py)", table)


def _row(row) -> str:
    name, ours, theirs = row
    if not theirs:
        return f"| {name} | {ours:.1f} | n/a (torchao has no {name}) | - |"
    return f"| {name} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x |"


if __name__ == "__main__":
    main()
