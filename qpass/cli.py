"""The ``qpass`` command line: ``qpass formats`` prints what every named format costs and keeps;
``qpass export`` writes an ONNX model of a model under an inference recipe."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
from pathlib import Path

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


def load_model(source: str, input_shape: list[int] | None) -> tuple[torch.nn.Module, tuple]:
    """A model and example inputs from ``source``: a local Hugging Face model directory (example
    token ids of ``input_shape``, default 2x16, since a size-1 dim would be exported static), or
    ``module:function`` / ``file.py:function`` returning a model (then a float input of
    ``input_shape``) or a ``(model, example_inputs)`` pair."""
    if Path(source, "config.json").is_file():
        import transformers

        config = transformers.AutoConfig.from_pretrained(source)
        config.use_cache = False
        model = transformers.AutoModelForCausalLM.from_pretrained(source, config=config)
        return model, (torch.randint(0, config.vocab_size, input_shape or [2, 16]),)
    module_name, _, function = source.rpartition(":")
    if not module_name or not function:
        raise SystemExit(
            f"qpass export: {source!r} is neither a Hugging Face model directory nor module:function"
        )
    if module_name.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    made = getattr(module, function)()
    if isinstance(made, tuple):
        model, inputs = made
        return model, tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    if input_shape is None:
        raise SystemExit(f"qpass export: {source} returns a model without example inputs; give --input-shape")
    return made, (torch.randn(input_shape),)


def export_command(args: argparse.Namespace) -> None:
    import qpass
    import qpass.onnx

    model, inputs = load_model(args.model, args.input_shape)
    model.eval()
    compiled = qpass.compile(model, args.recipe, backend="aot_eager")
    path = qpass.onnx.export_onnx(compiled, inputs, args.output, dialect=args.dialect)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.3f} MB, {args.dialect} dialect, recipe {args.recipe})")
    if args.check:
        print(qpass.onnx.check(path, compiled, inputs))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="qpass", description="qpass: low-precision quantization for PyTorch"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    formats = commands.add_parser("formats", help="bits and QSNR of every named format")
    formats.add_argument("--rows", type=int, default=256)
    formats.add_argument("--cols", type=int, default=4096)
    formats.add_argument("--seed", type=int, default=0)
    export = commands.add_parser("export", help="write an ONNX model of a model under an inference recipe")
    export.add_argument("model", help="a Hugging Face model directory, or module:function / file.py:function")
    export.add_argument("--recipe", required=True, help="an inference recipe, e.g. mxfp4-weight-only")
    export.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    export.add_argument("--dialect", default="portable", choices=("portable", "qdq"))
    export.add_argument("--input-shape", type=lambda text: [int(d) for d in text.split("x")],
                        help="example input shape, e.g. 2x16 (token ids of a HF model, the default) "
                             "or 2x8x256")
    export.add_argument("--check", action="store_true", help="validate the file against qpass in PyTorch")
    args = parser.parse_args(argv)
    if args.command == "formats":
        print_format_table(args.rows, args.cols, args.seed)
    elif args.command == "export":
        export_command(args)


if __name__ == "__main__":
    main()
