"""The ``qpass`` command line: ``qpass formats`` prints what every named format costs and keeps."""

from __future__ import annotations

import argparse

import torch

from qpass.formats import NAMED_FORMATS, dequantize, qsnr, quantize


def student_t(shape: tuple[int, ...], dof: int, generator: torch.Generator) -> torch.Tensor:
    """Student-t samples, ``Z / sqrt(chi2_dof / dof)``, drawn from ``generator`` (reproducible)."""
    z = torch.randn(shape, generator=generator)
    chi2 = torch.randn((dof, *shape), generator=generator).square().sum(0)
    return z / (chi2 / dof).sqrt()


def format_table(rows: int = 256, cols: int = 4096, seed: int = 0) -> list[tuple[str, float, float, float]]:
    """(format, bits per element with scales, QSNR on N(0,1), QSNR on Student-t(3)) per named format."""
    generator = torch.Generator().manual_seed(seed)
    normal = torch.randn(rows, cols, generator=generator)
    heavy = student_t((rows, cols), 3, generator)
    table = []
    for name in NAMED_FORMATS:
        q_normal = quantize(normal, name)
        table.append(
            (
                name,
                q_normal.bits_per_element(),
                qsnr(normal, dequantize(q_normal)),
                qsnr(heavy, dequantize(quantize(heavy, name))),
            )
        )
    return table


def print_format_table(rows: int, cols: int, seed: int = 0) -> None:
    print(f"Named formats on a {rows}x{cols} fp32 tensor (blocks along the last axis, seed {seed}).")
    print("fp8_*/fp6_*/fp4_e2m1 use their default per-tensor absmax scale; QSNR in dB, higher is better.\n")
    header = ("format", "bits/elem", "QSNR N(0,1)", "QSNR t(3)")
    print(f"{header[0]:<12} {header[1]:>9} {header[2]:>12} {header[3]:>10}")
    for name, bits, q_normal, q_heavy in format_table(rows, cols, seed):
        print(f"{name:<12} {bits:>9.3f} {q_normal:>12.2f} {q_heavy:>10.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="qpass", description="qpass: low-precision quantization for PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)
    formats = commands.add_parser("formats", help="bits and QSNR of every named format")
    formats.add_argument("--rows", type=int, default=256)
    formats.add_argument("--cols", type=int, default=4096)
    formats.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "formats":
        print_format_table(args.rows, args.cols, args.seed)


if __name__ == "__main__":
    main()
