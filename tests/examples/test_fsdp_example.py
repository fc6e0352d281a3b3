"""examples/fsdp_train.py runs under torchrun on 2 CPU processes: it trains, reports, checkpoints."""

import math
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fsdp_train.py"


@pytest.mark.slow
def test_the_fsdp_example_trains_on_two_processes(tmp_path):
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(port), str(EXAMPLE), "--steps", "12", "--layers", "1", "--hidden", "64",
               "--seq", "32", "--checkpoint", str(tmp_path / "checkpoint")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"^step +\d+ +loss (\S+)", run.stdout, re.M)]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)  # steps 0, 10, 11
    assert losses[-1] < losses[0]
    assert "7 of 10 sites quantized" in run.stdout
    assert run.stdout.count("fsdp2: weight all-gathered as fp8_e4m3 codes") == 7
    assert (tmp_path / "checkpoint" / ".metadata").exists()
