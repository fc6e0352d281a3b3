"""bench/RESULTS.md: each benchmark owns one section between its own markers and rewrites only that."""

from __future__ import annotations

import platform
import re
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def write_section(name: str, title: str, body: str) -> None:
    """Replace the section marked ``<!-- name:begin -->`` ... ``<!-- name:end -->``, or append it."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    section = f"{begin}\n## {title}\n\n{body}{end}\n"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end) + "\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:  # a blank line between this section and the one before it
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)


def provenance(command: str, started: float) -> str:
    """How a table was made: the command that reproduces it, the machine, torch, and the seconds
    since ``started`` (``time.time()``)."""
    return (f"`{command}`, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{time.time() - started:.0f} s")
