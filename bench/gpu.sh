#!/usr/bin/env bash
# qpass's GPU benchmark in one command: `bash bench/gpu.sh` (from anywhere; under 8 minutes on an
# H100/H200, setup included, unless CUDA torch must first be downloaded).
#
# 1. Finds a Python whose torch sees the GPU: $PYTHON, python3, .venv-bench, .venv. If none does, it
#    installs the torch wheels carried in .whl/ (a machine with no network), else builds .venv-bench
#    with CUDA torch through `make` (TORCH_SPEC below) where download.pytorch.org answers, else stops
#    with a message. Other wheels in .whl/ (torchao, transformers, ...) are installed in any case, to
#    a folder of their own put on PYTHONPATH; qpass itself is used from this checkout (PYTHONPATH).
# 2. Runs bench/kernels_gpu.py: correctness of the kernels and scaled GEMMs, then quantize bandwidth,
#    weight-only and scaled GEMMs, training linear layers and a small Llama's training step against
#    bf16 and torchao, writing bench/RESULTS.md. The time left of the 8 minutes is its deadline.
#
# Options: --dry-run (no GPU needed: every measurement once on the CPU at tiny shapes, in Triton's
# interpreter; figures read "missing"), --no-write (leave bench/RESULTS.md alone), -h.
# Environment: PYTHON (the interpreter to try first), QPASS_BENCH_LIMIT_S (the whole run's limit,
# default 480), QPASS_WHEELS (the carried wheels, default .whl), QPASS_SITE (where they go).
set -uo pipefail

START=$SECONDS
LIMIT_S=${QPASS_BENCH_LIMIT_S:-480}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEELS=${QPASS_WHEELS:-$REPO/.whl}
SITE=${QPASS_SITE:-${TMPDIR:-/tmp}/qpass-bench-site}
TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
EXCLUDED_S=0  # time spent downloading CUDA torch: a one-time cost, not counted against the limit

DRY_RUN=0
BENCH_ARGS=()
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1; BENCH_ARGS+=(--dry-run) ;;
        --no-write) BENCH_ARGS+=(--no-write) ;;
        -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu.sh: unknown option $arg (try --help)" >&2; exit 2 ;;
    esac
done
cd "$REPO" || exit 1
# qpass from this checkout, first on the path: no install step, nothing to build offline.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

say() { echo "gpu.sh: $*" >&2; }

has_gpu() {
    [ "$DRY_RUN" = 0 ] && { [ -e /dev/nvidia0 ] || nvidia-smi -L >/dev/null 2>&1; }
}

# Whether python "$1" can run the snippet "$2" (quietly: torchao and friends print on import).
runs() { "$1" -c "$2" >/dev/null 2>&1; }
CUDA_TORCH='import torch, sys; sys.exit(not torch.cuda.is_available())'
CPU_TORCH='import torch, triton'  # the dry run and the no-GPU run need the interpreter too

candidates() {
    [ -n "${PYTHON:-}" ] && echo "$PYTHON"
    command -v python3
    for venv in .venv-bench .venv; do [ -x "$REPO/$venv/bin/python" ] && echo "$REPO/$venv/bin/python"; done
}

first_python() {  # the first candidate that runs snippet "$1"
    local py
    while read -r py; do
        [ -n "$py" ] && runs "$py" "$1" && { echo "$py"; return 0; }
    done < <(candidates)
    return 1
}

# Install the carried wheels into $SITE. "$1" = 1: the torch stack too (torch, triton, nvidia-*),
# which would otherwise shadow a working CUDA torch. All at once first; if pip refuses the set (a
# wheel for another Python, say), one at a time, so the others still install.
install_wheels() {
    local py=$1 with_torch=$2 wheel name
    local -a chosen=()
    [ -d "$WHEELS" ] || return 0
    for wheel in "$WHEELS"/*.whl; do
        [ -e "$wheel" ] || continue
        name=$(basename "$wheel" | tr '[:upper:]' '[:lower:]')
        case "$name" in
            torch-*|triton-*|nvidia_*|nvidia-*|cuda_*|cuda-*) [ "$with_torch" = 1 ] || continue ;;
        esac
        chosen+=("$wheel")
    done
    [ ${#chosen[@]} -gt 0 ] || return 0
    say "installing ${#chosen[@]} carried wheel(s) from $WHEELS into $SITE"
    local pip=("$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE")
    if ! "${pip[@]}" "${chosen[@]}" >/dev/null 2>&1; then
        for wheel in "${chosen[@]}"; do
            "${pip[@]}" "$wheel" >/dev/null 2>&1 || say "skipped $(basename "$wheel"): pip would not install it here"
        done
    fi
    export PYTHONPATH="$REPO:$SITE${PYTHONPATH#"$REPO"}"
}

network() {  # whether the CUDA torch index answers within a few seconds
    runs "$1" 'import urllib.request; urllib.request.urlopen("https://download.pytorch.org/whl/cu128/", timeout=5)'
}

# A python with CUDA torch on a GPU machine, or one with CPU torch for the dry and no-GPU runs.
setup_python() {
    local py
    if ! has_gpu; then
        py=$(first_python "$CPU_TORCH") || py=$(first_python 'import torch') || {
            say "no Python here has torch: run 'make bench' (or set PYTHON) first"; return 1; }
        [ "$DRY_RUN" = 1 ] || say "no GPU found: the figures will read missing (use --dry-run to try every code path)"
        install_wheels "$py" 0
        echo "$py"; return 0
    fi
    if py=$(first_python "$CUDA_TORCH"); then
        install_wheels "$py" 0
        echo "$py"; return 0
    fi
    py=$(first_python 'import sys') || { say "no python3 found"; return 1; }
    if ls "$WHEELS"/torch-*.whl >/dev/null 2>&1; then
        install_wheels "$py" 1
        runs "$py" "$CUDA_TORCH" && { echo "$py"; return 0; }
        say "the torch carried in $WHEELS does not see the GPU either"
    fi
    if network "$py"; then
        say "no CUDA torch here: building .venv-bench with $TORCH_SPEC (not counted in the time limit)"
        local before=$SECONDS
        make -C "$REPO" .venv-bench/.installed PYTHON="$py" TORCH_SPEC="$TORCH_SPEC" >&2 || {
            say "make failed"; return 1; }
        EXCLUDED_S=$((SECONDS - before))
        py="$REPO/.venv-bench/bin/python"
        install_wheels "$py" 0
        runs "$py" "$CUDA_TORCH" && { echo "$py"; return 0; }
        say ".venv-bench's torch does not see the GPU"
        return 1
    fi
    say "a GPU is here but no CUDA torch, no torch wheels in $WHEELS and no network: carry CUDA torch"
    say "wheels in .whl/ (see /work/.library/device/README.md) or run where download.pytorch.org answers"
    return 1
}

# setup_python runs in a subshell ($(...)): what it exports is read back through this file.
ENV_FILE=$(mktemp)
trap 'rm -f "$ENV_FILE"' EXIT
PY=$( (setup_python && { echo "$PYTHONPATH"; echo "$EXCLUDED_S"; } >"$ENV_FILE") ) || exit 1
{ read -r PYTHONPATH; read -r EXCLUDED_S; } <"$ENV_FILE"
export PYTHONPATH
say "python: $PY ($("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)' 2>/dev/null))"

# MoE row: qpass's expert grouped GEMM (a qpass-compiled `torch._grouped_mm` of a 3-D weight becomes
# torch.ops.qpass.grouped_matmul) against bf16 torch._grouped_mm at E 8, 8192 tokens, K 4096, N 3584,
# forward and forward + backward; written to bench/RESULTS.md (section moe-gpu) unless --no-write.
# Guarded: only on a GPU (--dry-run: once on the CPU at tiny shapes, no figures), at most 90 s taken
# from the limit before the kernels' deadline is set; a variant that fails shows its error in its cell.
if has_gpu || [ "$DRY_RUN" = 1 ]; then
    MOE_WRITE=1
    for arg in "${BENCH_ARGS[@]}"; do [ "$arg" = --no-write ] && MOE_WRITE=0; done
    QPASS_MOE_DRY=$DRY_RUN QPASS_MOE_WRITE=$MOE_WRITE timeout -k 5 90 "$PY" - <<'EOF' || say "the MoE grouped GEMM row stopped (status $?)"
import os
import sys
import warnings

import torch

sys.path.insert(0, "bench")
from kernels_gpu import steps_ms
from results import write_section

import qpass

DRY = os.environ.get("QPASS_MOE_DRY") == "1"  # once on the CPU at tiny shapes: tries the code, no figures
DEVICE = "cpu" if DRY else "cuda"
E, S, K, N = (2, 64, 64, 32) if DRY else (8, 8192, 4096, 3584)  # Mixtral-like up projection, N = 14336 / 4
RECIPES = ("fp8-train", "mxfp8-train")
warnings.simplefilter("ignore")


class Experts(torch.nn.Module):
    """``torch._grouped_mm(x, W.mT, offs)`` of a 3-D weight ``W [E, N, K]``, as transformers' experts
    run it."""

    def __init__(self, weight):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone())

    def forward(self, x, offs):
        return torch._grouped_mm(x, self.weight.mT, offs=offs)


def ms(fn):
    """CUDA-event median of ``fn`` (kernels_gpu's timer of whole steps); in a dry run, one call, no figure."""
    if DRY:
        fn()
        return None
    return steps_ms(fn)


def cells(model, x, offs, grad):
    def forward():  # the training forward: what the step's forward runs
        model(x, offs)

    def train():
        model.weight.grad = x.grad = None
        model(x, offs).backward(grad)

    return ms(forward), ms(train)


torch.manual_seed(0)
x = torch.randn(S, K, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
weight = torch.randn(E, N, K, device=DEVICE, dtype=torch.bfloat16) / K**0.5
grad = torch.randn(S, N, device=DEVICE, dtype=torch.bfloat16)
offs = torch.arange(1, E + 1, device=DEVICE, dtype=torch.int32) * (S // E)  # tokens spread evenly
bf16 = Experts(weight)
reference = bf16(x, offs).detach().float()
results = {"bf16 torch._grouped_mm": cells(bf16, x, offs, grad)}
notes = []
for recipe in RECIPES:
    name = f"qpass {recipe}"
    try:
        model = qpass.compile(Experts(weight), recipe, backend="aot_eager")
        y = model(x, offs).detach().float()
        sites = [r for r in qpass.report(model).rows if r["kind"] == "grouped_mm" and r["quantized"]]
        error = ((y - reference).norm() / reference.norm()).item()
        notes.append(f"{name}: {len(sites)} grouped_mm site quantized, output {error:.4f} from bf16's "
                     "(relative error)")
        results[name] = cells(model, x, offs, grad)
    except Exception as e:  # noqa: BLE001 -- the row shows it, the others go on
        results[name] = f"error: {type(e).__name__}: {' '.join(str(e).split())[:150]}"

base = results["bf16 torch._grouped_mm"]


def cell(name, i):
    value = results[name]
    if isinstance(value, str):
        return value
    if value[i] is None:
        return "dry run: ran once on the CPU"
    speedup = "" if name.startswith("bf16") else f" ({base[i] / value[i]:.2f}x bf16)"
    return f"{value[i]:.3f}{speedup}"


names = list(results)
rows = ["| grouped GEMM | " + " | ".join(f"{n} ms" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
rows += [f"| {what} | " + " | ".join(cell(n, i) for n in names) + " |"
         for i, what in enumerate(("forward", "forward + backward"))]
machine = (f"{torch.cuda.get_device_name() if not DRY else 'CPU (dry run)'}, torch {torch.__version__}; "
           f"E {E} experts, {S} tokens spread evenly, K {K}, N {N}, bf16")
body = "\n".join([
    f"{machine}.",
    "Reproduce: `bash bench/gpu.sh`. A 3-D weight's `torch._grouped_mm(x, W.mT, offs)` in bf16, against",
    "the same module under `qpass.compile(..., backend=\"aot_eager\")`, whose site becomes",
    "`torch.ops.qpass.grouped_matmul` (a scaled GEMM per expert). Median of 10 CUDA-event timings.",
    "",
    *rows,
    "",
    *(f"- {note}." for note in notes),
    "",
])
print(body)
if not DRY and os.environ.get("QPASS_MOE_WRITE", "1") == "1":
    write_section("moe-gpu", "Expert grouped GEMM on the GPU (bench/gpu.sh)", body)
EOF
else
    say "no GPU: the MoE grouped GEMM row is skipped (--dry-run tries it on the CPU)"
fi

# What is left of the limit is the benchmark's: its own deadline, 20 s short of the limit, leaves
# time to write the results; `timeout` stops it at the limit should a measurement not let go.
LEFT=$((LIMIT_S + EXCLUDED_S - (SECONDS - START)))
if [ "$LEFT" -le 30 ]; then
    say "setup took all but ${LEFT} s of the ${LIMIT_S} s limit: nothing measured"; exit 1
fi
DEADLINE=$(( $(date +%s) + LEFT - 20 ))
timeout -k 5 "$LEFT" "$PY" bench/kernels_gpu.py --deadline "$DEADLINE" "${BENCH_ARGS[@]}"
STATUS=$?
case $STATUS in
    124|137) say "stopped at the ${LIMIT_S} s limit; bench/RESULTS.md holds the parts that finished" ;;
    0) ;;
    *) say "bench/kernels_gpu.py exited with $STATUS" ;;
esac
say "$((SECONDS - START)) s in all"
exit $STATUS
