"""Two hosts, like ib_read_bw: ``transfer_bw.py --serve`` on one, ``--connect HOST:PORT`` on the other.

    host A$ .venv/bin/python bench/transfer_bw.py --serve --listen-host 0.0.0.0 --total 1G
    host B$ .venv/bin/python bench/transfer_bw.py --connect A:18515 --transports tcp

The server registers ``--total`` seeded bytes in an engine whose tcp server listens on
``--listen-host:--port+1`` and answers, on ``--port`` (a ZeroMQ REP socket), each reader's
``hello`` with the descriptors, the size and the seed; reads are then one-sided. The
reader takes the size and seed from the server, so it checks the same bytes. shm reads
another process's memory on the same host: across hosts it is refused.
"""

from __future__ import annotations

import json
import signal
import sys
import time

import msgspec
import zmq

from kvtransfer import Engine, EngineDescriptor, alloc_host
from kvtransfer.testing.target import seeded_bytes

DEFAULT_PORT = 18515  # ib_read_bw's
HELLO_TIMEOUT_S = 10.0
CROSS_HOST = ("tcp", "verbs")


class RemoteError(Exception):
    """The server did not answer, or answered something else than a hello."""


def split_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65535:
        raise ValueError(f"--connect wants HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def serve(total: int, seed: int, listen_host: str, port: int, engine_opts: dict, serve_s: float | None) -> int:
    """Serves until SIGINT/SIGTERM, or ``serve_s`` seconds; one REP socket (one reader at a time)."""
    buf = seeded_bytes(total, seed, alloc_host(total))
    with Engine(listen_host=listen_host, listen_port=port + 1, **engine_opts) as eng:
        _region, desc = eng.register(buf)
        hello = json.dumps({"engine": eng.descriptor.to_bytes().hex(), "region": desc.to_bytes().hex(),
                            "total": total, "seed": seed}).encode()
        ctx = zmq.Context()
        rep = ctx.socket(zmq.REP)
        rep.setsockopt(zmq.LINGER, 0)
        rep.setsockopt(zmq.SNDTIMEO, int(HELLO_TIMEOUT_S * 1000))
        try:
            rep.bind(f"tcp://{listen_host}:{port}")
            stop = []
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.append(1))
            shown = listen_host if listen_host not in ("0.0.0.0", "::") else "<this host's address>"
            print(f"transfer_bw: serving {total} bytes (seed {seed}), engine tcp {listen_host}:{port + 1} "
                  f"(verbs: {'yes, ' + eng.descriptor.ib_device if eng.descriptor.verbs else 'no'}); "
                  f"on the reader's host run:\n  python bench/transfer_bw.py --connect {shown}:{port} "
                  f"--transports {','.join(CROSS_HOST)}", flush=True)
            served = 0
            end = float("inf") if serve_s is None else time.monotonic() + serve_s
            while not stop and time.monotonic() < end:
                if rep.poll(200):
                    if rep.recv() == b"hello":
                        rep.send(hello)
                        served += 1
                        print(f"transfer_bw: hello #{served} answered", file=sys.stderr, flush=True)
                    else:
                        rep.send(b'{"error": "send hello"}')
        finally:
            rep.close(linger=0)
            ctx.term()
    return 0


def hello(hostport: str) -> dict:
    """The server's hello; its engine's tcp host becomes the one we reached it at when it
    listens on every address."""
    host, port = split_hostport(hostport)
    ctx = zmq.Context()
    req = ctx.socket(zmq.REQ)
    for opt in (zmq.LINGER, zmq.SNDTIMEO, zmq.RCVTIMEO):
        req.setsockopt(opt, 0 if opt == zmq.LINGER else int(HELLO_TIMEOUT_S * 1000))
    try:
        req.connect(f"tcp://{host}:{port}")
        req.send(b"hello")
        info = json.loads(req.recv())
    except zmq.Again:
        raise RemoteError(f"no answer from {host}:{port} in {HELLO_TIMEOUT_S} s (is `transfer_bw.py --serve` "
                          "running there, and the port open?)") from None
    finally:
        req.close(linger=0)
        ctx.term()
    if "error" in info:
        raise RemoteError(f"{host}:{port}: {info['error']}")
    desc = EngineDescriptor.from_bytes(bytes.fromhex(info["engine"]))
    if desc.tcp_host in ("0.0.0.0", "::", ""):
        info["engine"] = msgspec.structs.replace(desc, tcp_host=host).to_bytes().hex()
    return info
