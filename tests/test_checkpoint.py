"""qpass checkpoints (qpass.save_pretrained / qpass.from_pretrained, SPEC section 11): round trips of
every inference recipe on tiny Hugging Face models, a training checkpoint that resumes exactly, the
stored-weight tensor, pickling, and bad input."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from torch import nn

import qpass
from qpass.checkpoint import MANIFEST_FILE, TENSORS_FILE, CheckpointError, weight_quantizations
from qpass.formats import dequantize, quantize
from qpass.stored import StoredWeight

INFERENCE_RECIPES = (
    "fp8-infer", "mxfp8-infer", "mxfp6-infer", "nvfp4-infer", "mxfp4-infer", "mxfp4-weight-only")
VOCAB = 128


def llama(hidden: int = 256, intermediate: int = 512, layers: int = 1) -> nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2))


def gpt2() -> nn.Module:  # dropout on: a model loaded in the wrong mode would differ
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=256, n_layer=1, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0))


def qwen2() -> nn.Module:
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2))


MODELS = {"llama": llama, "gpt2": gpt2, "qwen2": qwen2}
# Wide enough (hidden 256) that the weights, not the manifest and headers, make up most of a directory.
TOKENS = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))


def compiled(make, recipe: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    qm = qpass.compile(make().eval(), recipe, backend="aot_eager", **overrides)
    with torch.no_grad():
        qm(TOKENS)
    return qm


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def directory_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))


def logical_bytes(model: nn.Module) -> float:
    """Σ(each stored weight at its logical bits, scales included) + fp32 for every other tensor."""
    stored, _ = weight_quantizations(model)
    tensors = dict(model.state_dict())
    tensors.update(model.named_buffers())
    total, seen = 0.0, set()
    for name, value in tensors.items():
        if id(value) in seen:  # tied
            continue
        seen.add(id(value))
        total += (stored[name].quantize(value).storage_bits() / 8 if name in stored else 4 * value.numel())
    return total


@pytest.mark.slow
@pytest.mark.parametrize("architecture", MODELS)
@pytest.mark.parametrize("recipe", INFERENCE_RECIPES)
def test_round_trip_is_bit_identical_small_and_holds_no_fp32_copy(architecture, recipe, tmp_path):
    qm = compiled(MODELS[architecture], recipe)
    expected = logits(qm)
    qpass.save_pretrained(qm, tmp_path)
    assert directory_bytes(tmp_path) <= 1.05 * logical_bytes(qm)
    stored, kept = weight_quantizations(qm)
    assert stored and not kept  # every quantized site's weight is stored quantized

    loaded = qpass.from_pretrained(tmp_path)
    for name in stored:
        weight = loaded.get_parameter(name)
        assert isinstance(weight, StoredWeight) and weight.codes.dtype == torch.uint8
    assert torch.equal(logits(loaded), expected)
    assert str(qpass.report(loaded)) == str(qpass.report(qm))
    assert loaded.training == qm.training


@pytest.mark.parametrize("overrides, method", [(dict(smooth=0.5), "rtn"), ({}, "gptq")])
def test_calibrated_models_round_trip(overrides, method, tmp_path):
    """SmoothQuant's scales (folded into the norms, applied to the weights before storing) and GPTQ's
    weights survive the round trip."""
    qm = compiled(llama, "nvfp4-infer", **overrides)
    qpass.calibrate(qm, [torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(i))
                         for i in range(2)], method=method)
    expected = logits(qm)
    qpass.save_pretrained(qm, tmp_path)
    loaded = qpass.from_pretrained(tmp_path)
    assert torch.equal(logits(loaded), expected)
    assert loaded._qpass.smoothing == qm._qpass.smoothing and loaded._qpass.calibrated == qm._qpass.calibrated


def test_bf16_model_with_rotated_weights_round_trips(tmp_path):
    qm = qpass.compile(llama().eval().to(torch.bfloat16), "mxfp4-infer", backend="aot_eager")
    expected = logits(qm)
    qpass.save_pretrained(qm, tmp_path)
    loaded = qpass.from_pretrained(tmp_path)
    assert loaded.get_parameter("model.layers.0.mlp.up_proj.weight").dtype == torch.bfloat16
    assert torch.equal(logits(loaded), expected)


def test_weights_the_graph_rewrites_stay_high_precision_with_their_reason(tmp_path):
    qm = compiled(llama, "mxfp4-infer", hadamard="residual")
    expected = logits(qm)
    qpass.save_pretrained(qm, tmp_path)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert not manifest["stored"] and len(manifest["high_precision"]) == 7
    assert all("residual-stream rotation" in why for why in manifest["high_precision"].values())
    assert torch.equal(logits(qpass.from_pretrained(tmp_path)), expected)


def test_a_loaded_model_saves_the_same_checkpoint_again(tmp_path):
    qpass.save_pretrained(compiled(llama, "mxfp6-infer"), tmp_path / "a")
    loaded = qpass.from_pretrained(tmp_path / "a")
    logits(loaded)
    qpass.save_pretrained(loaded, tmp_path / "b")
    assert (tmp_path / "a" / TENSORS_FILE).read_bytes() == (tmp_path / "b" / TENSORS_FILE).read_bytes()


def test_a_plain_module_loads_into_the_structure_it_is_given(tmp_path):
    def mlp():
        return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))

    torch.manual_seed(0)
    x = torch.randn(3, 64)
    qm = qpass.compile(mlp(), "nvfp4-infer", backend="aot_eager")
    expected = qm(x)
    qpass.save_pretrained(qm, tmp_path)
    with pytest.raises(ValueError, match="pass its structure as qpass.from_pretrained"):
        qpass.from_pretrained(tmp_path)
    with torch.device("meta"):
        skeleton = mlp()
    assert torch.equal(qpass.from_pretrained(tmp_path, model=skeleton)(x), expected)


@pytest.mark.slow
def test_loading_materializes_no_fp32_weights(tmp_path):
    """Peak memory of a process that loads an MXFP4 checkpoint of a 32M-parameter model stays far
    below the 126 MB its fp32 linear weights would take."""
    torch.manual_seed(0)
    qm = qpass.compile(llama(hidden=1024, intermediate=4096, layers=2).eval(), "mxfp4-weight-only",
                       backend="aot_eager")
    with torch.no_grad():
        qm(TOKENS[:, :4])
    qpass.save_pretrained(qm, tmp_path)
    fp32_bytes = sum(4 * qm.get_parameter(name).numel() for name in weight_quantizations(qm)[0])
    script = textwrap.dedent(f"""
        import resource, qpass, transformers, safetensors.torch
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        model = qpass.from_pretrained({str(tmp_path)!r})
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        kinds = {{type(p).__name__ for n, p in model.named_parameters() if n.endswith("proj.weight")}}
        print(after - before, sorted(kinds))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    growth, kinds = out.stdout.split(maxsplit=1)
    assert kinds.strip() == "['StoredWeight']"
    assert int(growth) < 0.3 * fp32_bytes, (int(growth), fp32_bytes)


def test_training_checkpoint_resumes_bit_identically(tmp_path):
    """fp8-train with delayed scaling: high-precision master weights and amax histories are saved;
    with the optimizer's own state, the next 3 steps' losses equal an uninterrupted run's."""

    def step(model, optimizer, i):
        batch = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(100 + i))
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    torch.manual_seed(0)
    model = qpass.compile(llama(layers=2).train(), "fp8-train", scaling="delayed", backend="aot_eager")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for i in range(3):
        step(model, optimizer, i)
    qpass.save_pretrained(model, tmp_path)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert not manifest["stored"]
    assert all("master weight" in why for why in manifest["high_precision"].values())
    uninterrupted = [step(model, optimizer, i) for i in range(3, 6)]

    resumed = qpass.from_pretrained(tmp_path)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in resumed.parameters())
    histories = {k: v for k, v in resumed.state_dict().items() if k.startswith("_qpass.")}
    assert histories and all(v.abs().sum() > 0 for k, v in histories.items() if k.endswith("amax_history"))
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-3)
    resumed_optimizer.load_state_dict(torch.load(tmp_path / "optimizer.pt"))
    assert [step(resumed, resumed_optimizer, i) for i in range(3, 6)] == uninterrupted


# ---- the stored weight -----------------------------------------------------------------------------


@pytest.mark.parametrize("format", ["fp8_e4m3", "mxfp6_e3m2", "mxfp4", "nvfp4", "mxint8"])
def test_stored_weight_computes_as_its_dequantized_values(format):
    weight = torch.randn(48, 96)
    weight[0, :32] = 0  # a zero block
    weight[1, 0] = 1e-40  # a subnormal
    quantizer = qpass.Quantizer(format)
    qt = quantize(weight, quantizer.spec, axis=-1)
    stored = StoredWeight.from_qtensor(qt, quantizer)
    values = dequantize(qt)
    assert torch.equal(stored.dequantize(), values) and torch.equal(dequantize(stored.qtensor()), values)
    x = torch.randn(5, 96)
    assert torch.equal(torch.nn.functional.linear(x, stored), torch.nn.functional.linear(x, values))
    parameter = nn.Parameter(stored, requires_grad=False)
    for same in (stored.detach(), parameter, stored.to("cpu"), stored.clone()):
        assert isinstance(same, StoredWeight) and torch.equal(same.dequantize(), values)
    with pytest.raises(RuntimeError, match="read-only"):
        stored.copy_(weight)
    with pytest.raises(RuntimeError, match="read-only"):
        stored.mul_(2)


def test_a_loaded_model_refuses_writes_and_calibration(tmp_path):
    qpass.save_pretrained(compiled(llama, "mxfp4-weight-only"), tmp_path)
    loaded = qpass.from_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="read-only"):
        loaded.load_state_dict(llama().state_dict())
    with pytest.raises(ValueError, match="stored quantized"):
        qpass.calibrate(loaded, [TOKENS], method="gptq")


def test_compiled_and_loaded_models_pickle(tmp_path):
    qm = compiled(llama, "nvfp4-infer")
    qpass.save_pretrained(qm, tmp_path)
    for model in (qm, qpass.from_pretrained(tmp_path)):
        expected = logits(model)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        copy = torch.load(buffer, weights_only=False)
        assert torch.equal(logits(copy), expected)
        assert str(qpass.report(copy)) == str(qpass.report(model))


# ---- bad input -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("checkpoint")
    qpass.save_pretrained(compiled(llama, "mxfp4-weight-only"), path)
    return path


def copy_of(checkpoint, tmp_path):
    for name in os.listdir(checkpoint):
        (tmp_path / name).write_bytes((checkpoint / name).read_bytes())
    return tmp_path


def edit_manifest(path, change) -> None:
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    change(manifest)
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_save_before_the_first_call_or_of_a_plain_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="call it once"):
        qpass.save_pretrained(qpass.compile(llama(), "fp8-infer", backend="aot_eager"), tmp_path)
    with pytest.raises(ValueError, match="compiled by qpass.compile"):
        qpass.save_pretrained(llama(), tmp_path)
    with pytest.raises(ValueError, match="unknown checkpoint format 'gguf'; expected one of qpass, compr"):
        qpass.save_pretrained(llama(), tmp_path, format="gguf")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="qpass.json: missing"):
        qpass.from_pretrained(tmp_path)


def test_another_format_version(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    edit_manifest(path, lambda m: m.update(version=99))
    with pytest.raises(CheckpointError, match="qpass.json: field 'version' is 99"):
        qpass.from_pretrained(path)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupted_or_truncated_tensors(checkpoint, tmp_path, damage):
    path = copy_of(checkpoint, tmp_path)
    data = bytearray((path / TENSORS_FILE).read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
    else:
        del data[len(data) // 3:]
    (path / TENSORS_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{TENSORS_FILE}: its SHA-256"):
        qpass.from_pretrained(path)


def test_an_invalid_recipe_field(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    edit_manifest(path, lambda m: m["recipe"]["Recipe"].update(scaling={"Quantizer": {"format": "fp9"}}))
    with pytest.raises(CheckpointError, match="field 'recipe' is not a valid recipe"):
        qpass.from_pretrained(path)


def test_a_recipe_that_the_stored_weights_do_not_match(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    mxfp8 = {"Quantizer": {"format": "mxfp8_e4m3"}}
    edit_manifest(path, lambda m: m["recipe"]["Recipe"].update(weight=mxfp8))
    loaded = qpass.from_pretrained(path)
    with pytest.raises(Exception, match="checkpoint stored StoredWeight.mxfp4.*does not match its recipe"):
        logits(loaded)


def test_a_stored_weight_of_the_wrong_size(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    name = "model.layers.0.mlp.up_proj.weight"
    edit_manifest(path, lambda m: m["stored"][name].update(shape=[128, 128]))
    with pytest.raises(CheckpointError, match=f"{name}.qpass.codes has 65536 bytes; a mxfp4 weight of shape"):
        qpass.from_pretrained(path)
