"""The ``qpass`` command line: ``qpass formats`` prints what every named format costs and keeps;
``qpass quantize`` writes a quantized checkpoint of a Hugging Face model (qpass's own, or the
compressed-tensors format that serving engines load), calibrated if asked; ``qpass export`` writes
an ONNX model of a model under an inference recipe."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path
from pydoc_data.topics import topics

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

        model = transformers.AutoModelForCausalLM.from_pretrained(source)
        return model, (torch.randint(0, model.config.vocab_size, input_shape or [2, 16]),)
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
    path = qpass.onnx.export_onnx(
        compiled, inputs, args.output, dialect=args.dialect, use_cache=False if args.no_cache else None)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.3f} MB, {args.dialect} dialect, recipe {args.recipe})")
    if args.check:
        print(qpass.onnx.check(path, compiled, inputs))


def _stage(number: int, total: int, what: str) -> None:
    """One line of the command's progress: ``[2/4 ######......] calibrating ...`` on stderr."""
    done = "#" * (12 * number // total)
    print(f"[{number}/{total} {done:.<12}] {what}", file=sys.stderr, flush=True)


def calibration_batches(tokenizer, count: int, length: int, text_file: str | None) -> list[torch.Tensor]:
    """``count`` consecutive ``[1, length]`` token windows of ``text_file``, or of Python's own help
    topics (``pydoc_data``: text every Python install has, so calibration works offline)."""
    text = Path(text_file).read_text() if text_file else "\n\n".join(topics[name] for name in sorted(topics))
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < count * length:
        raise SystemExit(f"qpass quantize: the calibration text has {ids.numel()} tokens, fewer than "
                         f"--calibrate {count} windows of --seq-len {length}")
    return [ids[i * length:(i + 1) * length][None] for i in range(count)]


def quantize_command(args: argparse.Namespace) -> None:
    import transformers

    import qpass

    stages = 4 if args.calibrate else 3
    _stage(1, stages, f"loading {args.model}")
    source = dict(gguf_file=args.gguf_file) if args.gguf_file else {}
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model, **source)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, **source).eval()
    qm = qpass.compile(model, args.recipe, backend="aot_eager")
    sample = tokenizer("qpass finds every matmul of the model.", return_tensors="pt").input_ids
    _stage(2, stages, f"finding the sites of recipe {args.recipe}")
    with torch.no_grad():
        qm(sample)
    if args.calibrate:
        _stage(3, stages, f"calibrating ({args.method}) on {args.calibrate} windows of {args.seq_len} tokens")
        batches = calibration_batches(tokenizer, args.calibrate, args.seq_len, args.calibration_text)
        qpass.calibrate(qm, batches, method=args.method)
        with torch.no_grad():
            qm(sample)
    _stage(stages, stages, f"writing {args.output} ({args.format})")
    path = qpass.save_pretrained(qm, args.output, format=args.format)
    tokenizer.save_pretrained(path)
    size = sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
    print(f"wrote {path} ({size / 1e6:.1f} MB, {args.format} format, recipe {args.recipe})")
    print(qpass.report(qm))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="qpass", description="qpass: low-precision quantization for PyTorch"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    formats = commands.add_parser("formats", help="bits and QSNR of every named format")
    formats.add_argument("--rows", type=int, default=256)
    formats.add_argument("--cols", type=int, default=4096)
    formats.add_argument("--seed", type=int, default=0)
    quantize = commands.add_parser("quantize", help="write a quantized checkpoint of a Hugging Face model")
    quantize.add_argument("model", help="a Hugging Face model directory")
    quantize.add_argument("--recipe", required=True, help="an inference recipe, e.g. nvfp4-infer")
    quantize.add_argument("-o", "--output", required=True, help="the checkpoint directory to write")
    quantize.add_argument("--format", default="qpass", choices=("qpass", "compressed-tensors"))
    quantize.add_argument("--calibrate", type=int, default=0, metavar="N",
                          help="calibrate on N windows of text (GPTQ, SmoothQuant, OCS statistics)")
    quantize.add_argument("--method", default="gptq", choices=("rtn", "gptq"), help="what calibration does")
    quantize.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    quantize.add_argument("--calibration-text", help="a text file (default: Python's help topics)")
    quantize.add_argument("--gguf-file", help="the GGUF file in the directory to load the model from")
    export = commands.add_parser("export", help="write an ONNX model of a model under an inference recipe")
    export.add_argument("model", help="a Hugging Face model directory, or module:function / file.py:function")
    export.add_argument("--recipe", required=True, help="an inference recipe, e.g. mxfp4-weight-only")
    export.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    export.add_argument("--dialect", default="portable", choices=("portable", "qdq"))
    export.add_argument("--input-shape", type=lambda text: [int(d) for d in text.split("x")],
                        help="example input shape, e.g. 2x16 (token ids of a HF model, the default) "
                             "or 2x8x256")
    export.add_argument("--check", action="store_true", help="validate the file against qpass in PyTorch")
    export.add_argument("--no-cache", action="store_true",
                        help="a causal LM: export the plain forward (logits only), not the decoder with its "
                        "KV cache as inputs and outputs for token-by-token generation")
    args = parser.parse_args(argv)
    if args.command == "formats":
        print_format_table(args.rows, args.cols, args.seed)
    elif args.command == "quantize":
        quantize_command(args)
    elif args.command == "export":
        export_command(args)


if __name__ == "__main__":
    main()
