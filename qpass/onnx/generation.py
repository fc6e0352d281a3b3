"""ONNX for generation: a Hugging Face causal LM's decoder with its KV cache as inputs and outputs.

The layout is ONNX Runtime GenAI's and Optimum's. Inputs: ``input_ids`` (batch, sequence),
``attention_mask`` (batch, past + sequence), ``position_ids`` (batch, sequence) and, per layer i,
``past_key_values.{i}.key`` / ``.value`` (batch, kv heads, past, head dim). Outputs: ``logits`` and
``present.{i}.key`` / ``.value`` (past + sequence long). Batch, sequence and past length are dynamic,
past length 0 included: one file does the prompt and every next token.

:func:`qpass.onnx.generate` is the greedy loop over such a file in ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from dataclasses import dataclass

import onnx_ir as ir
import torch
from torch import nn

from qpass.capture import uncompiled

INPUTS = ("input_ids", "attention_mask", "position_ids")


def is_cached_decoder(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face decoder-only LM that generates with a KV cache as
    configured (``config.use_cache``)."""
    config = getattr(model, "config", None)
    can_generate = getattr(model, "can_generate", None)
    return (
        config is not None and callable(can_generate) and can_generate()
        and not getattr(config, "is_encoder_decoder", False) and bool(getattr(config, "use_cache", False))
    )


def position_ids(attention_mask: torch.Tensor, length: int) -> torch.Tensor:
    """The positions of the last ``length`` tokens, counting only the unmasked ones (left padding),
    as Hugging Face's ``generate`` computes them."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)[:, -length:].clone()  # not a view: see cache_layout


@dataclass(frozen=True)
class CacheLayout:
    """The example the decoder is exported with, ``(input_ids, attention_mask, position_ids, *past)``
    with ``past`` each layer's key and value, and the names of the file's inputs and outputs."""

    args: tuple
    input_names: list[str]
    output_names: list[str]

    @property
    def dynamic_shapes(self) -> tuple[dict, ...]:
        """Batch, sequence, past and total (past + sequence) length dynamic; heads and head size static."""
        dynamic = torch.export.Dim.DYNAMIC
        tokens = {0: dynamic, 1: dynamic}
        return (tokens, tokens, tokens, *[{0: dynamic, 2: dynamic}] * (len(self.args) - len(INPUTS)))


def cache_layout(model: nn.Module, input_ids: torch.Tensor) -> CacheLayout:
    """The example: ``input_ids`` as the next tokens after a past of the same length, whose keys
    and values are the model's own (run once, eagerly, for their shapes and dtypes)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.dtype != torch.long:
        raise ValueError(
            "exporting a decoder with its KV cache takes (input_ids,): one long tensor (batch, sequence)")
    with uncompiled(model), torch.no_grad():
        cache = _returned_cache(model(input_ids=input_ids, use_cache=True))
    past = [tensor for layer in _layers(cache) for tensor in (layer.keys, layer.values)]
    mask = torch.ones(input_ids.shape[0], 2 * input_ids.shape[1], dtype=torch.long)
    names = [f"{i}.{part}" for i in range(len(past) // 2) for part in ("key", "value")]
    return CacheLayout(
        (input_ids, mask, position_ids(mask, input_ids.shape[1]), *past),
        [*INPUTS, *(f"past_key_values.{name}" for name in names)],
        ["logits", *(f"present.{name}" for name in names)],
    )


_DIM_NAMES = {
    ("input_ids", 0): "batch", ("input_ids", 1): "sequence", ("position_ids", 0): "batch",
    ("position_ids", 1): "sequence", ("attention_mask", 0): "batch", ("attention_mask", 1): "total_sequence",
    ("past", 0): "batch", ("past", 2): "past_sequence",
}


def name_dims(model: ir.Model) -> None:
    """The dynamic dims of a decoder's inputs and outputs by name (batch, sequence, past_sequence,
    total_sequence) instead of torch.export's symbols, which may differ for dims that the model never
    relates (the mask's batch and the tokens'); ``present``'s length reads ``past_sequence + sequence``."""
    names = {}
    for value in model.graph.inputs:
        role = "past" if value.name.startswith("past_key_values.") else value.name
        for axis, dim in enumerate(value.shape):
            if isinstance(dim, ir.SymbolicDim) and (role, axis) in _DIM_NAMES:
                names.setdefault(dim.value, _DIM_NAMES[role, axis])
    symbol = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b" if names else "$^")
    for value in [*model.graph.inputs, *model.graph.outputs]:
        value.shape = ir.Shape([
            symbol.sub(lambda m: names[m.group()], dim.value) if isinstance(dim, ir.SymbolicDim) else dim
            for dim in value.shape
        ])


def _layers(cache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None or any(getattr(layer, "is_sliding", False) or not hasattr(layer, "keys")
                             for layer in layers):
        raise ValueError(
            "exporting with a KV cache supports a DynamicCache of full-attention layers, not "
            f"{type(cache).__name__} (sliding-window or other layers); export with use_cache=False"
        )
    return layers


def is_cache_export(input_names: list[str]) -> bool:
    """Whether a file with these inputs is a decoder exported with its KV cache."""
    fixed, past = input_names[: len(INPUTS)], input_names[len(INPUTS):]
    return fixed == list(INPUTS) and all(name.startswith("past_key_values.") for name in past)


def call_with_cache(forward, config, input_ids, attention_mask, position_ids, *past) -> tuple:
    """``forward`` (a causal LM's) on the inputs of :class:`CacheLayout` (``past``: each layer's key
    and value in turn): the logits and each layer's present key and value."""
    from transformers import DynamicCache

    cache = DynamicCache(list(zip(past[0::2], past[1::2])), config=config)
    out = forward(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
        **{_cache_argument(forward): cache},
    )
    return (out.logits, *[t for layer in _layers(_returned_cache(out)) for t in (layer.keys, layer.values)])


# transformers 5.2x renamed past_key_values to cache (the old name still works, with a warning).


def _cache_argument(forward) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _returned_cache(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


@contextlib.contextmanager
def flat_forward(model: nn.Module, layout: CacheLayout):
    """``model``'s forward, for the time of an export, as :func:`call_with_cache`. The forward is
    swapped on the model itself, not wrapped, so that its modules keep their paths (and the sites
    their names); its signature names each input, since torch.export would nest a ``*past``."""
    original = model.forward

    def forward(*tensors):
        return call_with_cache(original, model.config, *tensors)

    forward.__signature__ = inspect.Signature([
        inspect.Parameter(name.replace(".", "_"), inspect.Parameter.POSITIONAL_OR_KEYWORD)
        for name in layout.input_names
    ])
    model.forward = forward
    try:
        yield model
    finally:
        del model.forward


@contextlib.contextmanager
def without_cache(model: nn.Module):
    """``model`` as configured, but returning no cache (``use_cache=False``), for the time of an export."""
    config = getattr(model, "config", None)
    saved = getattr(config, "use_cache", None)
    if saved:
        config.use_cache = False
    try:
        yield model
    finally:
        if saved:
            config.use_cache = saved
