"""A standalone read target: registers a buffer of seeded random bytes and serves it.

    python -m kvtransfer.testing.target --bytes 64M --seed 7 [--listen-host 127.0.0.1]

It prints one JSON line, ``{"engine": HEX, "region": HEX, "pid": N}`` (the
descriptors' bytes), then serves reads from C threads while it waits on stdin for
commands, one per line: ``deregister`` (answers ``deregistered``), ``ping``
(answers ``pong``), ``stats`` (answers the tcp server's counts as one JSON line),
``allow TOKEN_HEX [TTL_S]`` (answers ``allowed``), ``revoke TOKEN_HEX`` (answers the
number of connections dropped), ``exit``. ``--require-tokens`` makes its tcp server
admit allowed tokens only. End of stdin exits too. The demo, the benchmark and
the tests use it as "the other process"; :func:`seeded_bytes` gives the reader the
same bytes to check against.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from ..engine import Engine
from ..memory import alloc_host


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
    ap.add_argument("--idle-timeout", type=float, default=None, help="tcp server idle timeout, seconds")
    ap.add_argument("--max-conns", type=int, default=None, help="tcp server connections in total")
    ap.add_argument("--max-conns-per-peer", type=int, default=None, help="tcp server connections per address")
    ap.add_argument("--shared", action="store_true", help="hold the bytes in shared memory (readable over map)")
    ap.add_argument("--require-tokens", action="store_true", help="admit tcp hellos with an allowed token only")
    args = ap.parse_args(argv)

    buf = seeded_bytes(args.bytes, args.seed, alloc_host(args.bytes, shared=args.shared))
    with Engine(listen_host=args.listen_host, io_timeout=args.io_timeout, tcp_idle_timeout=args.idle_timeout,
                tcp_max_connections=args.max_conns, tcp_max_connections_per_peer=args.max_conns_per_peer) as eng:
        region, desc = eng.register(buf)
        if args.require_tokens:
            eng.require_tokens()
        print(json.dumps({"engine": eng.descriptor.to_bytes().hex(), "region": desc.to_bytes().hex(),
                          "pid": eng.descriptor.pid}), flush=True)
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "deregister":
                region.close()
                print("deregistered", flush=True)
            elif cmd == "ping":
                print("pong", flush=True)
            elif cmd == "stats":
                print(json.dumps(eng.server_stats()), flush=True)
            elif cmd.startswith("allow "):
                token, *ttl = cmd.split()[1:]
                eng.allow_token(bytes.fromhex(token), float(ttl[0]) if ttl else None)
                print("allowed", flush=True)
            elif cmd.startswith("revoke "):
                print(eng.revoke_token(bytes.fromhex(cmd.split()[1])), flush=True)
            elif cmd == "exit":
                break
    return 0


if __name__ == "__main__":
    sys.exit(main())
