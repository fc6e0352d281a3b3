"""The training demo runs end to end on a tiny model: three runs, sites quantized, a plot written."""

import importlib.util
import math
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.py"
TINY = ["--steps", "8", "--layers", "1", "--hidden", "64", "--batch", "2", "--seq", "32", "--lr", "1e-2"]


def load_demo():
    """examples/ is not a package: load demo.py from its path."""
    spec = importlib.util.spec_from_file_location("qpass_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_demo_trains_baseline_and_recipes(tmp_path, capsys):
    out = tmp_path / "loss.png"
    results = load_demo().main([*TINY, "--out", str(out)])

    assert [r["run"] for r in results] == ["fp32", "fp8-train", "mxfp8-train"]
    for r in results:
        assert len(r["losses"]) == 8
        assert all(math.isfinite(x) for x in [*r["losses"], r["train_loss"], r["heldout_loss"], r["gap_pct"]])
        assert r["seconds_per_step"] > 0
    baseline, *quantized = results
    assert baseline["losses"][-1] < baseline["losses"][0]
    assert baseline["gap_pct"] == 0 and baseline["sites"] is None
    for r in quantized:
        # One layer has seven linear layers; the lm_head stays unquantized by default.
        assert 7 <= r["quantized"] < r["sites"]
        # Same init, same batches: quantization moves the loss a little, not a lot.
        assert abs(r["gap_pct"]) < 5
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    printed = capsys.readouterr().out
    assert "qpass report: recipe mxfp8-train" in printed
    assert str(out) in printed
