"""ONNX Runtime CPU latency, load time and memory of qpass's portable ONNX export, against fp32.

Run with `make bench`, or `python bench/onnx_cpu.py [--hidden 128] [--layers 2] [--seq 128]
[--rounds 60] [--burst 5] [--probes 3] [--threads 1]`. Prints three tables and writes them to
bench/RESULTS.md between this benchmark's markers (`--no-write` only prints; `--quick` is a smoke
run of about a minute on a tiny model, and never writes).

The model is examples/demo.py's byte-level Llama (random init, nothing downloaded; the demo's
defaults unless told otherwise), exported three ways in one run: `qpass.onnx.export_fp32` (the
baseline: the same model through the same exporter, without qpass) and `qpass.export_onnx(...,
dialect="portable")` of `qpass.compile(copy, recipe)` for mxfp4-weight-only and fp8-infer, all
traced on a batch of 2 so that batch and sequence both come out dynamic (an example batch of 1
would pin the batch to 1: torch.export specializes dims of size 0 and 1). Each export is opened
with both choices of `qpass.onnx.session`:

- kept quantized (``fold_weights=False``): ORT's ConstantFolding is off, the weights stay uint8
  codes and scales in memory and are expanded by table lookups at every run;
- folded (``fold_weights=True``): ORT folds the expansion into fp32 initializers at load.

For the fp32 export the two choices give the same graph up to a few shape constants that ORT
folds; both are measured, for symmetry, and "vs fp32" is always against fp32 folded (ORT's
default).

Measured:

1. accuracy, so that the timings are of models known to be right: `qpass.onnx.check` (ORT against
   qpass's own PyTorch output) at both shapes, measured against how far PyTorch's own logits move
   when every embedding moves one ulp (activations quantized to few bits make a model's output
   jump at rounding boundaries, so that a last-bit difference in fp32 arithmetic, as between ORT's
   GEMMs and PyTorch's, can move it far more than fp32's tolerance); the two session options
   against each other; and the quantized logits against the fp32 export's (the quantization error;
   on random weights, an indication only);
2. load time and memory, each session in a fresh process (`python bench/onnx_cpu.py --probe ...`)
   so that one session's allocations cannot hide another's: the session's creation time, the
   VmRSS (/proc/self/status) that creating it adds, the peak (VmHWM, reset through
   /proc/self/clear_refs before the creation) above the RSS before it, and the memory in use (RSS
   after glibc's ``malloc_trim``: without the freed heap the allocator keeps) after the load and
   once the session has run both shapes (ORT's arena then holds the activations, and for
   kept-quantized weights their expansions); the median of ``--probes`` processes, the variants
   interleaved. Also, and deterministic: the initializer bytes and node count of the graph ORT runs
   after its optimizations (saved through ``optimized_model_filepath``);
3. latency of one `InferenceSession.run` at a decode-like shape (batch 1, one token; there is no
   KV cache, so this is one token's forward) and a prefill-like one (batch 1, the model's maximum
   sequence length), with ``--threads`` intra-op threads (one by default). The six sessions are
   measured round-robin, ``--rounds`` turns per shape (in a new random order each time), each turn
   one untimed run then ``--burst`` timed ones back to back, so that a burst of outside load falls on
   all of them alike and each finds its weights in the caches, as a decode loop would. Times are the
   process's CPU time (which another process taking a core inflates far less than wall time);
   wall-time medians beside them.

The machine is shared: absolute times are noise, the ratios are the result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "bench"))
from process_memory import start_peak, status  # noqa: E402

RECIPES = ("mxfp4-weight-only", "fp8-infer")
BASELINE = "fp32"
OPTIONS = {False: "kept quantized", True: "folded"}  # fold_weights -> name
OUT = ROOT / "build" / "onnx_cpu"  # the exports, and the graphs ORT optimized, kept for inspection
EXPORT_BATCH, EXPORT_SEQ = 2, 32  # the traced example: a batch of 1 would pin the batch dim to 1
PROBE_RUNS = 3  # runs of each shape in a probe before its last RSS reading
MATCH_TOLERANCE = 1e-4  # max relative error against PyTorch: what fp32 reordering may leave
WITHIN_SENSITIVITY = 2.0  # an error up to this multiple of PyTorch's one-ulp sensitivity is explained by it
RATIO_NOTED = 0.15  # a folded recipe this far from fp32's time gets a note

_STARTED = time.perf_counter()


# ---- the probe: one session's load time and memory, in its own process ------------------------------


def probe(path: str, fold: bool, threads: int, seqs: list[int]) -> dict:
    """Create one session of ``path``, measuring its load time and memory, then run each shape."""
    import numpy as np
    import onnxruntime as ort

    from qpass.onnx import session

    ort.set_default_logger_severity(2)  # its warnings go to stderr, which the parent reads
    trim, peak_reset, before = start_peak()
    start = time.perf_counter()
    sess = session(path, fold_weights=fold, threads=threads)
    load_s = time.perf_counter() - start
    after_load, peak = status("VmRSS"), status("VmHWM")
    if trim:
        trim()
    live_load = status("VmRSS")
    name = sess.get_inputs()[0].name
    for seq in seqs:
        ids = np.random.default_rng(0).integers(0, 256, (1, seq), dtype=np.int64)
        for _ in range(PROBE_RUNS):
            sess.run(None, {name: ids})
    if trim:
        trim()
    return {
        "load_s": load_s,
        "rss_load": after_load - before,
        "peak_load": peak - before if peak_reset else None,
        "live_load": live_load - before if trim else None,
        "live_runs": status("VmRSS") - before if trim else None,
    }


# ---- the measurements in the main process ------------------------------------------------------------


@dataclass
class Export:
    name: str  # "fp32" or the recipe
    path: Path
    export_s: float
    nodes: int = 0
    pytorch_error: tuple[float, float] = (0.0, 0.0)  # max abs, max rel against PyTorch
    fold_difference: float = 0.0  # max |kept quantized - folded| of its logits in ORT
    fp32_error: tuple[float, float, float] = (0.0, 0.0, 1.0)  # against fp32's: max abs, max rel, top-1
    sensitivity: float = 0.0  # max rel change of the PyTorch logits when the embeddings move one ulp

    @property
    def size(self) -> int:
        return self.path.stat().st_size


@dataclass
class Variant:
    export: Export
    fold: bool
    session: object = None
    cpu: dict[int, list[float]] = field(default_factory=dict)  # seq -> seconds per run
    wall: dict[int, list[float]] = field(default_factory=dict)
    probes: list[dict] = field(default_factory=list)
    warnings: Counter = field(default_factory=Counter)
    initializer_bytes: int = 0  # after ORT's optimizations
    optimized_nodes: int = 0

    @property
    def label(self) -> str:
        return f"{self.export.name}, {OPTIONS[self.fold]}"

    def probed(self, key: str) -> float | None:
        values = [p[key] for p in self.probes if p[key] is not None]
        return statistics.median(values) if values else None

    def median(self, seq: int) -> float:
        return statistics.median(self.cpu[seq])


def export_all(model, out: Path) -> tuple[list[Export], dict]:
    """The fp32 export and one per recipe; returns them and the compiled models (for the checks)."""
    import copy

    import torch

    import qpass
    import qpass.onnx

    tokens = torch.randint(0, 256, (EXPORT_BATCH, EXPORT_SEQ), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    path = qpass.onnx.export_fp32(model, (tokens,), out / "fp32.onnx")
    exports = [Export(BASELINE, path, time.perf_counter() - start)]
    progress(f"exported fp32 in {exports[-1].export_s:.1f} s")
    compiled = {}
    for recipe in RECIPES:
        torch.compiler.reset()  # a fresh Dynamo cache for each copy (see examples/demo.py's prepare)
        start = time.perf_counter()
        compiled[recipe] = qpass.compile(copy.deepcopy(model), recipe, backend="aot_eager")
        path = qpass.export_onnx(compiled[recipe], (tokens,), out / f"{recipe}.onnx", dialect="portable")
        exports.append(Export(recipe, path, time.perf_counter() - start))
        progress(f"compiled and exported {recipe} in {exports[-1].export_s:.1f} s")
    return exports, compiled


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(ids).logits.float().numpy()


def _relative(got, expected) -> float:
    import numpy as np

    return float(np.abs(got - expected).max()) / float(np.abs(expected).max())


def sensitivity(model, recipe: str | None, inputs: dict, expected: dict) -> float:
    """How far the model's PyTorch logits move (max relative) when every embedding moves one ulp up:
    what a last-bit difference upstream does to them, the yardstick for an export's error."""
    import copy

    import torch

    import qpass

    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        weight = perturbed.get_input_embeddings().weight
        weight.copy_(torch.nextafter(weight, torch.full_like(weight, float("inf"))))
    if recipe is not None:
        torch.compiler.reset()
        perturbed = qpass.compile(perturbed, recipe, backend="aot_eager")
    return max(_relative(_logits(perturbed, ids), expected[seq]) for seq, ids in inputs.items())


def check_all(exports: list[Export], compiled: dict, model, inputs: dict) -> None:
    """Each export against PyTorch (qpass's output for a recipe, the model's for fp32) and against
    PyTorch's own sensitivity, its two session options against each other, and its logits against
    the fp32 export's."""
    import numpy as np
    import onnx
    import torch

    import qpass.onnx

    fp32 = exports[0]
    feeds = {seq: {"input_ids": ids.numpy()} for seq, ids in inputs.items()}
    reference = {seq: qpass.onnx.session(fp32.path, True).run(None, feed)[0] for seq, feed in feeds.items()}
    for export in exports:
        export.nodes = len(onnx.load(str(export.path), load_external_data=False).graph.node)
        recipe = None if export is fp32 else export.name
        torch.compiler.reset()  # few cache entries per model (see examples/demo.py's prepare)
        pytorch = model if recipe is None else compiled[recipe]
        expected = {seq: _logits(pytorch, ids) for seq, ids in inputs.items()}
        errors = []
        for seq, ids in inputs.items():
            if recipe is None:
                error = float(np.abs(reference[seq] - expected[seq]).max())
                errors.append((error, _relative(reference[seq], expected[seq])))
            else:
                result = qpass.onnx.check(export.path, pytorch, (ids,), fp32_size=fp32.size)
                errors.append((result.max_abs_error, result.max_rel_error))
        export.pytorch_error = (max(e[0] for e in errors), max(e[1] for e in errors))
        export.sensitivity = sensitivity(model, recipe, inputs, expected)
        abs_error = rel_error = 0.0
        agree = positions = 0
        for seq, feed in feeds.items():
            kept, folded = (qpass.onnx.session(export.path, fold).run(None, feed)[0] for fold in OPTIONS)
            ref = reference[seq]
            abs_error = max(abs_error, float(np.abs(kept - ref).max()))
            rel_error = max(rel_error, _relative(kept, ref))
            agree += int((kept.argmax(-1) == ref.argmax(-1)).sum())
            positions += ref.shape[0] * ref.shape[1]
            export.fold_difference = max(export.fold_difference, float(np.abs(kept - folded).max()))
        export.fp32_error = (abs_error, rel_error, agree / positions)


def optimized_graph(variant: Variant, threads: int, out: Path) -> None:
    """The graph ORT runs after its optimizations: its node count and initializer bytes. The session
    options are ``qpass.onnx.session``'s (copied here), plus ``optimized_model_filepath``."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper

    path = out / f"{variant.export.name}.{'folded' if variant.fold else 'kept'}.optimized.onnx"
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.optimized_model_filepath = str(path)
    disabled = [] if variant.fold else ["ConstantFolding"]
    providers = ["CPUExecutionProvider"]
    ort.InferenceSession(str(variant.export.path), options, providers=providers, disabled_optimizers=disabled)
    graph = onnx.load(str(path)).graph
    variant.optimized_nodes = len(graph.node)
    variant.initializer_bytes = sum(
        int(np.prod(t.dims, dtype=np.int64)) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        for t in graph.initializer
    )


def run_probes(variants: list[Variant], probes: int, threads: int, seqs: list[int]) -> None:
    """``probes`` processes per variant, one at a time, the variants interleaved."""
    for _ in range(probes):
        for variant in variants:
            path = str(variant.export.path)
            request = {"path": path, "fold": variant.fold, "threads": threads, "seqs": seqs}
            done = subprocess.run(
                [sys.executable, __file__, "--probe", json.dumps(request)], capture_output=True, text=True,
            )
            if done.returncode:
                raise RuntimeError(f"the probe of {variant.label} failed:\n{done.stderr}")
            variant.probes.append(json.loads(done.stdout.strip().splitlines()[-1]))
            for line in done.stderr.splitlines():
                if "W:onnxruntime" in line:  # the message without its colours, timestamp and node name
                    message = re.sub(r"^.*?\] ", "", re.sub(r"\x1b\[[0-9;]*m", "", line))
                    variant.warnings[re.sub(r"node '[^']*'", "node '...'", message)] += 1
        print(".", end="", flush=True)
    print(flush=True)


def time_latency(variants: list[Variant], inputs: dict, args) -> None:
    import qpass.onnx

    for variant in variants:
        path, fold = variant.export.path, variant.fold
        variant.session = qpass.onnx.session(path, fold_weights=fold, threads=args.threads)
    shuffle = random.Random(0)
    for seq, ids in inputs.items():
        feed = {"input_ids": ids.numpy()}
        for variant in variants:
            for _ in range(args.warmup):
                variant.session.run(None, feed)
            variant.cpu[seq], variant.wall[seq] = [], []
        order = list(variants)
        for _ in range(args.rounds):
            # Round-robin, so that a burst of outside load lands on every session alike; in a new order
            # each round, so that no session always follows the same one; one untimed run per turn
            # first, so that the timed ones find the session's weights in the caches, as a decode loop does.
            shuffle.shuffle(order)
            for variant in order:
                variant.session.run(None, feed)
                for _ in range(args.burst):
                    cpu, wall = time.process_time(), time.perf_counter()
                    variant.session.run(None, feed)
                    variant.cpu[seq].append(time.process_time() - cpu)
                    variant.wall[seq].append(time.perf_counter() - wall)
        progress(f"timed seq {seq}")


# ---- tables and notes --------------------------------------------------------------------------------


def _mb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.2f}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}" if abs(seconds) < 0.01 else f"{seconds * 1e3:.2f}"


def _saving(nbytes: float) -> str:
    return f"saves {_mb(nbytes)} MB" if nbytes >= 0 else f"costs {_mb(-nbytes)} MB more"


def _times(a: float, b: float) -> str:
    """``a`` against ``b`` in words: "2.31x slower" / "1.05x faster"."""
    return f"{a / b:.2f}x slower" if a >= b else f"{b / a:.2f}x faster"


def file_table(exports: list[Export]) -> list[str]:
    fp32 = exports[0]
    rows = [
        "| model | file MB | vs fp32 | ONNX nodes | export s "
        "| vs PyTorch: max abs / rel error | PyTorch's own, embeddings one ulp up: max rel "
        "| kept quantized vs folded: max abs difference "
        "| vs the fp32 export: max abs / rel, top-1 agreement |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in exports:
        abs_error, rel_error = e.pytorch_error
        abs_q, rel_q, top1 = e.fp32_error
        quantization = "-" if e is fp32 else f"{abs_q:.3g} / {rel_q:.3g}, {top1:.1%}"
        rows.append(
            f"| {e.name} | {_mb(e.size)} | {e.size / fp32.size:.3f}x | {e.nodes} | {e.export_s:.1f} "
            f"| {abs_error:.3g} / {rel_error:.3g} ({_verdict(e)}) | {e.sensitivity:.3g} "
            f"| {e.fold_difference:.3g} | {quantization} |"
        )
    return rows


def memory_table(variants: list[Variant]) -> list[str]:
    rows = [
        "| model | session | load ms | RSS added by load MB | peak during load MB | in use after load MB "
        "| in use after runs MB | initializers after ORT's optimizations MB | nodes after them |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        rows.append(
            f"| {v.export.name} | {OPTIONS[v.fold]} | {v.probed('load_s') * 1e3:.0f} "
            f"| {_mb(v.probed('rss_load'))} | {_mb(v.probed('peak_load'))} | {_mb(v.probed('live_load'))} "
            f"| {_mb(v.probed('live_runs'))} | {_mb(v.initializer_bytes)} | {v.optimized_nodes} |"
        )
    return rows


def latency_table(variants: list[Variant], seqs: list[int], baseline: Variant) -> list[str]:
    header, rule = "| model | session |", "|---|---|"
    for seq in seqs:
        header += f" seq {seq}: CPU ms median (p10-p90) | wall ms median | vs fp32 |"
        rule += "---|---|---|"
    rows = [header, rule]
    for v in variants:
        row = f"| {v.export.name} | {OPTIONS[v.fold]} |"
        for seq in seqs:
            deciles = statistics.quantiles(v.cpu[seq], n=10)
            spread = f"{_ms(deciles[0])}-{_ms(deciles[-1])}"
            wall = _ms(statistics.median(v.wall[seq]))
            ratio = v.median(seq) / baseline.median(seq)
            row += f" {_ms(v.median(seq))} ({spread}) | {wall} | {ratio:.2f}x |"
        rows.append(row)
    return rows


def _verdict(e: Export) -> str:
    error = e.pytorch_error[1]
    if error <= MATCH_TOLERANCE:
        return "ok"
    return "within sensitivity" if error <= WITHIN_SENSITIVITY * e.sensitivity else "MISMATCH"


def accuracy_lines(exports: list[Export]) -> list[str]:
    verdicts = {e.name: _verdict(e) for e in exports}
    worst = max(e.pytorch_error[1] for e in exports)
    folds = f"its two sessions agree to {max(e.fold_difference for e in exports):.2g} (max abs)"
    if all(v == "ok" for v in verdicts.values()):
        return [
            f"- accuracy: every export matches PyTorch to {worst:.2g} relative (tolerance "
            f"{MATCH_TOLERANCE:g}) and {folds}, so the timings are of correct models."
        ]
    lines = []
    for e in exports:
        if verdicts[e.name] == "within sensitivity":
            lines.append(
                f"- accuracy: {e.name} differs from PyTorch by up to {e.pytorch_error[1]:.2g} relative, "
                f"beyond {MATCH_TOLERANCE:g}, and its two sessions by up to {e.fold_difference:.2g} "
                f"(max abs); but PyTorch's own logits move by {e.sensitivity:.2g} when the embeddings move "
                "one ulp (fp32's: "
                f"{exports[0].sensitivity:.2g}). A last-bit difference in fp32 arithmetic (ORT's GEMMs sum "
                "in another order than PyTorch's) can put an activation on the other side of a rounding "
                "boundary of its quantization, a whole step away: an error of the size such flips give, "
                "not a sign of wrong numerics."
            )
        elif verdicts[e.name] == "MISMATCH":
            lines.append(
                f"- accuracy: MISMATCH for {e.name}: it differs from PyTorch by up to "
                f"{e.pytorch_error[1]:.2g} relative, more than {WITHIN_SENSITIVITY:g}x what a one-ulp change "
                f"of the embeddings does in PyTorch ({e.sensitivity:.2g}): its timings may not be of a "
                "correct model."
            )
    matching = [e.name for e in exports if verdicts[e.name] == "ok"]
    if matching:
        lines.append(f"- accuracy: {', '.join(matching)} match PyTorch to {MATCH_TOLERANCE:g} relative.")
    return lines


def observations(
    exports: list[Export], variants: list[Variant], seqs: list[int], baseline: Variant,
) -> list[str]:
    """What the numbers say, worded from the numbers."""
    from qpass.recipes import get_recipe

    by = {(v.export.name, v.fold): v for v in variants}
    fp32, quantized = exports[0], exports[1:]
    lines = accuracy_lines(exports)
    for export in quantized:
        kept, folded = by[export.name, False], by[export.name, True]
        speed = "; ".join(
            f"seq {seq}: kept quantized {_ms(kept.median(seq))} ms against folded "
            f"{_ms(folded.median(seq))} ms ({_times(kept.median(seq), folded.median(seq))}), "
            "folded "
            f"{_times(folded.median(seq), baseline.median(seq))} than fp32"
            for seq in seqs
        )
        added = ", ".join(f"{_ms(kept.median(seq) - folded.median(seq))} ms at seq {seq}" for seq in seqs)
        memory = "; ".join(
            f"{what}: {_mb(kept.probed(key))} MB kept quantized against {_mb(folded.probed(key))} MB folded "
            f"(fp32: {_mb(baseline.probed(key))} MB)"
            for what, key in (
                ("in use after load", "live_load"), ("after runs", "live_runs"),
                ("RSS added by the load, what it freed included", "rss_load"),
            )
        )
        lines.append(
            f"- {export.name}: file {export.size / fp32.size:.2f}x fp32's. Speed: {speed}; keeping the "
            f"weights quantized adds {added} per run (their expansion, the same work whatever the tokens). "
            f"Weights held after load: {_mb(kept.initializer_bytes)} MB kept quantized against "
            f"{_mb(folded.initializer_bytes)} MB folded (fp32: {_mb(baseline.initializer_bytes)} MB). Memory "
            f"{memory}. Load: {kept.probed('load_s') * 1e3:.0f} ms kept quantized, "
            f"{folded.probed('load_s') * 1e3:.0f} ms folded (fp32: {baseline.probed('load_s') * 1e3:.0f} ms)."
        )
    if baseline.probed("live_runs") is not None:
        saved, taken_back = [], []
        for export in quantized:
            kept, folded = by[export.name, False], by[export.name, True]
            weights = folded.initializer_bytes - kept.initializer_bytes
            load, runs = (folded.probed(k) - kept.probed(k) for k in ("live_load", "live_runs"))
            saved.append(
                f"{export.name}: {_saving(weights)} of weights ({weights / folded.initializer_bytes:.0%}); "
                f"of memory in use, {_saving(load)} after load and {_saving(runs)} once run against folded, "
                f"{_saving(baseline.probed('live_runs') - kept.probed('live_runs'))} once run against fp32"
            )
            if kept.probed("live_runs") >= folded.probed("live_runs") > 0:
                taken_back.append(export.name)
        lines.append("- memory: keeping the weights quantized, " + "; ".join(saved) + ".")
        if taken_back:
            lines[-1] += (
                f" For {', '.join(taken_back)}, what the weights save at load the first runs take back: "
                "their expansions are fp32 tensors, allocated at every run from ORT's arena, which keeps "
                "the memory it has grown to."
            )
        if baseline.initializer_bytes < baseline.probed("live_runs") / 2:
            lines[-1] += (
                f" An fp32 session of this model has {_mb(baseline.probed('live_runs'))} MB in use once run, "
                f"of which {_mb(baseline.initializer_bytes)} MB are its weights: at this size, what a "
                "session holds besides its weights (the runtime's own allocations, the arena's buffers) is "
                "most of it, and the weights' bytes are the clearer measure."
            )
    penalty = {  # kept quantized over folded, per shape
        e.name: [by[e.name, False].median(seq) / by[e.name, True].median(seq) for seq in seqs]
        for e in quantized
    }
    faster = [(name, seq) for name, ratios in penalty.items() for seq, r in zip(seqs, ratios) if r > 1]
    everywhere = "for every recipe and shape here"
    if len(faster) == len(quantized) * len(seqs):
        lines.append(f"- speed: folding the weights at load is the faster option {everywhere}.")
        if all(p[0] >= p[-1] for p in penalty.values()):
            lines[-1] = lines[-1][:-1] + (
                "; keeping the weights quantized costs the most, relatively, at the decode-like shape, "
                "where a run does the least work besides expanding them."
            )
    elif not faster:
        lines.append(f"- speed: keeping the weights quantized is the faster option {everywhere}.")
    else:
        cases = ", ".join(f"{name} at seq {seq}" for name, seq in faster)
        lines.append(f"- speed: folding is faster only for {cases}.")
    for e in quantized:  # what a folded quantized model still costs over fp32
        folded = by[e.name, True]
        ratios = [folded.median(seq) / baseline.median(seq) for seq in seqs]
        at = f"{' and '.join(f'{r:.2f}x' for r in ratios)} fp32's time (seq {' and '.join(map(str, seqs))})"
        extra = folded.optimized_nodes - baseline.optimized_nodes
        if extra == 0:
            lines.append(
                f"- {e.name}, folded, runs at {at}, its graph in ORT as large as fp32's "
                f"({folded.optimized_nodes} nodes): once folded, it is an fp32 model."
            )
        elif max(abs(r - 1) for r in ratios) > RATIO_NOTED:
            quantizes_inputs = get_recipe(e.name).input is not None
            lines.append(
                f"- {e.name}, folded, runs at {at}: ORT's optimized graph has {extra} nodes more than "
                f"fp32's ({folded.optimized_nodes} against {baseline.optimized_nodes}), "
                + ("the fake quantization of activations, computed in arithmetic at every run, whose cost "
                   + ("grows" if ratios[-1] > ratios[0] else "does not grow") + " with the tokens."
                   if quantizes_inputs else "what qpass adds besides the weights' expansion.")
            )
        else:
            lines.append(f"- {e.name}, folded, runs at {at}, with {extra} more nodes than fp32 in ORT.")
    return lines


def warning_lines(variants: list[Variant], probes: int) -> list[str]:
    found = sorted({(w, v.fold) for v in variants for w in v.warnings})
    lines = []
    for warning, fold in found:
        having = [v for v in variants if v.fold == fold and warning in v.warnings]
        per_session = max(v.warnings[warning] for v in having) / probes
        lines.append(
            f"- ORT warned at load ({OPTIONS[fold]}; {', '.join(v.export.name for v in having)}): "
            f"`{warning}` ({per_session:.0f} per session)."
        )
    return lines or ["- ORT printed no warnings while creating or running the sessions (the probes' stderr)."]


def machine() -> str:
    import onnx
    import onnxruntime as ort
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)[1].strip()
    except (OSError, TypeError):
        pass
    return (
        f"{cpu}, {os.cpu_count()} CPUs, {sys.platform}; onnxruntime {ort.__version__}, "
        f"onnx {onnx.__version__}, torch {torch.__version__}"
    )


def progress(message: str, end: str = "\n") -> None:
    print(f"  [{time.perf_counter() - _STARTED:4.0f} s] {message}", end=end, flush=True)


def _load() -> str:
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"


# ---- main --------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    import demo

    defaults = demo.parse_args([])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=defaults.hidden, help="hidden size (a multiple of 32)")
    parser.add_argument("--layers", type=int, default=defaults.layers, help="decoder layers")
    parser.add_argument("--seq", type=int, default=defaults.seq, help="max sequence length: prefill")
    parser.add_argument("--rounds", type=int, default=60, help="round-robin turns per shape")
    parser.add_argument("--burst", type=int, default=5, help="timed runs per session and turn")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs per session and shape")
    parser.add_argument("--probes", type=int, default=3, help="load/memory processes per variant (median)")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (and torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny model, few runs: a smoke run of ~1 minute")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.seq = 64, 1, 32
        args.rounds, args.burst, args.warmup, args.probes = 5, 2, 2, 1
    if args.hidden % demo.HEAD_DIM:
        parser.error(f"--hidden must be a multiple of {demo.HEAD_DIM} (the head size)")
    if args.seq < 2:
        parser.error("--seq must be at least 2 (the prefill shape)")
    return args


def run_all(args: argparse.Namespace) -> list[str]:
    import demo
    import onnxruntime as ort
    import torch

    ort.set_default_logger_severity(3)  # the probes report ORT's warnings; here they would only clutter
    started = time.perf_counter()
    described, start_load = machine(), _load()
    print(described, flush=True)
    model = demo.build_model(demo.parse_args(["--hidden", str(args.hidden), "--layers", str(args.layers),
                                              "--seq", str(args.seq)]))
    model.config.use_cache = False
    model.eval()
    parameters = sum(p.numel() for p in model.parameters())
    model_line = (
        f"examples/demo.py's Llama (random init): {args.layers} layers, hidden {args.hidden}, vocab 256, "
        f"max {args.seq} positions, {parameters / 1e6:.2f} M parameters"
    )
    print(model_line, flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    exports, compiled = export_all(model, OUT)
    seqs = [1, args.seq]
    generator = torch.Generator().manual_seed(1)
    inputs = {seq: torch.randint(0, 256, (1, seq), generator=generator) for seq in seqs}
    check_all(exports, compiled, model, inputs)
    progress("checked")
    files = file_table(exports)
    print("\n".join(files), flush=True)

    variants = [Variant(e, fold) for e in exports for fold in OPTIONS]
    for variant in variants:
        optimized_graph(variant, args.threads, OUT)
    progress(f"load/memory probes ({args.probes} per variant)", end="")
    run_probes(variants, args.probes, args.threads, seqs)
    memory = memory_table(variants)
    print("\n".join(memory), flush=True)
    time_latency(variants, inputs, args)
    baseline = next(v for v in variants if v.export.name == BASELINE and v.fold)
    latency = latency_table(variants, seqs, baseline)
    notes = observations(exports, variants, seqs, baseline) + warning_lines(variants, args.probes)
    elapsed, end_load = time.perf_counter() - started, _load()
    print("\n".join(latency) + "\n\n" + "\n".join(notes))
    print(f"\nDone in {elapsed:.0f} s (load average {start_load} at the start, {end_load} at the end).")

    options = (
        f"--hidden {args.hidden} --layers {args.layers} --seq {args.seq} --rounds {args.rounds} "
        f"--burst {args.burst} --warmup {args.warmup} --probes {args.probes} --threads {args.threads}"
    )
    return [
        f"{described}; {args.threads} intra-op thread(s); load average {start_load} at the start, "
        f"{end_load} at the end; {elapsed:.0f} s in all.",
        f"Reproduce: `make bench` (or `python bench/onnx_cpu.py {options}`).",
        "",
        f"{model_line}. Exports: `qpass.onnx.export_fp32` (the baseline) and `qpass.export_onnx("
        "qpass.compile(copy, recipe, backend=\"aot_eager\"), dialect=\"portable\")`, traced on a "
        f"{EXPORT_BATCH} x {EXPORT_SEQ} example so that batch and sequence are both dynamic; each opened "
        "with `qpass.onnx.session(path, fold_weights=...)`: *kept quantized* (False: ORT's ConstantFolding "
        "off, the weights expanded from their codes at every run) and *folded* (True: expanded once, at "
        "load, into fp32 initializers). fp32's two rows are the same graph up to a few shape constants ORT "
        "folds; \"vs fp32\" is against fp32 folded (ORT's default). The machine is shared: absolute times "
        "are noise, the ratios are the result.",
        "",
        "### Files and accuracy",
        "",
        "vs PyTorch: `qpass.onnx.check` (ORT, kept quantized, against qpass's PyTorch output; for fp32, "
        f"ORT against the model in PyTorch), the worse of batch 1 x {seqs[0]} and 1 x {seqs[-1]}; relative: "
        f"over the largest |logit|; ok up to {MATCH_TOLERANCE:g}. PyTorch's own: how far the same PyTorch "
        "logits move when every embedding moves one ulp up (`torch.nextafter`), the yardstick for a "
        "last-bit difference upstream; an error above the tolerance but within "
        f"{WITHIN_SENSITIVITY:g}x it reads \"within sensitivity\". Kept "
        "quantized vs folded: the two sessions' logits on the same inputs. vs the fp32 export: the quantized "
        "logits against fp32's in ORT, on the same inputs (max abs; max abs over max |fp32 logit|; the "
        "fraction of positions, both shapes pooled, whose top-1 byte agrees): the quantization error, on "
        "random weights, so an indication only.",
        "",
        *files,
        "",
        "### Load time and memory",
        "",
        f"Each session created in a fresh process, one at a time, median of {args.probes} processes, the "
        "variants interleaved. RSS added by load: VmRSS (/proc/self/status) after creating the session "
        "minus before; peak: VmHWM (reset through /proc/self/clear_refs just before) minus the RSS before; "
        "in use: the same after glibc's `malloc_trim(0)` has given back the heap that is free (what the "
        "load freed, the allocator otherwise keeps: it still counts in RSS, but other allocations can "
        f"reuse it), after load and once the session has run each shape {PROBE_RUNS} times (ORT's arena "
        "included). "
        "Initializers and nodes: the graph ORT runs, saved through `optimized_model_filepath` (the "
        "session's options otherwise): the bytes it holds as constants, deterministic where RSS is not.",
        "",
        *memory,
        "",
        "### Latency",
        "",
        f"One `InferenceSession.run` of batch 1 x {seqs[0]} (decode-like: one token's forward, there is "
        f"no KV cache) and of 1 x {seqs[-1]} (prefill-like), {args.threads} intra-op thread(s); "
        f"{args.rounds * args.burst} timed runs per session and shape after {args.warmup} warm-up runs: "
        f"{args.rounds} rounds in which each of the six sessions, in a new random order every round, makes "
        f"one untimed run then {args.burst} timed ones (back to back, as in a decode loop). CPU time of the "
        "process; wall-time medians beside it.",
        "",
        *latency,
        "",
        "What this shows:",
        "",
        *notes,
        "",
    ]


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--probe":  # a child process of run_probes
        request = json.loads(sys.argv[2])
        print(json.dumps(probe(request["path"], request["fold"], request["threads"], request["seqs"])))
        return
    args = parse_args()
    import demo
    from results import write_section

    with demo.intra_op_threads(args.threads):
        section = run_all(args)
    if not (args.no_write or args.quick):  # a smoke run's numbers do not belong in RESULTS.md
        write_section("onnx-cpu", "ONNX Runtime on the CPU (bench/onnx_cpu.py)", "\n".join(section))


if __name__ == "__main__":
    main()
