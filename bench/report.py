"""What every benchmark's header shares (imported by the scripts in bench/, which run
as ``python bench/NAME.py``, so this folder is on the path)."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from pathlib import Path
from typing import Callable


def kv_lines(pairs: list[tuple[str, str]]) -> list[str]:
    """The ``key : value`` header lines of an ib_read_bw-style report."""
    return [f" {k:<17}: {v}" for k, v in pairs]


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def out_path_problem(path: str, suffix: str | None = None) -> str | None:
    """Why ``path`` cannot take a benchmark's output (checked before any work), or None:
    its folder must exist and be writable, and it must not be a folder itself."""
    p = Path(path)
    if suffix and p.suffix.lower() != suffix:
        return f"{path}: expected a {suffix} file name"
    if p.is_dir():
        return f"{path} is a folder; name a file"
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        return f"{path}: folder {parent} does not exist"
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        return f"{path}: not writable"
    return None


if __name__ == "__main__":  # `python bench/report.py --check-out FILE`: the Makefile's check
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "--check-out":
        sys.exit("usage: report.py --check-out FILE")
    problem = out_path_problem(sys.argv[2])
    if problem:
        sys.exit(f"refused: {problem}")


def exit_with(main: Callable[[], int]) -> None:
    """Runs a benchmark's ``main`` and exits with the status benchmarks share: its own, 1
    when a verification failed (AssertionError), 2 for any other error, one line each."""
    try:
        status = main()
    except AssertionError as e:
        print(f"VERIFY FAILED: {e}", file=sys.stderr)
        status = 1
    except Exception as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        status = 2
    sys.exit(status)
