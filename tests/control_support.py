"""Test support for the control plane: synthetic prefill processes and decode pools.

A prefill is ``python -m kvtransfer.testing.synthetic`` (its own process, engine and KV pool);
the decode side is usually this test process (:func:`decode_side`). Every wait has a
deadline; processes are stopped by pid at teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import pytest
import zmq

from kvtransfer import Engine, alloc_host
from kvtransfer.control import ControlClient
from kvtransfer.control import messages as m
from kvtransfer.control import CurveServerKeys
from kvtransfer.kv import BlockPool, CompatInfo, KVLayout
from kvtransfer.testing.synthetic import SyntheticPrefill
from kvtransfer.testing.children import start_child, stop_child
from support import pump_lines

MODEL = "synthetic-test-model"
#: a small Llama-like pool: 4 layers, 4 KV heads x 32 dims, bf16, 16-token blocks
BASE = dict(kind="flash", num_layers=4, num_blocks=96, block_size=16, num_kv_heads=4, head_dim=32,
            dtype="bfloat16")
REPLY_S = 10.0


@dataclass
class Prefill:
    proc: subprocess.Popen
    endpoint: str
    layout: KVLayout
    lines: "queue.Queue[str | None]"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def command(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        try:
            line = self.lines.get(timeout=REPLY_S)
        except queue.Empty:
            pytest.fail(f"synthetic prefill pid {self.pid}: no answer to {cmd!r} within {REPLY_S} s")
        if line is None:
            pytest.fail(f"synthetic prefill pid {self.pid} exited (status {self.proc.poll()})")
        return json.loads(line)

    def stats(self) -> dict:
        return self.command("stats")

    def wait_pool_idle(self, timeout: float) -> dict:
        """Polls until every block is back in the pool; fails with the last stats."""
        end = time.monotonic() + timeout
        while True:
            s = self.stats()
            if s["used_blocks"] == 0 and s["pinned_requests"] == 0:
                return s
            if time.monotonic() > end:
                pytest.fail(f"prefill pool not idle {timeout} s later: {s}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=REPLY_S)


class PrefillLauncher:
    def __init__(self) -> None:
        self.procs: list[Prefill] = []

    def start(self, layout: KVLayout, *, lease: float = 5.0, model: str = MODEL, extra: tuple[str, ...] = ()
              ) -> Prefill:
        fields = {f: getattr(layout, f) for f in layout.__struct_fields__}
        cmd = [sys.executable, "-m", "kvtransfer.testing.synthetic", "--layout", json.dumps(fields), "--model", model,
               "--lease", str(lease), *extra]
        proc, hello = start_child(cmd, timeout=60, what="synthetic prefill")
        lines: "queue.Queue[str | None]" = queue.Queue()
        threading.Thread(target=pump_lines, args=(proc.stdout, lines), daemon=True).start()
        p = Prefill(proc, hello["endpoint"], layout, lines)
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            if p.proc.poll() is None:
                stop_child(p.proc, timeout=10)


class Raw:
    """A bare DEALER socket speaking (or not) the protocol."""

    def __init__(self, endpoint: str, ctx: zmq.Context | None = None):
        """``ctx``: a context to share (many sockets); default one of its own."""
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint)

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def send_msg(self, msg) -> None:
        self.sock.send_multipart(m.encode(msg))

    def recv(self, timeout_ms: int = int(REPLY_S * 1000)):
        if not self.sock.poll(timeout_ms):
            pytest.fail(f"no reply within {timeout_ms} ms")
        return m.decode_to_decode(self.sock.recv_multipart())

    def hello(self, engine: Engine, layout: KVLayout) -> m.Welcome:
        self.send_msg(m.Hello(engine=engine.descriptor.to_bytes(), layout=layout,
                              compat=CompatInfo.of(layout, MODEL), name="raw"))
        reply = self.recv()
        assert isinstance(reply, m.Welcome), reply
        return reply

    def alive(self) -> None:
        self.send_msg(m.Ping(nonce=7))
        assert self.recv() == m.Pong(nonce=7)

    def close(self) -> None:
        self.sock.close(linger=0)
        if self._own_ctx:
            self.ctx.term()


@dataclass
class DecodeSide:
    """An engine and a registered KV pool in this process."""
    engine: Engine
    layout: KVLayout
    buffers: list
    regions: list
    pool: BlockPool

    def client(self, prefill: Prefill | str, *, transport: str | None = None, timeout: float = 5.0,
               model: str = MODEL, **kw) -> ControlClient:
        endpoint = prefill if isinstance(prefill, str) else prefill.endpoint
        return ControlClient(endpoint, engine=self.engine, regions=self.regions, layout=self.layout,
                             compat=CompatInfo.of(self.layout, model), timeout=timeout, transport=transport, **kw)

    def scattered_blocks(self, n: int, rng) -> list[int]:
        """``n`` free blocks in random order (reads must not depend on contiguity)."""
        ids = self.pool.alloc(self.pool.num_free)
        rng.shuffle(ids)
        keep, back = ids[:n], ids[n:]
        self.pool.free(back)
        return keep


@contextlib.contextmanager
def decode_side(layout: KVLayout) -> Iterator[DecodeSide]:
    with Engine() as eng:
        buffers = [alloc_host(layout.region_nbytes(r)) for r in range(layout.num_regions)]
        regions = [eng.register(b)[0] for b in buffers]
        yield DecodeSide(eng, layout, buffers, regions, BlockPool(layout.num_blocks))


def payload(num_tokens: int, seed: int, **extra) -> bytes:
    return json.dumps({"num_tokens": num_tokens, "seed": seed, **extra}).encode()


@contextlib.contextmanager
def prefill_here(layout: KVLayout, lease: float = 5.0, curve: CurveServerKeys | None = None, **server_options
                 ) -> Iterator[SyntheticPrefill]:
    """A synthetic prefill worker in this process: its server's options, state and
    metrics are at hand. Its engine and control socket are real (loopback)."""
    p = SyntheticPrefill(layout, MODEL, "tcp://127.0.0.1:0", lease, curve, server_options=server_options)
    try:
        yield p
    finally:
        p.close()


def wait_until(ok: Callable[[], bool], timeout: float) -> None:
    """Polls ``ok`` until it holds; fails the test after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > end:
            pytest.fail(f"not so within {timeout} s")
        time.sleep(0.05)
