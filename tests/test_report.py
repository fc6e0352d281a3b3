"""qpass.report: every site, its kind and K, its formats per role, or why it was excluded."""

import torch
from torch import nn

import qpass


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.mlp = nn.Linear(64, 64)
        self.head = nn.Linear(64, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.mlp(self.embed(ids)))


def compiled(recipe="fp8-train", **overrides):
    qm = qpass.compile(Tiny(), recipe, backend="aot_eager", **overrides)
    qm(torch.randint(0, 50, (2, 8)))
    return qm


def test_rows_as_data():
    report = qpass.report(compiled(rules=[("mlp", {"grad_output": "mxfp8_e5m2"})]))
    assert [r["site"] for r in report.rows] == ["embed", "mlp", "head"]
    assert [r["site"] for r in report.quantized] == ["mlp"]
    mlp = report["mlp"]
    assert (mlp["kind"], mlp["K"], mlp["roles"], mlp["reason"]) == ("linear", 64, ("input", "weight"), None)
    assert mlp["formats"] == {
        "fprop.input": "fp8_e4m3", "fprop.weight": "fp8_e4m3",
        "dgrad.grad_output": "mxfp8_e5m2", "dgrad.weight": "fp8_e4m3",
        "wgrad.grad_output": "mxfp8_e5m2", "wgrad.input": "fp8_e4m3",
    }
    assert report["head"]["reason"] == "final output projection (lm_head), excluded by default"


def test_table():
    text = str(qpass.report(compiled("mxfp4-infer")))
    lines = text.splitlines()
    assert lines[0] == "qpass report: recipe mxfp4-infer, 1 of 3 sites quantized"
    assert lines[1].split() == ["site", "kind", "K", "quantization"]
    formats, gemm = lines[3].split("; gemm: ")
    assert formats.split() == ["mlp", "linear", "64", "input=mxfp4+hadamard-block32",
                               "weight=mxfp4+hadamard-block32"]
    assert gemm.startswith("reference: quantize-dequantize")
    assert "excluded: final output projection (lm_head)" in lines[4]


def test_gemms_that_differ_are_listed_apart():
    text = str(qpass.report(compiled("fp8-train", **{"wgrad.input": "mxfp8_e4m3"})))
    assert "fprop.input=fp8_e4m3 wgrad.input=mxfp8_e4m3 weight=fp8_e4m3 grad_output=fp8_e5m2" in text


def test_each_site_says_which_gemm_runs_it():
    rows = {name: qpass.report(compiled(name)).quantized[0]["gemm"]
            for name in ("fp8-train", "fp8-rowwise-train", "mxfp8-train")}
    assert rows["fp8-train"] == "scaled_mm tensorwise"
    assert rows["fp8-rowwise-train"] == "scaled_mm rowwise"
    # No CPU kernel takes MX block scales: the reference, and the reason.
    assert rows["mxfp8-train"] == ("reference: no scaled GEMM on cpu takes "
                                   "mxfp8_e4m3(rceil) x mxfp8_e4m3(rceil)")
    mixed = qpass.report(compiled("fp8-train", **{"wgrad.input": "mxfp8_e4m3"})).quantized[0]["gemm"]
    assert mixed.startswith("fprop scaled_mm tensorwise; dgrad scaled_mm tensorwise; wgrad reference: ")


def test_before_the_first_call():
    report = qpass.report(qpass.compile(Tiny(), "fp8-train", backend="aot_eager"))
    assert report.rows == [] and "no graph captured yet" in report.notes[0]
