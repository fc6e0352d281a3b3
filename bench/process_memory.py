"""This process's resident memory, from Linux's /proc/self: now, at its peak, and the peak reset.

The benchmarks that measure memory run each measurement in a process of its own, so that the peak
belongs to it alone."""

from __future__ import annotations

import re
from pathlib import Path


def status(name: str) -> int:
    """A /proc/self/status field in bytes (VmRSS: resident now; VmHWM: the peak)."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{name}:\s+(\d+) kB", text, re.M)[1]) * 1024


def reset_peak() -> bool:
    """VmHWM back to the current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def malloc_trim():
    """glibc's ``malloc_trim``: give the freed heap back to the system, so that RSS is what is in use.
    None where the C library has none."""
    import ctypes

    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    return lambda: trim(0)


def start_peak() -> tuple:
    """Start measuring a peak from here: the heap trimmed, VmHWM reset. Returns (the trim function or
    None, whether the peak was reset, the RSS now in bytes)."""
    trim = malloc_trim()
    if trim:
        trim()
    return trim, reset_peak(), status("VmRSS")
