"""Test support for the connector: KV caches shaped as serving engines shape them, and
children that speak one JSON line per command.

:func:`make_caches` builds one tensor per layer with the strides of vLLM's caches (views
into one flat buffer, with a gap between layers, or a tensor per layer), filled with
seeded values, so a test can recompute what any page holds. :class:`JsonChild` runs a
script in its own process (this venv's or .venv-vllm's Python); every wait has a
deadline and the child is stopped by pid.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = ("LBHNC", "LBNHC", "flash", "BLHNC")


def make_caches(layout: str, *, num_layers: int = 3, num_blocks: int = 24, heads: int = 2, block_size: int = 16,
                head_dim: int = 32, seed: int | None = None, device: str = "cpu") -> list[Any]:
    """One KV tensor per layer, as vLLM hands them to a connector:

    - LBHNC (CPU; GPU when asked): ``[B, H, N, 2D]`` views into one flat buffer, layers
      apart by more than a layer (a gap, as vLLM leaves between its layers);
    - LBNHC (GPU default): the same logical shape with tokens before heads in memory;
    - flash (before August 2026): ``[2, B, N, H, D]``, one tensor per layer;
    - BLHNC: blocks outermost across layers (unsupported by the connector).

    Filled with float32 values from ``seed`` (zeros without one)."""
    import torch

    b, h, n, d = num_blocks, heads, block_size, head_dim
    c = 2 * d
    page = h * n * c
    if layout == "flash":
        caches = [torch.zeros(2, b, n, h, d, device=device) for _ in range(num_layers)]
    else:
        gap = 4 * page + 8  # elements between layers: nothing assumed contiguous
        flat = torch.zeros(num_layers * (b * page + gap), device=device)
        if layout == "LBHNC":
            caches = [flat.as_strided((b, h, n, c), (page, n * c, c, 1), l * (b * page + gap))
                      for l in range(num_layers)]
        elif layout == "LBNHC":
            caches = [flat.as_strided((b, h, n, c), (page, c, h * c, 1), l * (b * page + gap))
                      for l in range(num_layers)]
        elif layout == "BLHNC":
            caches = [flat.as_strided((b, h, n, c), (num_layers * page, n * c, c, 1), l * page)
                      for l in range(num_layers)]
        else:
            raise ValueError(layout)
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        for t in caches:
            t.copy_(torch.randn(t.shape, generator=g).to(device))
    return caches


def block(t: Any, layout: str, b: int) -> Any:
    """Block ``b``'s page of one layer's tensor."""
    return t[:, b] if layout == "flash" else t[b]


class JsonChild:
    """``python script args...`` speaking one JSON object per line on stdout; stderr goes
    to a file shown on failure."""

    def __init__(self, argv: list[str], *, env: dict[str, str] | None = None, python: str = sys.executable,
                 ready_timeout: float | None = 60.0, what: str = "child", new_session: bool = False) -> None:
        self.what = what
        fd, self.stderr_path = tempfile.mkstemp(prefix="kvt-conn-", suffix=".log")
        with os.fdopen(fd, "w") as err:
            self.proc = subprocess.Popen([python, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err, text=True, cwd=ROOT, env=_environ(env),
                                         start_new_session=new_session)
        self._lines: "queue.Queue[str | None]" = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.ready: dict | None = None
        if ready_timeout is not None:  # else the caller waits with wait_ready (children starting together)
            self.wait_ready(ready_timeout)

    def wait_ready(self, timeout: float) -> dict:
        """The child's first line (what it says once it is up)."""
        if self.ready is None:
            self.ready = self.read(timeout)
        return self.ready

    def _pump(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                self._lines.put(line)
        self._lines.put(None)

    def stderr(self) -> str:
        try:
            with open(self.stderr_path, errors="replace") as f:
                return f.read()[-6000:]
        except OSError:
            return ""

    def read(self, timeout: float) -> dict:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            pytest.fail(f"{self.what} pid {self.proc.pid}: no answer within {timeout} s (killed); "
                        f"stderr:\n{self.stderr()}")
        if line is None:
            pytest.fail(f"{self.what} pid {self.proc.pid} exited ({self.proc.poll()}); stderr:\n{self.stderr()}")
        reply = json.loads(line)
        if "error" in reply:
            raise ChildError(reply["error"])
        return reply

    def call(self, timeout: float = 30.0, /, **cmd: Any) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.read(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> None:
        from kvtransfer.testing.children import stop_child
        if self.proc.poll() is None:
            stop_child(self.proc, timeout)
        try:
            os.unlink(self.stderr_path)
        except OSError:
            pass


def _environ(changes: dict[str, str | None] | None) -> dict[str, str]:
    """This process's environment with ``changes`` (None removes a variable)."""
    env = dict(os.environ)
    for key, value in (changes or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


class ChildError(Exception):
    """A command the child answered with ``{"error": ...}``."""


def wait_for(predicate, timeout: float, interval: float = 0.05):
    """Polls until ``predicate()`` is truthy; returns its last value."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(interval)
    return value
