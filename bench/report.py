"""What every benchmark's header shares (imported by the scripts in bench/, which run
as ``python bench/NAME.py``, so this folder is on the path)."""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path


def kv_lines(pairs: list[tuple[str, str]]) -> list[str]:
    """The ``key : value`` header lines of an ib_read_bw-style report."""
    return [f" {k:<17}: {v}" for k, v in pairs]


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"
