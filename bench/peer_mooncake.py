"""Mooncake's Transfer Engine as a peer of bench/transfer_bw.py: system mooncake-tcp.

    .venv-peers/bin/python bench/peer_mooncake.py --bytes 256M --seed 0   # the reader

The reader starts its target (``--role target``); both initialize a ``TransferEngine``
with metadata ``P2PHANDSHAKE`` (no metadata server: the reader names the target by
``host:rpc_port``) and protocol ``tcp``; each register their buffer. A batch is one
``batch_transfer_async_read`` of all its ranges, waited with ``get_batch_transfer_status``.

Configuration (printed in the hello): the per-peer TCP queues are raised to hold a whole
batch (``MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER``, ``MC_TCP_MAX_PENDING_ADMISSIONS_PER_PEER``;
with the defaults a batch of thousands of ranges is refused or trickles), unless already
set in the environment.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peer_common import (Driver, parse_size, protect_stdout, reader_main, seeded_bytes, serve_target,  # noqa: E402
                         start_target, stop_target)

QUEUE_ENV = ("MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER", "MC_TCP_MAX_PENDING_ADMISSIONS_PER_PEER")
QUEUE_DEPTH = 32768  # the largest it takes (0.3.13: 65536 is "invalid", the default 1024 stays)


def make_engine(host: str, protocol: str):
    for k in QUEUE_ENV:
        os.environ.setdefault(k, str(QUEUE_DEPTH))
    from mooncake.engine import TransferEngine

    eng = TransferEngine()
    rc = eng.initialize(host, "P2PHANDSHAKE", protocol, "")
    if rc != 0:
        raise RuntimeError(f"TransferEngine.initialize({host!r}, P2PHANDSHAKE, {protocol!r}) returned {rc}")
    return eng


def register(eng, buf: np.ndarray) -> None:
    rc = eng.register_memory(buf.ctypes.data, buf.nbytes)
    if rc != 0:
        raise RuntimeError(f"register_memory returned {rc}")


def target(args: argparse.Namespace) -> int:
    eng = make_engine(args.host, args.protocol)
    src = seeded_bytes(args.bytes, args.seed)
    register(eng, src)
    serve_target({"session": f"{args.host}:{eng.get_rpc_port()}", "addr": src.ctypes.data, "pid": os.getpid()})
    return 0


class MooncakeDriver(Driver):
    def __init__(self, args: argparse.Namespace, cmd: list[str]):
        self.proc, hello = start_target(cmd)
        self.session, self.remote_addr = hello["session"], int(hello["addr"])
        self.eng = make_engine(args.host, args.protocol)
        self.dst = np.zeros(args.bytes, np.uint8)
        register(self.eng, self.dst)
        self.ids: dict[int, int] = {}

    def batch(self, remote_off, local_off, length):
        return ((self.dst.ctypes.data + local_off).tolist(), (self.remote_addr + remote_off).tolist(), length.tolist())

    def start(self, b) -> None:
        bid = self.eng.batch_transfer_async_read(self.session, *b)
        if bid <= 0:
            raise RuntimeError(f"batch_transfer_async_read returned {bid}")
        self.ids[id(b)] = bid

    def wait(self, b, deadline: float) -> None:
        bid = self.ids.pop(id(b))
        while True:
            rc = self.eng.get_batch_transfer_status([bid])
            if rc == 0:
                return
            if rc < 0:
                raise RuntimeError(f"get_batch_transfer_status returned {rc}")
            if time.perf_counter() > deadline:
                raise RuntimeError("mooncake batch did not finish in time")

    def close(self) -> None:
        stop_target(self.proc)


def reader(args: argparse.Namespace) -> int:
    cmd = [sys.executable, os.path.abspath(__file__), "--role", "target", "--bytes", str(args.bytes),
           "--seed", str(args.seed), "--host", args.host, "--protocol", args.protocol]

    def make():
        from importlib.metadata import version

        driver = MooncakeDriver(args, cmd)
        config = {"library": f"mooncake-transfer-engine-non-cuda {version('mooncake-transfer-engine-non-cuda')}",
                  "protocol": args.protocol, "metadata": "P2PHANDSHAKE",
                  **{k: os.environ[k] for k in QUEUE_ENV},
                  "request": "batch_transfer_async_read of the whole batch"}
        return driver, config, seeded_bytes(args.bytes, args.seed)

    return reader_main(make, args.bytes, args.seed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role", choices=("reader", "target"), default="reader")
    ap.add_argument("--bytes", type=parse_size, default=256 << 20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--protocol", default="tcp")
    args = ap.parse_args(argv)
    protect_stdout()
    return target(args) if args.role == "target" else reader(args)


if __name__ == "__main__":
    sys.exit(main())
