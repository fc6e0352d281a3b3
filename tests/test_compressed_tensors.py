"""The compressed-tensors export (qpass.save_pretrained(format="compressed-tensors"), SPEC section 11):
compressed-tensors' own decompressor and transformers give back qpass's dequantized weights bit for
bit, the loaded model's outputs agree with qpass's as far as the format's input quantization allows,
what the format cannot express is refused with its reason, and the directory is the size its bits say."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import transformers
from compressed_tensors.compressors import BaseCompressor
from safetensors.torch import load_file
from torch import nn

import qpass
from qpass.checkpoint import weight_quantizations
from qpass.compressed_tensors import WEIGHTS_FILE
from qpass.formats import dequantize

VOCAB = 128
TOKENS = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
BF16, FP32 = torch.bfloat16, torch.float32

# recipe, overrides, model dtype: every built-in inference scheme the format can express. The MX
# and NVFP4 weights come back from compressed-tensors in bfloat16 only; mxfp8-infer's default block
# rotation is not the format's, so it is exported plain.
EXPORTS = {
    "fp8-infer/fp32": ("fp8-infer", {}, FP32),
    "fp8-infer/bf16": ("fp8-infer", {}, BF16),
    "mxfp8-infer": ("mxfp8-infer", {"hadamard": None}, BF16),
    "mxfp6-infer": ("mxfp6-infer", {}, BF16),
    "nvfp4-infer": ("nvfp4-infer", {}, BF16),
    "mxfp4-weight-only": ("mxfp4-weight-only", {}, BF16),
}


def llama(dtype: torch.dtype = BF16, hidden: int = 64, intermediate: int = 128, layers: int = 2,
          heads: int = 4, **config) -> nn.Module:
    # Built as from_pretrained builds it (_from_config in the dtype): rotary frequencies stay in fp32,
    # where model.to(bfloat16) would round them and the loaded model would differ for that reason.
    return transformers.LlamaForCausalLM._from_config(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=2, **config), dtype=dtype)


def qwen2(dtype: torch.dtype = BF16) -> nn.Module:
    return transformers.Qwen2ForCausalLM._from_config(transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2), dtype=dtype)


def gpt2(dtype: torch.dtype = BF16) -> nn.Module:
    return transformers.GPT2LMHeadModel._from_config(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=4, n_positions=64), dtype=dtype)


MODELS = {"llama": llama, "qwen2": qwen2}


def compiled(model: nn.Module, recipe: str, **overrides) -> nn.Module:
    qm = qpass.compile(model.eval(), recipe, backend="aot_eager", **overrides)
    logits(qm)
    return qm


def exported(make, recipe: str, overrides: dict, dtype: torch.dtype, path) -> nn.Module:
    torch.manual_seed(0)
    qm = compiled(make(dtype), recipe, **overrides)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "compressed-tensors quantizes NVFP4 inputs")
        qpass.save_pretrained(qm, path, format="compressed-tensors")
    return qm


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def loaded(path, dequantize: bool = False) -> nn.Module:
    """transformers' loading: by default compressed-tensors decompresses the weights at the first call
    and quantizes inputs as the scheme says; dequantize=True decompresses at load into a dense model."""
    options = {}
    if dequantize:
        options["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    with warnings.catch_warnings():  # that the directory's config wins; dequantize=True still applies
        warnings.filterwarnings("ignore", "You passed `quantization_config`")
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **options)
    logits(model)  # the decompression happens on the first call
    return model


def expected_weights(qm: nn.Module) -> dict[str, torch.Tensor]:
    """qpass's dequantized weight of every stored site: what the export must give back."""
    stored, _ = weight_quantizations(qm)
    return {name: dequantize(w.quantize(qm.get_parameter(name))) for name, w in stored.items()}


def decompressed(path) -> dict[str, torch.Tensor]:
    """Each quantized weight of the directory as compressed-tensors' own decompressor gives it back
    from the file's tensors, with the scheme config.json names for its module."""
    config = transformers.CompressedTensorsConfig.from_dict(
        json.loads((path / "config.json").read_text())["quantization_config"]).quantization_config
    tensors = load_file(path / WEIGHTS_FILE)
    weights = {}
    for key in tensors:
        if not key.endswith(".weight_scale"):
            continue
        module = key.removesuffix(".weight_scale")
        (scheme,) = [group for group in config.config_groups.values()
                     if group.targets == ["Linear"] or module in group.targets]
        local = {name.removeprefix(module + "."): value for name, value in tensors.items()
                 if name.rpartition(".")[0] == module}
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        weights[f"{module}.weight"] = compressor.decompress(local, scheme)["weight"]
    return weights


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns: negative zeros and NaN payloads count (torch.equal says -0.0 == 0.0)."""
    integer = {4: torch.int32, 2: torch.int16}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(integer), b.view(integer))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---- weights ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", MODELS)
@pytest.mark.parametrize("case", EXPORTS)
def test_compressed_tensors_gives_back_qpass_weights_bit_for_bit(case, architecture, tmp_path):
    recipe, overrides, dtype = EXPORTS[case]
    qm = exported(MODELS[architecture], recipe, overrides, dtype, tmp_path)
    expected = expected_weights(qm)
    by_package = decompressed(tmp_path)
    assert by_package.keys() == expected.keys()
    for name, weight in expected.items():
        assert same_bits(by_package[name].to(dtype), weight), name
    state = loaded(tmp_path, dequantize=True).state_dict()
    assert all(same_bits(state[name], weight) for name, weight in expected.items())


@pytest.mark.parametrize("case", [case for case in EXPORTS if case != "fp8-infer/bf16"])
def test_transformers_default_loading_gives_back_the_same_weights(case, tmp_path):
    qm = exported(llama, *EXPORTS[case], tmp_path)
    state = loaded(tmp_path).state_dict()
    assert all(same_bits(state[name], weight) for name, weight in expected_weights(qm).items())


def test_transformers_default_loading_rounds_fp8_scales_to_a_bf16_model_dtype(tmp_path):
    """Known, and why fp8-infer/bf16 is left out above: compressed-tensors allocates a loaded layer's
    weight_scale in the model's dtype, so the file's fp32 per-channel scales reach a bfloat16 model
    rounded (vLLM keeps them in fp32; dequantize=True decompresses from the file's fp32)."""
    exported(llama, "fp8-infer", {}, BF16, tmp_path)
    assert load_file(tmp_path / WEIGHTS_FILE)["model.layers.0.mlp.up_proj.weight_scale"].dtype == FP32
    assert loaded(tmp_path).get_parameter("model.layers.0.mlp.up_proj.weight_scale").dtype == BF16


def adversarial(rows: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows that stress every encoding: zeros of both signs, values that round to negative zero,
    fp32 subnormals, the ends of the range, a row spanning 40 binades, grid ties, random magnitudes."""
    g = torch.Generator().manual_seed(1)
    special = [torch.zeros(k), -torch.zeros(k), torch.full((k,), -1e-30), torch.randn(k, generator=g) * 1e-39,
               torch.randn(k, generator=g).clamp(-3, 3) * 1e38,
               torch.cat([torch.full((k // 2,), 1e-20), torch.full((k // 2,), -1e20)]),
               torch.linspace(-7.5, 7.5, k) * 1.25, (torch.arange(k) % 16 - 8).float() * 0.25]
    scales = 10 ** torch.empty(rows - len(special), 1).uniform_(-6, 3, generator=g)
    random = torch.randn(rows - len(special), k, generator=g) * scales
    return torch.cat([torch.stack(special), random]).to(dtype)


@pytest.mark.parametrize("case", EXPORTS)
def test_adversarial_weights_round_trip_bit_for_bit(case, tmp_path):
    recipe, overrides, dtype = EXPORTS[case]
    torch.manual_seed(0)
    model = llama(dtype, layers=1)
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            weight = model.get_parameter(f"model.layers.0.mlp.{name}.weight")
            weight.copy_(adversarial(*weight.shape, dtype))
    qm = compiled(model, recipe, **overrides)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "compressed-tensors quantizes NVFP4 inputs")
        qpass.save_pretrained(qm, tmp_path, format="compressed-tensors")
    by_package = decompressed(tmp_path)
    for name, weight in expected_weights(qm).items():
        assert same_bits(by_package[name].to(dtype), weight), name


@pytest.mark.parametrize("quantizer", [dict(format="nvfp4", scale_mode="4over6"),
                                       dict(format="nvfp4", granularity=("tile", 16)),
                                       dict(format="fp8_e4m3", granularity=("block", 32)),
                                       dict(format="fp8_e4m3")])
def test_other_weight_quantizers_the_format_expresses(quantizer, tmp_path):
    """NVFP4's 4over6 and 16x16 tiles choose scales differently but store the same layout; FP8 per
    block of K and per tensor are compressed-tensors' group and tensor strategies."""
    torch.manual_seed(0)
    qm = compiled(llama(), "mxfp4-weight-only", weight=quantizer)
    qpass.save_pretrained(qm, tmp_path, format="compressed-tensors")
    by_package = decompressed(tmp_path)
    for name, weight in expected_weights(qm).items():
        assert same_bits(by_package[name].to(weight.dtype), weight), name


# ---- outputs ---------------------------------------------------------------------------------------

# The loaded model's logits against qpass's, relative (L2), on this file's Llama and tokens. Weights
# are identical everywhere; what differs is how compressed-tensors quantizes inputs: FP8 scales are
# amax/448 computed in the input's dtype (bfloat16 here), qpass's 1/(448/amax) in fp32; its MX block
# exponents round the amax up at 1.75 (E4M3: qpass's rceil but for exact ties) and at 1.9375 (E2M3,
# where mxfp6-infer uses floor). Measured values are in docs/compressed_tensors.md.
AGREEMENT = {
    "fp8-infer/fp32": 1e-6,  # measured 1.5e-7
    "fp8-infer/bf16": 3e-2,  # measured 2.8e-2: bfloat16 input scales, and weight_scale rounded (above)
    "mxfp8-infer": 0.0,
    "mxfp6-infer": 3e-2,  # measured 2.5e-2: floor against compressed-tensors' rounded exponent
    "mxfp4-weight-only": 0.0,
}


@pytest.mark.parametrize("case", AGREEMENT)
def test_loaded_outputs_agree_with_qpass(case, tmp_path):
    qm = exported(llama, *EXPORTS[case], tmp_path)
    assert relative(logits(loaded(tmp_path)), logits(qm)) <= AGREEMENT[case]


@pytest.mark.parametrize("recipe, overrides, dtype", [
    ("mxfp6-infer", {"scale_mode": "even"}, BF16),  # compressed-tensors' own MXFP6 input rule
    ("fp8-infer", {"input": None}, FP32),  # weight-only
    ("nvfp4-infer", {"input": None}, BF16),  # what the NVFP4 export computes (weight-only)
])
def test_where_the_input_rules_match_outputs_are_identical(recipe, overrides, dtype, tmp_path):
    qm = exported(llama, recipe, overrides, dtype, tmp_path)
    assert torch.equal(logits(loaded(tmp_path)), logits(qm))


def test_nvfp4_inputs_are_exported_weight_only_with_a_warning(tmp_path):
    torch.manual_seed(0)
    qm = compiled(llama(), "nvfp4-infer")
    with pytest.warns(UserWarning, match="exported weight-only"):
        qpass.save_pretrained(qm, tmp_path, format="compressed-tensors")
    quantization = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    (group,) = quantization["config_groups"].values()
    assert group["input_activations"] is None and group["format"] == "nvfp4-pack-quantized"


@pytest.mark.slow
def test_smoothquant_folded_into_the_norms_is_exported(tmp_path):
    """SmoothQuant's 1/s, folded into the norm before gate/up, is written into that norm's weight."""
    torch.manual_seed(0)
    smooth = [(f"*.mlp.{name}", {"smooth": 0.5}) for name in ("gate_proj", "up_proj")]
    qm = compiled(llama(), "mxfp8-infer", hadamard=None, rules=smooth)
    qpass.calibrate(qm, [torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))])
    expected = logits(qm)
    qpass.save_pretrained(qm, tmp_path, format="compressed-tensors")
    norm = "model.layers.0.post_attention_layernorm.weight"
    assert not torch.equal(load_file(tmp_path / WEIGHTS_FILE)[norm], qm.get_parameter(norm))
    assert torch.equal(logits(loaded(tmp_path)), expected)


# ---- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize("make, recipe, overrides, reason", [
    (llama, "mxfp4-infer", {}, "rotates both operands by a Hadamard"),
    (llama, "mxfp8-infer", {}, "rotates both operands by a Hadamard"),
    (lambda dtype: llama(FP32), "mxfp4-weight-only", {}, "decompresses mxfp4 weights to bfloat16"),
    (lambda dtype: llama(FP32), "nvfp4-infer", {}, "decompresses nvfp4 weights to bfloat16"),
    (gpt2, "fp8-infer", {}, "not a Conv1D's weight"),
    (llama, "fp8-train", {}, "a training recipe"),
    pytest.param(llama, "fp8-infer", {"ocs": 0.05}, "channel splitting", marks=pytest.mark.slow),
    (llama, "fp8-infer", {"weight": "fp8_e5m2"}, "fp8_e5m2 weights"),
    (llama, "mxfp8-infer", {"hadamard": None, "rounding": "stochastic"}, "stochastic rounding of the inputs"),
    (llama, "mxfp4-weight-only", {"weight": "mxfp6_e3m2"}, "mxfp6_e3m2 weights"),
    (lambda dtype: llama(dtype, hidden=128), "fp8-infer", {"attention": True},  # head_dim 32: quantized
     "a product of two activations"),
])
def test_what_the_format_cannot_express_is_refused_with_the_reason(make, recipe, overrides, reason, tmp_path):
    torch.manual_seed(0)
    qm = compiled(make(BF16), recipe, **overrides)
    with pytest.raises(ValueError, match="compressed-tensors cannot express") as error:
        qpass.save_pretrained(qm, tmp_path, format="compressed-tensors")
    assert reason in str(error.value)
    assert not (tmp_path / WEIGHTS_FILE).exists()


@pytest.mark.slow
def test_online_smoothquant_scales_are_refused(tmp_path):
    torch.manual_seed(0)
    qm = compiled(llama(), "mxfp8-infer", hadamard=None, smooth=0.5)  # o_proj and down_proj: online
    qpass.calibrate(qm, [torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))])
    logits(qm)
    with pytest.raises(ValueError, match="per-channel input scaling") as error:
        qpass.save_pretrained(qm, tmp_path, format="compressed-tensors")
    assert "model.layers.0.self_attn.o_proj and 3 more sites" in str(error.value)  # o_proj, down_proj


def test_an_nvfp4_weight_whose_global_scale_has_no_fp32_form_is_refused(tmp_path):
    """A tensor amax of 147/128 times a power of two makes g = amax/2688 = 7 * 2^(e-14): products of
    codes, E4M3 scales and g are then often exact bfloat16 ties, which qpass rounds to even and
    compressed-tensors' code * (scale / G) breaks by the sign of G's rounding error, whichever fp32 G
    is written (of the 128 bfloat16 amax mantissas, this is the one that measured so)."""
    torch.manual_seed(0)
    model = llama(layers=1)
    with torch.no_grad():
        weight = model.model.layers[0].mlp.up_proj.weight
        weight.copy_((torch.randn(weight.shape) * 0.05).clamp(-0.14, 0.14))
        weight[0, 0] = 147 / 1024
    qm = compiled(model, "nvfp4-infer", input=None)
    with pytest.raises(ValueError, match="no fp32 global scale") as error:
        qpass.save_pretrained(qm, tmp_path, format="compressed-tensors")
    assert "model.layers.0.mlp.up_proj:" in str(error.value)


def test_nan_weights_are_refused(tmp_path):
    torch.manual_seed(0)
    model = llama(layers=1)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 5] = float("nan")
    qm = compiled(model, "mxfp4-weight-only")
    with pytest.raises(ValueError, match="NaN or Inf"):
        qpass.save_pretrained(qm, tmp_path, format="compressed-tensors")


def test_bad_input_names_the_problem(tmp_path):
    with pytest.raises(ValueError, match="compiled by qpass.compile"):
        qpass.save_pretrained(llama(), tmp_path, format="compressed-tensors")
    with pytest.raises(ValueError, match="has not run"):
        qpass.save_pretrained(qpass.compile(llama(), "fp8-infer", backend="aot_eager"), tmp_path,
                              format="compressed-tensors")
    mlp = qpass.compile(nn.Sequential(nn.Linear(64, 64)), "fp8-infer", backend="aot_eager")
    mlp(torch.randn(2, 64))
    with pytest.raises(ValueError, match="not a transformers model"):
        qpass.save_pretrained(mlp, tmp_path, format="compressed-tensors")


# ---- the directory ---------------------------------------------------------------------------------


def test_config_names_the_scheme_and_the_layers_left_in_high_precision(tmp_path):
    exported(llama, *EXPORTS["fp8-infer/fp32"], tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    quantization = config["quantization_config"]
    assert quantization["quant_method"] == "compressed-tensors"
    assert quantization["format"] == "float-quantized" and quantization["quantization_status"] == "compressed"
    assert quantization["ignore"] == ["lm_head"]
    (group,) = quantization["config_groups"].values()
    assert group["targets"] == ["Linear"]
    assert group["weights"]["strategy"] == "channel"
    assert group["input_activations"]["strategy"] == "token" and group["input_activations"]["dynamic"] is True
    assert config["dtype"] == "float32"


def test_mixed_schemes_are_config_groups_of_their_modules(tmp_path):
    torch.manual_seed(0)
    qm = compiled(llama(), "mxfp4-weight-only", rules=[("*.mlp.*", {"weight": "mxfp8_e4m3"})])
    qpass.save_pretrained(qm, tmp_path, format="compressed-tensors")
    quantization = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert quantization["format"] == "mixed-precision"
    formats = {group["format"]: group["targets"] for group in quantization["config_groups"].values()}
    assert formats.keys() == {"mxfp4-pack-quantized", "mxfp8-quantized"}
    assert "model.layers.1.mlp.down_proj" in formats["mxfp8-quantized"]
    assert torch.equal(logits(loaded(tmp_path)), logits(qm))


def test_tied_embeddings_are_written_once_and_tied_again(tmp_path):
    torch.manual_seed(0)
    qm = compiled(llama(tie_word_embeddings=True), "mxfp4-weight-only")
    qpass.save_pretrained(qm, tmp_path, format="compressed-tensors")
    assert "lm_head.weight" not in load_file(tmp_path / WEIGHTS_FILE)
    assert torch.equal(logits(loaded(tmp_path)), logits(qm))


def test_a_loaded_qpass_checkpoint_exports_the_same_file(tmp_path):
    torch.manual_seed(0)
    qm = compiled(llama(), "mxfp6-infer")
    qpass.save_pretrained(qm, tmp_path / "direct", format="compressed-tensors")
    qpass.save_pretrained(qm, tmp_path / "qpass")
    stored = qpass.from_pretrained(tmp_path / "qpass")
    logits(stored)
    qpass.save_pretrained(stored, tmp_path / "again", format="compressed-tensors")
    direct, again = (tmp_path / name / WEIGHTS_FILE for name in ("direct", "again"))
    assert direct.read_bytes() == again.read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("case", EXPORTS)
def test_the_directory_is_the_size_its_bits_say(case, tmp_path):
    recipe, overrides, dtype = EXPORTS[case]
    torch.manual_seed(0)
    wide = lambda dtype: llama(dtype, hidden=256, intermediate=512, layers=1)  # noqa: E731 -- weights dominate
    qm = exported(wide, recipe, overrides, dtype, tmp_path)
    stored, _ = weight_quantizations(qm)
    logical = sum(stored[name].quantize(value).storage_bits() / 8 if name in stored
                  else value.numel() * value.element_size() for name, value in qm.state_dict().items())
    files = sum(os.path.getsize(tmp_path / name) for name in os.listdir(tmp_path))
    assert logical <= files <= 1.05 * logical
