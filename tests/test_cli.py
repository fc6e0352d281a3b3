"""The `qpass formats` command: a row per named format, with bits and QSNR that make sense."""

import math
import subprocess
import sys

import pytest

from qpass.cli import format_table, main
from qpass.formats import NAMED_FORMATS


@pytest.fixture(scope="module")
def table():
    return {name: (bits, q_normal, q_heavy) for name, bits, q_normal, q_heavy in format_table(rows=8, cols=1024)}


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
