"""The sending half of the ``zmq`` baseline in bench/transfer_bw.py: the CPU-mediated path.

    python bench/zmq_sender.py --bytes 256M --seed 0

Holds the same seeded bytes a ``kvtransfer.testing.target`` with that seed serves, binds a
PUSH socket (data) and a REP socket (control) on random loopback ports, and prints
one JSON line ``{"data": ENDPOINT, "ctrl": ENDPOINT, "pid": N}``. Control requests
(multipart), each answered before anything else happens:

* ``[b"perm", b"BLOCK_BYTES", PERM]``: the block size and the permutation (int64 bytes)
  for the next passes; answers ``b"ok"``.
* ``[b"go"]``: answers ``b"ok"``, then pushes every block in permutation order, one
  message per block, zero-copy (``copy=False``) from memoryview slices of the bytes.

Anything else answers ``b"error: ..."``. End of stdin (or the parent going away) exits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import zmq

from kvtransfer import alloc_host
from kvtransfer.testing.target import parse_size, seeded_bytes

#: Seconds a blocked send may wait for the reader before the sender gives up.
SEND_TIMEOUT_S = 30.0


def bind_loopback(sock: zmq.Socket) -> str:
    """Binds ``sock`` to a random loopback port and returns the endpoint."""
    sock.bind("tcp://127.0.0.1:*")
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def push_blocks(push: zmq.Socket, data: memoryview, block_bytes: int, perm: np.ndarray) -> None:
    """One pass: block ``perm[i]`` is the i-th message."""
    for off in (perm * block_bytes).tolist():
        push.send(data[off:off + block_bytes], copy=False)


def handle(msg: list[bytes], data: memoryview, state: dict, ctrl: zmq.Socket, push: zmq.Socket) -> None:
    """Answers one control request (and runs the pass it asks for)."""
    cmd = msg[0]
    if cmd == b"perm" and len(msg) == 3:
        block_bytes = int(msg[1])
        perm = np.frombuffer(msg[2], dtype=np.int64).copy()
        if block_bytes <= 0 or len(perm) == 0 or int(perm.max()) * block_bytes + block_bytes > len(data) \
                or int(perm.min()) < 0:
            ctrl.send(b"error: permutation or block size out of range")
            return
        state["block_bytes"], state["perm"] = block_bytes, perm
        ctrl.send(b"ok")
    elif cmd == b"go" and len(msg) == 1:
        if "perm" not in state:
            ctrl.send(b"error: go before perm")
            return
        ctrl.send(b"ok")
        push_blocks(push, data, state["block_bytes"], state["perm"])
    else:
        ctrl.send(b"error: unknown request " + cmd[:32])


def serve(nbytes: int, seed: int) -> int:
    buf = seeded_bytes(nbytes, seed, alloc_host(nbytes))
    data = memoryview(buf)  # zero-copy sends reference this; it outlives every send
    parent = os.getppid()
    ctx = zmq.Context()
    ctrl = ctx.socket(zmq.REP)
    push = ctx.socket(zmq.PUSH)
    for s in (ctrl, push):
        s.setsockopt(zmq.LINGER, 0)
    push.setsockopt(zmq.SNDTIMEO, int(SEND_TIMEOUT_S * 1000))
    try:
        print(json.dumps({"data": bind_loopback(push), "ctrl": bind_loopback(ctrl), "pid": os.getpid()}),
              flush=True)
        poller = zmq.Poller()
        poller.register(ctrl, zmq.POLLIN)
        poller.register(sys.stdin.fileno(), zmq.POLLIN)
        state: dict = {}
        while True:
            events = dict(poller.poll(1000))
            if sys.stdin.fileno() in events and not sys.stdin.readline():
                return 0  # end of stdin: the reader is done
            if os.getppid() != parent:
                return 0  # the reader died without closing our stdin
            if ctrl in events:
                try:
                    handle(ctrl.recv_multipart(), data, state, ctrl, push)
                except zmq.Again:
                    print("zmq_sender: reader stopped receiving; exiting", file=sys.stderr)
                    return 1
    finally:
        ctrl.close(linger=0)
        push.close(linger=0)
        ctx.term()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bytes", type=parse_size, default=64 << 20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    return serve(args.bytes, args.seed)


if __name__ == "__main__":
    sys.exit(main())
