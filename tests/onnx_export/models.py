"""The models the ONNX export is tested on: a tiny MLP, a hand-written attention block, and Hugging
Face Llama, GPT-2 and BERT built from configs (random weights, nothing downloaded).

They are wide enough (hidden 256) that the weights, not the graph's nodes, make up most of a file:
the size bound of the tests is about the weights.
"""

from __future__ import annotations

import math

import torch
import transformers
from torch import nn

HIDDEN, VOCAB, LAYERS, HEADS, POSITIONS = 256, 512, 1, 4, 64  # one layer: exports take a few seconds


class MLP(nn.Module):
    def __init__(self, hidden: int = HIDDEN):
        super().__init__()
        self.up = nn.Linear(hidden, 4 * hidden)
        self.down = nn.Linear(4 * hidden, hidden)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


class AttentionBlock(nn.Module):
    """Pre-norm causal self-attention written by hand, softmax(Q·Kᵀ/√d)·V, then an MLP."""

    def __init__(self, hidden: int = HIDDEN, heads: int = HEADS):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.mlp = MLP(hidden)

    def forward(self, x):
        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).tril()
        attention = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ v
        x = x + self.out(attention.transpose(1, 2).flatten(-2))
        return x + self.mlp(self.norm2(x))


def llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS // 2, max_position_embeddings=POSITIONS,
        use_cache=False, attn_implementation="sdpa",
    )
    return transformers.LlamaForCausalLM(config)


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=POSITIONS, use_cache=False,
        attn_implementation="eager",
    )
    return transformers.GPT2LMHeadModel(config)


def bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=2 * HIDDEN, max_position_embeddings=POSITIONS, attn_implementation="sdpa",
    )
    return transformers.BertForMaskedLM(config)


MODELS = {"mlp": MLP, "attention": AttentionBlock, "llama": llama, "gpt2": gpt2, "bert": bert}


def make(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]().eval()


def inputs(name: str, batch: int, seq: int, seed: int = 0) -> tuple[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    if name in ("mlp", "attention"):
        return (torch.randn(batch, seq, HIDDEN, generator=generator),)
    return (torch.randint(0, VOCAB, (batch, seq), generator=generator),)
