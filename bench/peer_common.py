"""What bench/peer_nixl.py and bench/peer_mooncake.py share: the workload and the pipe.

A peer driver runs in the peers' environment (.venv-peers: NIXL, Mooncake, numpy; no
kvtransfer) as two processes, a target and a reader, like bench/transfer_bw.py's own
systems. transfer_bw.py starts the reader; the reader starts its target. Both build the
workload exactly as transfer_bw.py does (:func:`seeded_bytes`, :func:`permutation`: the
same numpy calls, so the same bytes and order), and the reader reports a digest of each
permutation so that transfer_bw.py can check it read what the others read.

The reader speaks JSON lines: first a hello (``{"system", "config", "pid"}`` or
``{"error"}``), then one answer per command read on stdin:

* ``prepare BLOCK_BYTES`` -> builds the batch (remote block ``perm[i]`` into local block
  ``i``), zeroes the destination, runs one pass and checks every byte:
  ``{"perm_sha": HEX}`` or ``{"error"}``.
* ``passes N`` -> ``{"pass_ns": [...]}``: N passes, each timed from the call that starts
  it to the last byte in place.
* ``ranges JSON_FILE`` -> like prepare, for a KV-shaped batch: the file holds
  ``{"layers": [[[remote_off, local_off, len], ...], ...]}``; each layer is one batch.
  ``layers N`` then times N requests: ``{"layer_ns": [[...per layer...], ...]}``, each
  layer's time from the request's start to that layer's last byte (layers posted in
  order, all in flight at once).

End of stdin ends it. A driver implements :class:`Driver`; :func:`serve_reader` does the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from typing import Callable

import numpy as np

STARTUP_TIMEOUT_S = 60.0
PASS_TIMEOUT_S = 120.0


def parse_size(text: str) -> int:
    """'64M' -> 67108864 (kvtransfer.testing.target.parse_size's K, M, G)."""
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


def seeded_bytes(nbytes: int, seed: int) -> np.ndarray:
    """The bytes kvtransfer.testing.target serves for ``seed`` (same call as kvtransfer.testing.target.seeded_bytes)."""
    return np.frombuffer(np.random.default_rng(seed).bytes(nbytes), dtype=np.uint8).copy()


def permutation(block_bytes: int, total: int, seed: int) -> np.ndarray:
    """transfer_bw.make_layout's order of remote blocks (same call)."""
    return np.random.default_rng([seed, block_bytes]).permutation(total // block_bytes).astype(np.int64)


def perm_digest(perm: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(perm, np.int64).tobytes()).hexdigest()[:16]


_out = sys.stdout


def protect_stdout() -> None:
    """Keeps stdout for the JSON lines: libraries that print (NIXL says hello on stdout)
    write to stderr from here on."""
    global _out
    sys.stdout.flush()
    _out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)


def emit(obj: dict) -> None:
    _out.write(json.dumps(obj) + "\n")
    _out.flush()


def start_target(cmd: list[str], env: dict | None = None) -> tuple[subprocess.Popen, dict]:
    """Starts the target and returns it with its JSON hello (STARTUP_TIMEOUT_S at most)."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    box: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: box.put(proc.stdout.readline()), daemon=True).start()
    try:
        line = box.get(timeout=STARTUP_TIMEOUT_S)
    except queue.Empty:
        proc.kill()
        raise RuntimeError(f"target printed nothing in {STARTUP_TIMEOUT_S} s") from None
    if not line:
        raise RuntimeError(f"target exited (status {proc.wait(timeout=5)}) before its hello")
    hello = json.loads(line)
    if "error" in hello:
        proc.kill()
        raise RuntimeError(f"target: {hello['error']}")
    return proc, hello


def stop_target(proc: subprocess.Popen) -> None:
    try:
        proc.stdin.close()
        proc.wait(timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait(timeout=10)


def serve_target(hello: dict) -> None:
    """The target's life: its hello, then wait for the end of stdin (reads are one-sided)."""
    emit(hello)
    sys.stdin.read()
    sys.stderr.flush()
    os._exit(0)  # as reader_main: no library teardown at exit


class Driver:
    """One peer system in the reader process, over ``dst`` (the local buffer, registered)."""

    dst: np.ndarray

    def batch(self, remote_off: np.ndarray, local_off: np.ndarray, length: np.ndarray) -> object:
        """A reusable READ batch of these ranges (bytes; offsets into the target's buffer / dst)."""
        raise NotImplementedError

    def start(self, batch: object) -> None:
        raise NotImplementedError

    def wait(self, batch: object, deadline: float) -> None:
        """Returns once every byte of ``batch`` is in place; raises past ``deadline`` (perf_counter)."""
        raise NotImplementedError

    def release(self, batch: object) -> None:
        """Frees a batch that will not be posted again."""

    def close(self) -> None:
        pass


def _check(dst: np.ndarray, expected: np.ndarray, what: str) -> None:
    if not np.array_equal(dst, expected):
        bad = int(np.flatnonzero(dst != expected)[0])
        raise RuntimeError(f"{what}: bytes differ from byte {bad} on")


def serve_reader(driver: Driver, src: np.ndarray, total: int, seed: int,
                 commands=sys.stdin) -> None:
    """The reader's command loop (see the module docstring); ``src`` is the target's bytes."""
    batches: list = []
    for line in commands:
        cmd, _, arg = line.strip().partition(" ")
        try:
            if cmd in ("prepare", "ranges"):
                for b in batches:
                    driver.release(b)
                batches = []
            if cmd == "prepare":
                bs = int(arg)
                perm = permutation(bs, total, seed)
                n = len(perm)
                batches = [driver.batch(perm * bs, np.arange(n, dtype=np.int64) * bs, np.full(n, bs, np.int64))]
                expected = src[:n * bs].reshape(n, bs)[perm].reshape(-1)
                _one_checked_pass(driver, batches, expected, n * bs, f"{bs}-byte blocks")
                emit({"perm_sha": perm_digest(perm)})
            elif cmd == "ranges":
                with open(arg) as f:
                    layers = [np.asarray(r, np.int64).reshape(-1, 3) for r in json.load(f)["layers"]]
                batches = [driver.batch(r[:, 0], r[:, 1], r[:, 2]) for r in layers]
                expected = np.zeros_like(driver.dst)
                for r in layers:
                    for ro, lo, ln in r:
                        expected[lo:lo + ln] = src[ro:ro + ln]
                _one_checked_pass(driver, batches, expected, len(expected), "KV ranges")
                emit({"layers": len(batches)})
            elif cmd == "passes":
                emit({"pass_ns": [_timed(driver, batches)[-1] for _ in range(int(arg))]})
            elif cmd == "layers":
                emit({"layer_ns": [_timed(driver, batches) for _ in range(int(arg))]})
            else:
                emit({"error": f"unknown command {cmd!r}"})
        except Exception as e:  # reported to transfer_bw.py, which fails this system's row
            emit({"error": f"{type(e).__name__}: {e}"})


def _one_checked_pass(driver: Driver, batches: list, expected: np.ndarray, n: int, what: str) -> None:
    driver.dst[:n] = 0
    _timed(driver, batches)
    _check(driver.dst[:n], expected[:n], what)


def _timed(driver: Driver, batches: list) -> list[int]:
    """Posts every batch, then waits for each in order; ns from the start to each one's end."""
    t0 = time.perf_counter_ns()
    deadline = time.perf_counter() + PASS_TIMEOUT_S
    for b in batches:
        driver.start(b)
    out = []
    for b in batches:
        driver.wait(b, deadline)
        out.append(time.perf_counter_ns() - t0)
    return out


def reader_main(make_driver: Callable[[], tuple[Driver, dict, np.ndarray]], total: int, seed: int) -> int:
    """Builds the driver (hello ``{"error"}`` if it cannot), says hello, serves commands."""
    try:
        driver, config, src = make_driver()
    except Exception as e:
        emit({"error": f"{type(e).__name__}: {e}"})
        return 2
    emit({"config": config, "pid": os.getpid()})
    try:
        serve_reader(driver, src, total, seed)
    finally:
        driver.close()
    sys.stderr.flush()
    os._exit(0)  # NIXL 1.5's UCX backend can crash in its static destructors at exit (status 139)
