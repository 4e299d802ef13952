"""The soak's parts: a sampler of every process's RSS, descriptors and threads, and the
loads that run together (engine reads with bytes checked, HTTP completions with tokens
checked, hostile tcp clients). Each load runs in a thread until ``stop`` is set, counts
what it did, and records the first wrong result it saw instead of raising in a thread.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import kvtransfer

HELLO = struct.Struct("<IHHiI16s")
HDR = struct.Struct("<IIQ")
ENT = struct.Struct("<QQQQ")
HELLO_MAGIC, REQ_MAGIC = 0x4854564B, 0x5254564B


def proc_sample(pid: int) -> dict[str, int]:
    """RSS (KiB), open descriptors and threads of ``pid`` now."""
    status = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            status[k] = v.split()[0] if v.split() else ""
    return {"rss_kib": int(status["VmRSS"]), "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(status["Threads"])}


class Sampler(threading.Thread):
    """Samples named processes every ``every`` seconds: ``samples[name]`` is a list of
    (seconds since start, sample)."""

    def __init__(self, pids: dict[str, int], every: float = 1.0):
        super().__init__(daemon=True, name="soak-sampler")
        self.pids, self.every = pids, every
        self.samples: dict[str, list[tuple[float, dict[str, int]]]] = {n: [] for n in pids}
        self.stop = threading.Event()
        self.t0 = time.monotonic()

    def sample_now(self) -> dict[str, dict[str, int]]:
        now = {n: proc_sample(p) for n, p in self.pids.items()}
        for n, s in now.items():
            self.samples[n].append((time.monotonic() - self.t0, s))
        return now

    def run(self) -> None:
        while not self.stop.wait(self.every):
            try:
                self.sample_now()
            except FileNotFoundError:  # a process died: the test's checks say which
                return

    def peak(self, name: str, key: str) -> int:
        return max(s[key] for _, s in self.samples[name])


@dataclass
class Load:
    """What one load thread did: ``ok`` results, and the first ``error`` it met."""
    name: str
    ok: int = 0
    bytes: int = 0
    error: str | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self, body: Callable[["Load"], None]) -> "Load":
        def run() -> None:
            try:
                while not self.stop.is_set() and self.error is None:
                    body(self)
            except Exception as e:  # recorded, then failed by the test in the main thread
                self.error = f"{type(e).__name__}: {e}"
        self.thread = threading.Thread(target=run, daemon=True, name=f"soak-{self.name}")
        self.thread.start()
        return self

    def finish(self, timeout: float) -> None:
        self.stop.set()
        assert self.thread is not None
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.error = self.error or f"did not stop within {timeout} s"


def reads(engine: kvtransfer.Engine, peer: kvtransfer.Peer, remote: kvtransfer.RegionDescriptor,
          expected: np.ndarray, seed: int) -> Callable[[Load], None]:
    """Batches of random ranges of ``remote`` read into one local buffer, bytes checked."""
    rng = np.random.default_rng(seed)
    buf = kvtransfer.alloc_host(8 << 20)
    region, _ = engine.register(buf)

    def step(load: Load) -> None:
        n = int(rng.integers(1, 64))
        lens = rng.integers(1, (8 << 20) // n, n)
        roffs = rng.integers(0, len(expected) - lens)
        loffs = np.concatenate(([0], np.cumsum(lens)[:-1]))
        peer.read([(region, int(lo), remote, int(ro), int(ln)) for lo, ro, ln in zip(loffs, roffs, lens)]
                  ).wait(timeout=60)
        for lo, ro, ln in zip(loffs, roffs, lens):
            if not np.array_equal(buf[lo:lo + ln], expected[ro:ro + ln]):
                raise AssertionError(f"wrong bytes: remote [{ro}, +{ln}) landed at {lo}")
        load.ok += 1
        load.bytes += int(lens.sum())
    return step


def hostile(host: str, ports: list[int], engine_ids: list[bytes], region: tuple[int, int],
            hold_s: float) -> Callable[[Load], None]:
    """One round of hostile clients against each tcp server: idle holders after the
    hello, a slow reader of a whole-region request, garbage frames, a trickled hello.
    Everything it opens is closed before the round ends (the servers' own timeouts
    usually close them first)."""
    rnd = random.Random(7)

    def dial(port: int) -> socket.socket:
        s = socket.create_connection((host, port), timeout=5)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return s

    def step(load: Load) -> None:
        socks: list[socket.socket] = []
        try:
            for port, eid in zip(ports, engine_ids):
                hello = HELLO.pack(HELLO_MAGIC, 1, 0, 0, 0, eid)
                for _ in range(8):  # idle holders
                    s = dial(port)
                    s.sendall(hello)
                    socks.append(s)
                s = dial(port)  # a slow reader (of the target's region; refused elsewhere)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
                s.sendall(hello + HDR.pack(REQ_MAGIC, 1, 1) + ENT.pack(region[0], region[1], 0, 8 << 20))
                socks.append(s)
                for _ in range(3):  # garbage: random bytes, a bad frame after a good hello
                    with dial(port) as g:
                        try:
                            g.sendall(rnd.randbytes(rnd.randint(1, 4096)))
                            g.sendall(hello + rnd.randbytes(64))
                        except OSError:
                            pass
                s = dial(port)  # a hello one byte at a time, finished by the loop below
                s.send(hello[:1])
                socks.append(s)
            end = time.monotonic() + hold_s
            while time.monotonic() < end and not load.stop.is_set():
                for s in socks:
                    try:
                        s.recv(1024, socket.MSG_DONTWAIT)
                    except (BlockingIOError, OSError):
                        pass
                time.sleep(0.2)
            load.ok += 1
        finally:
            for s in socks:
                s.close()
    return step
