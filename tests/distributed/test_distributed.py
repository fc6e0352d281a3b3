"""qpass with DDP, FSDP2 and DCP: 2 and 4 gloo ranks on 127.0.0.1, spawned by the tests (workers.py).

Bounds. With the same global batch, a data-parallel step computes what one process computes, but
not in the same order: each rank's wgrad sums its own tokens' products (M = 32 of the batch's 64
tokens, fp32), and DDP / FSDP2 add the ranks' sums. Reassociating a sum of M fp32 terms moves it by
at most (M - 1) u Σ|terms| (Higham; u = 2^-24), so each step's update can differ by about M u
relative to the gradient's size, and the differences add up over the steps: |Δp| <= steps · M · u ·
max|p| bounds each parameter tensor, as long as no weight crosses a rounding boundary of its FP8
grid (one such crossing would move an element by 2^-4 relative, far beyond the bound: the test says
it did not happen). Losses are means over tokens, reassociated the same way. With amax agreed across
ranks, every quantization of the forward is the one of a single process, so the first step's
losses differ only by the mean's reassociation.
"""

from __future__ import annotations

import pytest
import torch
import workers

import qpass

pytestmark = pytest.mark.slow
# The tests of the module fixtures run on one xdist worker, so that the fixtures spawn their ranks once.
SHARED = pytest.mark.xdist_group("distributed")

STEPS = 5
U = 2.0 ** -24
# Relative to each tensor's max |value|: M is at most the batch's tokens, however the ranks split it.
BOUND = STEPS * workers.BATCH * workers.SEQUENCE * U

# nvfp4-train rounds gradients stochastically: each rank draws for its own share, which one process
# cannot reproduce. Round to nearest here to compare; its draws are the single-process ones' kind.
RECIPES = {"fp8-train": {}, "mxfp8-train": {}, "nvfp4-train": {"rounding": "rne"}}
MODES = ("ddp", "ddp_inside", "fsdp")


@pytest.fixture(scope="module")
def two_ranks():
    runs = [(mode, recipe, STEPS, "eager", overrides)
            for recipe, overrides in RECIPES.items() for mode in MODES]
    runs.append(("fsdp", "fp8-train", STEPS, "aot_eager", {}))
    results = workers.run_ranks(2, workers.train_each, runs)
    return {(mode, recipe, backend): [rank[i] for rank in results]
            for i, (mode, recipe, _, backend, _) in enumerate(runs)}


@pytest.fixture(scope="module")
def single():
    return {recipe: workers.train("single", recipe, STEPS, **overrides)
            for recipe, overrides in RECIPES.items()}


def _close(got: dict, want: dict) -> float:
    return max(((got[k] - v).abs().max() / v.abs().max()).item() for k, v in want.items())


@SHARED
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("mode", MODES)
def test_data_parallel_training_is_the_single_process_training(two_ranks, single, mode, recipe):
    ranks, one = two_ranks[mode, recipe, "eager"], single[recipe]
    for rank in ranks:
        assert rank["report"] == one["report"]  # names without wrappers' prefixes, exclusions hold
    assert one["report"][-1][0] == "lm_head" and not one["report"][-1][1]
    assert len(one["report"]) == 18
    # The first forward quantizes exactly as one process: each rank's logits are its rows' bits.
    assert torch.equal(torch.cat([rank["first_logits"] for rank in ranks]), one["first_logits"])
    losses = ranks[0]["losses"]
    assert (losses - one["losses"]).abs().max() <= BOUND * one["losses"].abs().max()
    assert _close(ranks[0]["parameters"], one["parameters"]) <= BOUND
    for name, value in ranks[0]["parameters"].items():  # every rank holds the same model
        assert torch.equal(value, ranks[1]["parameters"][name]), name


@SHARED
def test_fsdp2_under_aot_autograd(two_ranks, single):
    ranks, one = two_ranks["fsdp", "fp8-train", "aot_eager"], single["fp8-train"]
    assert ranks[0]["report"] == one["report"]
    assert _close(ranks[0]["parameters"], one["parameters"]) <= BOUND


def single_notes_with_gathers(report: list[tuple]) -> list[list[str]]:
    """The notes FSDP2 adds to a single process's report of fp8-train: each quantized linear's
    weight is all-gathered as its FP8 codes (lm_head and attention are excluded)."""
    note = "fsdp2: weight all-gathered as fp8_e4m3 codes"
    return [[note] if quantized else [] for _, quantized, *_ in report]


@SHARED
def test_fsdp2_all_gathers_fp8_weights_as_codes(two_ranks, single):
    notes = two_ranks["fsdp", "fp8-train", "eager"][0]["notes"]
    assert notes == single_notes_with_gathers(single["fp8-train"]["report"])
    assert sum(map(len, notes)) == 14  # every linear of both layers
    mx = two_ranks["fsdp", "mxfp8-train", "eager"][0]["notes"]
    assert not any(n.startswith("fsdp2") for row in mx for n in row)  # MX weights gather in fp32


def test_all_gathered_bytes_are_the_codes():
    steps = workers.run_ranks(2, workers.collective_bytes, "fp8-train", 3)[0]
    first, later = steps[0], steps[2]  # the first step gathers fp32 weights: sites are found then
    assert [name for name, _ in first] == [name for name, _ in later]
    gathers = [(a, b) for (name, a), (_, b) in zip(first, later) if name == "all_gather_single"]
    # The root unit (embeddings, norm, lm_head: nothing quantized) gathers as before; each layer
    # unit's FP8 weights go as one byte an element against bf16's two (the norms stay fp32).
    changed = [(fp32, now) for fp32, now in gathers if now != fp32]
    assert len(changed) == 4  # two layers, gathered for forward and again for backward
    for fp32, now in changed:
        assert now <= (8 / 16) * (fp32 / 2) * 1.03
    reduce_scatters = [(a, b) for (name, a), (_, b) in zip(first, later) if name == "reduce_scatter_single"]
    assert reduce_scatters and all(a == b for a, b in reduce_scatters)  # gradients as FSDP2 reduces them


def _agree(ranks: list[dict]) -> bool:
    return all(torch.equal(v, ranks[1]["states"][k]) for k, v in ranks[0]["states"].items())


def test_delayed_histories_stay_identical_across_ranks():
    runs = [("ddp", "fp8-train", 3, "eager", {"scaling": "delayed"})]
    ranks = workers.run_ranks(2, workers.train_each, runs)
    ranks = [r[0] for r in ranks]
    one = workers.train("single", "fp8-train", 3, scaling="delayed")
    assert ranks[0]["states"] and _agree(ranks)
    # Each rank recorded the global batch's amax: the histories one process records, but for the
    # gradients', twice theirs: a rank's loss is the mean over its half of the batch (DDP averages
    # the gradients afterwards), which doubles dY exactly, and with it its scale, not its codes.
    for key, value in one["states"].items():
        expected = value * 2 if ".grad_output." in key and key.endswith("amax_history") else value
        assert torch.allclose(ranks[0]["states"][key], expected, rtol=BOUND, atol=0), key


@pytest.mark.parametrize("nan", [False, True], ids=["finite", "nan-on-one-rank"])
def test_every_rank_quantizes_with_the_global_batchs_scale(nan):
    from qpass.ops import matmul
    from qpass.quantizer import Quantizer

    generator = torch.Generator().manual_seed(0)
    shares = [torch.randn(8, 64, generator=generator) * (1 + 3 * rank) for rank in range(2)]
    if nan:
        shares[1][3, 5] = float("nan")
    quantizers = [Quantizer(name).to_json() for name in ("fp8_e4m3", "fp8_e5m2", "nvfp4")]
    ranks = workers.run_ranks(2, workers.synced_scales, quantizers, shares)
    whole = torch.cat(shares)
    for i, q in enumerate(quantizers):
        expected = matmul.operand_tensors(whole, q, -1, "", "", False, False, False)
        for rank, share in enumerate(shares):
            codes, scales, g = ranks[rank][i]
            rows = slice(8 * rank, 8 * rank + 8)
            if Quantizer.from_json(q).per_tensor:  # one scale, the whole batch's: the same codes too
                assert torch.equal(scales, expected[1]) or (nan and scales.isnan() and expected[1].isnan())
                assert torch.equal(codes.view(torch.uint8), expected[0][rows].view(torch.uint8))
            else:  # NVFP4: the global scale is the whole batch's, and with it every block's codes
                assert torch.equal(g, expected[2]) or (nan and g.isnan() and expected[2].isnan())
                assert torch.equal(codes, expected[0][rows])


def test_without_sync_the_ranks_disagree():
    ranks = workers.run_ranks(2, workers.train_each,
                              [("ddp", "fp8-train", 2, "eager", {"scaling": "delayed", "sync_amax": False})])
    assert not _agree([r[0] for r in ranks])


def test_distributed_checkpoint_loads_at_other_world_sizes(tmp_path):
    path, delayed = str(tmp_path / "checkpoint"), {"scaling": "delayed"}
    saved = workers.run_ranks(2, workers.save_checkpoint, path, "fsdp", "fp8-train", 3, delayed)[0]
    assert saved["states"]
    one = workers.load_checkpoint(path, "single", "fp8-train", 3, delayed)
    four = workers.run_ranks(4, workers.load_checkpoint, path, "fsdp", "fp8-train", 3, delayed)
    for loaded in (one, *four):  # resharded to 1 and to 4 ranks: the same model, histories and all
        assert torch.equal(loaded["logits"], saved["logits"])
        assert loaded["states"].keys() == saved["states"].keys()
        assert all(torch.equal(v, saved["states"][k]) for k, v in loaded["states"].items())
    # At the world size it was saved at, training goes on as if it had never stopped.
    two = workers.run_ranks(2, workers.load_checkpoint, path, "fsdp", "fp8-train", 3, delayed)
    assert torch.equal(two[0]["loss_after"], saved["loss_after"])


@SHARED
def test_uneven_shards_at_four_ranks(single):
    # The MLP's 130 rows shard as 33, 33, 33, 31: FSDP2 pads the last shard, and so do its codes.
    ranks = workers.run_ranks(4, workers.train_each, [("fsdp", "fp8-train", STEPS, "eager", {})])
    result, one = ranks[0][0], single["fp8-train"]
    assert result["notes"] == single_notes_with_gathers(one["report"])
    assert (result["losses"] - one["losses"]).abs().max() <= BOUND * one["losses"].abs().max()
    assert _close(result["parameters"], one["parameters"]) <= BOUND


def test_graph_breaks_against_torch_compile_alone():
    counts = workers.run_ranks(2, workers.graph_breaks_each, ["ddp", "ddp_inside", "fsdp"])[0]
    none = {"block": 0, "disabled": 0, "other": 0}
    assert workers.graph_breaks("single") == {"qpass": none, "torch": none}
    # DDP around the compiled model: none (torch.compile of the DDP module breaks twice in DDP).
    assert counts["ddp"]["qpass"] == none and sum(counts["ddp"]["torch"].values()) > 0
    # The DDP module compiled: Dynamo also breaks once at DDP's logger call, which torch.compile's
    # own path for a DDP module (its DDPOptimizer) traces past.
    ddp = counts["ddp_inside"]
    assert ddp["qpass"]["other"] == ddp["torch"]["other"] + 1
    assert ddp["qpass"]["disabled"] == ddp["torch"]["disabled"]
    # FSDP2: each unit below the model (2 layers) is compiled on its own: its caller's graph breaks
    # at the call (where FSDP2's hooks broke it before: Dynamo tries the call in the model's frame
    # and again in the frame that holds the loop, so twice at most), and no more often at FSDP2's
    # hooks than torch.compile of the whole model does; nothing else breaks.
    fsdp = counts["fsdp"]
    assert fsdp["qpass"]["other"] == fsdp["torch"]["other"] == 0
    assert 0 < fsdp["qpass"]["block"] <= 2 * 2 and fsdp["qpass"]["disabled"] <= fsdp["torch"]["disabled"]


def test_collectives_without_a_process_group_are_the_single_process_ones():
    from qpass.ops import matmul
    from qpass.quantizer import Quantizer

    x = torch.randn(8, 64)
    q = Quantizer("fp8_e4m3")
    synced = matmul.operand_tensors(x, q.to_json(), -1, "", "", False, False, True)
    alone = matmul.operand_tensors(x, q.to_json(), -1, "", "", False, False, False)
    assert all(torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 else a, b.view(torch.uint8)
                           if b.dtype.itemsize == 1 else b) for a, b in zip(synced, alone))
    assert qpass.distributed.world_size() == 1
