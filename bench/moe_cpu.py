"""A mixture-of-experts model's training step under qpass's recipes, for each experts implementation.

Run with `make bench`, or `python bench/moe_cpu.py [--steps 5] [--warmup 2] [--implementations
grouped_mm eager] [--no-write]` (about 3 minutes on a 2-core CPU; `batched_mm` may be added to the
implementations, at some minutes more: its unquantized step gathers a weight matrix per token). A
small Mixtral (transformers' ``MixtralForCausalLM``, fp32 weights, 8 experts, top-2; SHAPE below)
runs forward and backward (the loss is the cross-entropy of the logits on the shifted ids) for each
experts implementation (``model.set_experts_implementation``: ``grouped_mm``, transformers' default,
a grouped GEMM per projection; ``eager``, a Python loop over the experts) under every variant, all
in the same run:

- unquantized: the model compiled by torch.compile alone (aot_eager);
- each qpass training recipe, compiled by ``qpass.compile`` (aot_eager); the expert sites it
  quantized (``qpass.report`` rows of an expert kind) show that the experts were quantized;
- torchao's MoE training conversion (``torchao.prototype.moe_training``: ``quantize_`` of the experts
  modules with its FP8-rowwise and MXFP8 configs), the peer, where torchao is installed (the bench
  environment). It runs without torch.compile: compiled with fp32 weights, transformers routes the
  experts through its own fallback op, which torchao's weight wrapper never sees. The calls to
  torchao's quantized GEMMs are counted to show that it quantized; a conversion that fails on the
  CPU shows its error, and one that runs but quantizes nothing is not timed.

Each variant owns a deep copy of one model. Step time is the median wall time of the timed steps
after the warm-up ones (the first compiles), the variants round-robin step by step, 2 threads; the
ratio is to the unquantized step of the same implementation (the torchao rows': to the same model
run uncompiled). Prints the table and writes it to bench/RESULTS.md between this benchmark's markers.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from results import write_section  # noqa: E402

import qpass  # noqa: E402

RECIPES = ("fp8-train", "mxfp8-train", "fp4-train")
IMPLEMENTATIONS = ("grouped_mm", "eager")  # batched_mm: --implementations grouped_mm eager batched_mm
EXPERT_KINDS = {"grouped_mm", "token_bmm", "expert_linear", "expert_matmul", "expert_bmm"}
SHAPE = dict(hidden=256, intermediate=512, layers=2, experts=8, top_k=2, heads=8, kv_heads=4, vocab=256,
             seq=128, batch=4)
UNCOMPILED = "unquantized, no torch.compile"  # the torchao rows' baseline: they run uncompiled too


def _model() -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=SHAPE["vocab"], hidden_size=SHAPE["hidden"], intermediate_size=SHAPE["intermediate"],
        num_hidden_layers=SHAPE["layers"], num_local_experts=SHAPE["experts"],
        num_experts_per_tok=SHAPE["top_k"], num_attention_heads=SHAPE["heads"],
        num_key_value_heads=SHAPE["kv_heads"], max_position_embeddings=SHAPE["seq"], use_cache=False)
    return MixtralForCausalLM(config).train()


def _error(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"


class Variant:
    """One copy of the model, prepared (compiled, quantized); its step times, or why it has none."""

    def __init__(self, name: str, base: nn.Module, implementation: str, prepare,
                 baseline: str = "unquantized"):
        self.name, self.baseline = name, baseline
        self.times: list[float] = []
        self.first: float | None = None  # the first step's time, which compiles (and finds sites)
        self.error: str | None = None
        self.experts: str = "-"  # the expert GEMMs quantized, as the row shows them
        self.counted = None  # torchao: returns the calls to its quantized GEMMs since the last call
        model = copy.deepcopy(base)  # qpass.compile works in place: each variant owns its model
        model.set_experts_implementation(implementation)
        try:
            self.model = prepare(model, self)
        except Exception as error:  # noqa: BLE001 -- the row shows it, the others go on
            self.fail(error)

    def fail(self, error: BaseException) -> None:
        self.error = f"error: {_error(error)}"
        print(f"{self.name}: {self.error}", file=sys.stderr)
        traceback.print_exc(limit=-8)

    def step(self, ids: torch.Tensor) -> None:
        logits = self.model(ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        loss.backward()

    def run(self, ids: torch.Tensor, timed: bool) -> None:
        if self.error is not None:
            return
        try:
            start = time.perf_counter()
            self.step(ids)
            elapsed = time.perf_counter() - start
        except Exception as error:  # noqa: BLE001
            self.fail(error)
            return
        finally:
            for p in self.model.parameters():
                p.grad = None
        if timed:
            self.times.append(elapsed)
        elif self.first is None:
            self.first = elapsed

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    @property
    def best(self) -> float | None:
        return min(self.times) if self.times else None


def _unquantized(model: nn.Module, variant: Variant) -> nn.Module:
    return torch.compile(model, backend="aot_eager")


def _qpass(recipe: str):
    def prepare(model: nn.Module, variant: Variant) -> nn.Module:
        return qpass.compile(model, recipe=recipe, backend="aot_eager")

    return prepare


def expert_sites(model: nn.Module) -> str:
    """The expert sites qpass quantized, of how many it found, by kind."""
    rows = [row for row in qpass.report(model).rows if row["kind"] in EXPERT_KINDS]
    quantized = [row for row in rows if row["quantized"]]
    kinds = ", ".join(sorted({row["kind"] for row in quantized}))
    return f"{len(quantized)} of {len(rows)}" + (f" ({kinds})" if kinds else "")


# ---- the peer: torchao's MoE training ----------------------------------------------------------------


def torchao_variants() -> list[tuple[str, object]]:
    """(row name, config factory) of torchao's MoE training configs, or [] without torchao."""
    try:
        import torchao
        from torchao.prototype.moe_training.config import Float8TrainingOpConfig, MXFP8TrainingOpConfig
        from torchao.quantization.quantize_.common import KernelPreference
    except ImportError:
        return []
    version = torchao.__version__
    return [
        (f"torchao {version} FP8 rowwise", Float8TrainingOpConfig),
        (f"torchao {version} MXFP8", MXFP8TrainingOpConfig),
        (f"torchao {version} MXFP8 (emulated kernels)",
         lambda: MXFP8TrainingOpConfig(kernel_preference=KernelPreference.EMULATED)),
    ]


class _TorchaoCalls:
    """Counts the calls to torchao's quantized GEMMs (what its wrapped weights' ``_grouped_mm`` and
    ``linear`` become), by wrapping them where its wrapper tensor looks them up."""

    FUNCTIONS = ("_quantize_then_scaled_grouped_mm", "_to_mxfp8_then_scaled_mm", "_to_fp8_then_scaled_mm")

    def __init__(self):
        import torchao.prototype.moe_training.tensor as tensor

        self.calls = 0
        for name in self.FUNCTIONS:
            original = getattr(tensor, name, None)
            if original is None:
                continue

            def counting(*args, _original=original, **kwargs):
                self.calls += 1
                return _original(*args, **kwargs)

            setattr(tensor, name, counting)

    def take(self) -> int:
        calls, self.calls = self.calls, 0
        return calls


@functools.cache
def _torchao_calls() -> _TorchaoCalls:
    """The run's counter: torchao's functions are wrapped once."""
    return _TorchaoCalls()


def _torchao(config_factory, counter: _TorchaoCalls):
    def prepare(model: nn.Module, variant: Variant) -> nn.Module:
        from torchao.quantization import quantize_

        quantize_(model, config_factory(), filter_fn=lambda module, fqn: fqn.endswith("mlp.experts"))
        variant.counted = counter.take
        return model

    return prepare


# ---- the run -------------------------------------------------------------------------------------


def measure(implementation: str, base: nn.Module, warmup: int, steps: int, peers: list) -> list[Variant]:
    torch._dynamo.reset()  # the variants of one implementation compile afresh
    variants = [Variant("unquantized", base, implementation, _unquantized)]
    variants += [Variant(r, base, implementation, _qpass(r)) for r in RECIPES]
    if peers:
        counter = _torchao_calls()
        # grouped_mm: every config (those that fail on the CPU show why); the loops: the one that runs.
        tried = peers if implementation == "grouped_mm" else peers[-1:]
        variants.append(Variant(UNCOMPILED, base, implementation, lambda m, v: m, baseline=UNCOMPILED))
        variants += [Variant(name, base, implementation, _torchao(factory, counter), baseline=UNCOMPILED)
                     for name, factory in tried]
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, SHAPE["vocab"], (SHAPE["batch"], SHAPE["seq"]), generator=generator)
               for _ in range(warmup + steps)]
    for variant in variants:
        for ids in batches[:warmup]:
            variant.run(ids, timed=False)
        if variant.error is not None:
            continue
        if variant.counted is not None and variant.counted() == 0:
            # Not a peer: it ran, but in high precision. Not timed.
            variant.error = ("not timed: it ran, but quantized nothing (no call to torchao's quantized "
                             f"GEMMs in {warmup} steps)")
        elif variant.name in RECIPES:
            variant.experts = expert_sites(variant.model)  # the eager loop's sites are found as it runs
    for ids in batches[warmup:]:
        for variant in variants:  # round-robin, so that a burst of outside load lands on every variant
            variant.run(ids, timed=True)
            if variant.counted is not None and variant.error is None:
                variant.experts = f"{variant.counted()} quantized GEMM calls / step"
    return variants


def _row(implementation: str, variant: Variant, by_name: dict[str, Variant]) -> str:
    first = f"{variant.first:.1f}" if variant.first is not None else "-"
    if variant.error is not None:
        return (f"| {implementation} | {variant.name} | {first} | {variant.error} | - "
                f"| {variant.experts} |")
    base = by_name[variant.baseline]
    ratio = f"{variant.median / base.median:.2f}x / {variant.best / base.best:.2f}x" if base.times else "-"
    if variant.baseline == UNCOMPILED and variant.name != UNCOMPILED:
        ratio += " (of uncompiled)"
    times = f"{variant.median * 1e3:.0f} ({variant.best * 1e3:.0f}-{max(variant.times) * 1e3:.0f})"
    return f"| {implementation} | {variant.name} | {first} | {times} | {ratio} | {variant.experts} |"


def peer_notes(measured: dict[str, dict[str, Variant]]) -> list[str]:
    """The torchao rows that ran quantized, against qpass's recipe of the same format."""
    notes = []
    for implementation, by_name in measured.items():
        for name, variant in by_name.items():
            ours = by_name.get("mxfp8-train" if "MXFP8" in name else "fp8-train")
            if not name.startswith("torchao") or variant.error is not None or ours is None or not ours.times:
                continue
            notes.append(f"- {implementation}: qpass {ours.name} (compiled) / {name} (uncompiled) step = "
                         f"{ours.median / variant.median:.2f}x.")
    return notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (the median is kept)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps per variant (the first compiles)")
    parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS),
                        choices=("grouped_mm", "eager", "batched_mm"),
                        help="transformers' experts implementations to measure")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(2)
    # Every variant compiles the same forward (and the eager loop's frames): more than Dynamo's default
    # 8 entries per frame, past which it would quietly run a variant uncompiled.
    torch._dynamo.config.recompile_limit = 64
    machine = (f"torch {torch.__version__}, {torch.get_num_threads()} threads on {os.cpu_count()} CPUs, "
               f"{platform.processor() or platform.machine()}, {sys.platform}; load average {_load()} "
               "at the start")
    print(machine, flush=True)
    peers = torchao_variants()
    started = time.perf_counter()
    base = _model()
    rows = ["| experts | variant | first step s | step ms: median (min-max) | vs unquantized: median / best "
            "| expert GEMMs quantized |", "|---|---|---|---|---|---|"]
    measured = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for implementation in args.implementations:
            variants = measure(implementation, base, args.warmup, args.steps, peers)
            measured[implementation] = by_name = {v.name: v for v in variants}
            rows += [_row(implementation, v, by_name) for v in variants]
            print("\n".join(rows[-len(variants):]), flush=True)
            for v in variants:  # every timed step, to judge the medians by
                print(f"  {implementation} {v.name}: {' '.join(f'{t * 1e3:.0f}' for t in v.times)} ms")
    if not peers:
        rows.append("| - | torchao | - | missing: torchao is not installed (the bench environment has it) "
                    "| - | - |")
    elapsed = time.perf_counter() - started
    shape = ", ".join(f"{k} {v}" for k, v in SHAPE.items())
    body = "\n".join([
        f"{machine}, {_load()} at the end; {elapsed:.0f} s.",
        "Reproduce: `make bench` (or `python bench/moe_cpu.py --steps "
        f"{args.steps} --warmup {args.warmup} --implementations {' '.join(args.implementations)}`).",
        "",
        f"Mixtral ({shape}), fp32 weights; forward and",
        f"backward (cross-entropy of the logits on the shifted ids); median wall time of {args.steps} steps",
        f"after {args.warmup} warm-up, the variants round-robin, aot_eager; the first step (which compiles)",
        "apart. The machine is shared and its speed comes and goes (for tens of seconds at a time, every",
        "step some times slower): the min-max spread says how much a row was disturbed, and the ratio of",
        "the best steps stands beside that of the medians.",
        "grouped_mm: a grouped GEMM per projection (compiled with fp32 weights, transformers'",
        "`grouped_mm_fallback` op, a loop of `torch.mm`; uncompiled, `F.grouped_mm`); eager:",
        "transformers' Python loop over the experts that have tokens. qpass quantizes each expert's",
        "GEMMs on their own (`qpass::grouped_matmul` for grouped_mm); the last column counts the",
        "expert sites of `qpass.report` it quantized, of those it found, or the calls to torchao's",
        "quantized GEMMs in a timed step. The torchao rows run uncompiled: their ratio is to",
        f"\"{UNCOMPILED}\".",
        "",
        *rows,
        "",
        *peer_notes(measured),
        "",
    ])
    print(body)
    if not args.no_write:
        write_section("moe_cpu", "Mixture of experts on the CPU (bench/moe_cpu.py)", body)


def _load() -> str:
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"


if __name__ == "__main__":
    main()
