"""The `qpass` command line: `formats` (a row per named format, with bits and QSNR that make sense),
`quantize` and `export`."""

import math
import subprocess
import sys

import onnx
import pytest
import torch

from qpass.cli import format_table, main
from qpass.formats import NAMED_FORMATS


@pytest.fixture(scope="module")
def table():
    return {
        name: (bits, q_normal, q_heavy) for name, bits, q_normal, q_heavy in format_table(rows=8, cols=1024)
    }


def test_every_named_format_has_a_row(table):
    assert list(table) == list(NAMED_FORMATS)


def test_bits_per_element_count_the_scales(table):
    # absmax per tensor: one fp32 per 8192 elements; MX: 8 bits per 32; NVFP4: 8 per 16 plus an fp32.
    assert table["fp8_e4m3"][0] == pytest.approx(8 + 32 / 8192)
    assert table["mxfp4"][0] == 4.25
    assert table["mxfp6_e3m2"][0] == 6.25
    assert table["mxint8"][0] == 8.25
    assert table["nvfp4"][0] == pytest.approx(4.5 + 32 / 8192)


def test_qsnr_orders_formats_by_precision(table):
    # 3 mantissa bits beat 2 beat 1 on Gaussian data: roughly 6 dB per bit.
    assert table["mxfp8_e4m3"][1] > table["mxfp8_e5m2"][1] + 4 > table["mxfp4"][1] + 8
    # Per-block scales survive heavy tails; a per-tensor fp4 scale does not.
    assert table["mxfp4"][2] > table["fp4_e2m1"][2] + 6
    assert all(math.isfinite(v) for row in table.values() for v in row)


def test_main_prints_table(capsys):
    main(["formats", "--rows", "4", "--cols", "256"])
    out = capsys.readouterr().out
    assert all(f"\n{name} " in out for name in NAMED_FORMATS)


def test_module_entry_point_rejects_unknown_command():
    result = subprocess.run([sys.executable, "-m", "qpass", "nope"], capture_output=True, text=True)
    assert result.returncode != 0 and "formats" in result.stderr


# ---- qpass export --------------------------------------------------------------------------------


FACTORY = '''
import torch
from torch import nn

def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)), (torch.randn(2, 8, 64),)

def bare():
    return nn.Linear(64, 64)
'''


def test_export_writes_and_checks_a_model_from_a_factory(tmp_path, capsys):
    factory = tmp_path / "factory.py"
    factory.write_text(FACTORY)
    main(["export", f"{factory}:mlp", "--recipe", "mxfp4-weight-only", "-o", str(tmp_path / "mlp.onnx"),
          "--check"])
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'mlp.onnx'}" in out and "portable dialect, recipe mxfp4-weight-only" in out
    assert "onnx.checker passed" in out and "max relative error" in out


def test_export_of_a_hugging_face_directory(tmp_path, capsys):
    import transformers

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    main(["export", str(tmp_path / "llama"), "--recipe", "fp8-infer", "--dialect", "qdq",
          "-o", str(tmp_path / "l.onnx"), "--input-shape", "2x8"])
    assert "qdq dialect, recipe fp8-infer" in capsys.readouterr().out
    # As configured (use_cache on): the decoder with its KV cache, for generation.
    names = [i.name for i in onnx.load(str(tmp_path / "l.onnx")).graph.input]
    assert names == [
        "input_ids", "attention_mask", "position_ids", "past_key_values.0.key", "past_key_values.0.value"]


def test_export_explains_what_it_cannot_load(tmp_path):
    factory = tmp_path / "factory.py"
    factory.write_text(FACTORY)
    with pytest.raises(SystemExit, match="give --input-shape"):
        main(["export", f"{factory}:bare", "--recipe", "fp8-infer", "-o", str(tmp_path / "x.onnx")])
    with pytest.raises(SystemExit, match="neither a Hugging Face model directory nor module:function"):
        main(["export", str(tmp_path), "--recipe", "fp8-infer", "-o", str(tmp_path / "x.onnx")])


def tiny_hugging_face_directory(path) -> None:
    """A tiny Llama with a word-level tokenizer of its own (nothing downloaded)."""
    import tokenizers
    import transformers

    words = sorted(set("qpass finds every matmul of the model and quantizes it in low precision".split()))
    vocab = {"<unk>": 0, **{word: i + 1 for i, word in enumerate(words)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(path)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2)).save_pretrained(path)


def test_quantize_calibrates_and_writes_a_checkpoint_that_loads(tmp_path, capsys):
    import qpass
    from qpass.stored import StoredWeight

    tiny_hugging_face_directory(tmp_path / "model")
    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(["qpass finds every matmul of the model"] * 40))
    main(["quantize", str(tmp_path / "model"), "--recipe", "nvfp4-infer", "-o", str(tmp_path / "out"),
          "--calibrate", "4", "--seq-len", "32", "--calibration-text", str(text)])
    out, err = capsys.readouterr()
    assert "[4/4 ############] writing" in err and "gptq: weight replaced" in out
    loaded = qpass.from_pretrained(tmp_path / "out")
    assert isinstance(loaded.model.layers[0].mlp.down_proj.weight, StoredWeight)
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    with pytest.raises(SystemExit, match="fewer than --calibrate 99 windows"):
        main(["quantize", str(tmp_path / "model"), "--recipe", "nvfp4-infer", "-o", str(tmp_path / "x"),
              "--calibrate", "99", "--calibration-text", str(text)])
