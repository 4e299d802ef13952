"""A standalone read target: registers a buffer of seeded random bytes and serves it.

    python -m kvtransfer.target --bytes 64M --seed 7 [--listen-host 127.0.0.1]

It prints one JSON line, ``{"engine": HEX, "region": HEX, "pid": N}`` (the
descriptors' bytes), then serves reads from C threads while it waits on stdin for
commands, one per line: ``deregister`` (answers ``deregistered``), ``ping``
(answers ``pong``), ``exit``. End of stdin exits too. The demo, the benchmark and
the tests use it as "the other process"; :func:`seeded_bytes` gives the reader the
same bytes to check against.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading

import numpy as np

from .engine import Engine
from .memory import alloc_host


def parse_size(text: str) -> int:
    """'64M' -> 67108864; accepts K, M, G suffixes (powers of 1024)."""
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


def seeded_bytes(nbytes: int, seed: int, out: np.ndarray | None = None) -> np.ndarray:
    """The ``nbytes`` pseudo-random bytes a target with ``seed`` serves."""
    data = np.frombuffer(np.random.default_rng(seed).bytes(nbytes), dtype=np.uint8)
    if out is None:
        return data.copy()
    out[:nbytes] = data
    return out


class ChildError(RuntimeError):
    """A child process did not start, or printed something other than its JSON line."""


def start_child(cmd: list[str], timeout: float, what: str = "child",
                env: dict[str, str] | None = None) -> tuple[subprocess.Popen, dict]:
    """Starts ``cmd`` with stdin and stdout piped and returns it with the JSON line it
    prints first (this module's hello, or any child speaking the same way), waiting at
    most ``timeout`` seconds. A child that fails to start is killed. ``env``: variables
    set for the child on top of this process's environment."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **env} if env else None)
    box: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: box.put(proc.stdout.readline()), daemon=True).start()
    try:
        line = box.get(timeout=timeout)
        if not line:
            raise ChildError(f"{what} exited (status {proc.wait(timeout=5)}) before printing its JSON line")
        return proc, json.loads(line)
    except queue.Empty:
        proc.kill()
        proc.wait(timeout=5)
        raise ChildError(f"{what} printed nothing in {timeout} s") from None
    except json.JSONDecodeError:
        stop_child(proc)
        raise ChildError(f"{what} printed {line.strip()!r}, not its JSON line") from None


def stop_child(proc: subprocess.Popen, timeout: float = 10.0, sig: int | None = None) -> bool:
    """End of stdin (this module's signal to exit) — or, with ``sig``, that signal by pid
    (for children that do not read stdin) — then a bounded wait, then kill; the pipes
    are closed either way. Returns False when the child had to be killed."""
    if sig is None:
        _close(proc.stdin)
    elif proc.poll() is None:
        proc.send_signal(sig)
    stopped = True
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stopped = False
        proc.kill()
        proc.wait(timeout=timeout)
    _close(proc.stdin)
    _close(proc.stdout)
    return stopped


def _close(pipe) -> None:
    try:
        if pipe:
            pipe.close()
    except OSError:  # a flush into a child that is gone
        pass


def serve_device_and_host(dev, host) -> None:
    """The target process of the GPU tests (real driver or stand-in): registers `dev`
    (device memory, as Engine.register takes it) and `host`, prints one JSON line (the
    engine's and both regions' descriptors, the pid), then serves stdin until it ends:
    ``deregister`` closes the device region."""
    with Engine() as eng:
        dreg, ddesc = eng.register(dev)
        _hreg, hdesc = eng.register(host)
        print(json.dumps({"engine": eng.descriptor.to_bytes().hex(), "dev": ddesc.to_bytes().hex(),
                          "host": hdesc.to_bytes().hex(), "pid": os.getpid()}), flush=True)
        for line in sys.stdin:
            if line.strip() == "deregister":
                dreg.close()
                print("deregistered", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bytes", type=parse_size, default=64 << 20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--listen-host", default="127.0.0.1")
    ap.add_argument("--io-timeout", type=float, default=10.0)
    ap.add_argument("--shared", action="store_true", help="hold the bytes in shared memory (readable over map)")
    args = ap.parse_args(argv)

    buf = seeded_bytes(args.bytes, args.seed, alloc_host(args.bytes, shared=args.shared))
    with Engine(listen_host=args.listen_host, io_timeout=args.io_timeout) as eng:
        region, desc = eng.register(buf)
        print(json.dumps({"engine": eng.descriptor.to_bytes().hex(), "region": desc.to_bytes().hex(),
                          "pid": eng.descriptor.pid}), flush=True)
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "deregister":
                region.close()
                print("deregistered", flush=True)
            elif cmd == "ping":
                print("pong", flush=True)
            elif cmd == "exit":
                break
    return 0


if __name__ == "__main__":
    sys.exit(main())
