"""A synthetic prefill worker: a registered KV pool filled with a known pattern, served
over the control plane layer by layer — "the other process" of the control plane's
tests and benchmark, as :mod:`kvtransfer.testing.target` is the engine's.

    python -m kvtransfer.testing.synthetic --layout '{"kind": "flash", "num_layers": 4, ...}' \\
        [--model NAME] [--endpoint tcp://127.0.0.1:0] [--lease 10] [--curve-secret F --curve-clients DIR]

It prints one JSON line ``{"endpoint": ..., "pid": N}``, then serves until end of stdin.
Stdin commands, one JSON reply line each: ``stats``; ``open ID TOKENS SEED [LAYER_DELAY]``
(a request started by the prefill side, for ``Subscribe``); ``exit``.

A Submit's payload is JSON: ``{"num_tokens": N, "seed": S}`` plus optional
``"layer_delay"`` (seconds of "compute" per layer), ``"fail_after"`` (fail after that
many layers), ``"publish": "at_end"`` (announce every layer at once when all are
written) and ``"fill": false`` (skip writing: the benchmark's repeated requests). The
result is JSON: ``num_tokens``, ``blocks`` and ``published_at`` (``time.monotonic()``
when the last layer was announced; the clock is system-wide, so a reader on this host
can compare it with its own). Every element of the request's KV is :func:`kv_pattern` of (seed, layer, K/V,
token, global head, dim), wherever its block is, so a reader with any layout can check
what landed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import sys
import threading
import time

import numpy as np

from ..control import ControlServer, CurveServerKeys, Limits, PrefillRequest
from ..engine import Engine
from ..errors import KVTransferError
from ..kv import BlockPool, CompatInfo, KVLayout
from ..memory import alloc_host

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def kv_pattern(seed: int, layer: int, num_tokens: int, heads: tuple[int, int], head_dim: int, num_kv: int,
               itemsize: int) -> np.ndarray:
    """The request's KV of one layer as raw element bits: ``[num_kv, num_tokens, heads,
    head_dim]`` unsigned ints of ``itemsize`` bytes. Distinct tokens, heads, dims and K/V
    give distinct values (odd multipliers mod 2**16), so a misplaced range shows."""
    base = np.uint32((seed * 0x9E3779B1 + layer * 0x85EBCA77) & 0xFFFFFFFF)
    k = np.arange(num_kv, dtype=np.uint32)[:, None, None, None] * np.uint32(0xC2B2AE3D)
    t = np.arange(num_tokens, dtype=np.uint32)[None, :, None, None] * np.uint32(0x27D4EB2F)
    h = np.arange(*heads, dtype=np.uint32)[None, None, :, None] * np.uint32(0x165667B1)
    d = np.arange(head_dim, dtype=np.uint32)[None, None, None, :] * np.uint32(0x2F0B3C6D)
    return (base + k + t + h + d).astype(_UINT[itemsize])


def _token_index(layout: KVLayout, blocks, num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    t = np.arange(num_tokens)
    return np.asarray(blocks, dtype=np.int64)[t // layout.block_size], t % layout.block_size


def write_request(layout: KVLayout, buffers: list[np.ndarray], layer: int, blocks, num_tokens: int,
                  seed: int) -> None:
    """Writes the pattern of one layer of a request into its blocks."""
    region, _ = layout.layer_offset(layer)
    view = layout.view(buffers[region], layer).view(_UINT[layout.itemsize])
    b, s = _token_index(layout, blocks, num_tokens)
    view[:, b, s] = kv_pattern(seed, layer, num_tokens, layout.head_range, layout.head_dim, layout.num_kv,
                               layout.itemsize)


def check_request(layout: KVLayout, buffers: list[np.ndarray], blocks, num_tokens: int, seed: int,
                  heads: tuple[int, int] | None = None, layers=None) -> None:
    """Raises AssertionError naming the first layer whose tokens (of ``heads``, default
    all this pool holds) differ from the pattern."""
    lo, hi = heads or layout.head_range
    first = layout.head_range[0]
    b, s = _token_index(layout, blocks, num_tokens)
    for layer in (range(layout.num_layers) if layers is None else layers):
        region, _ = layout.layer_offset(layer)
        view = layout.view(buffers[region], layer).view(_UINT[layout.itemsize])
        got = view[:, b, s][:, :, lo - first:hi - first]
        want = kv_pattern(seed, layer, num_tokens, (lo, hi), layout.head_dim, layout.num_kv, layout.itemsize)
        if not np.array_equal(got, want):
            bad = np.argwhere(got != want)[0]
            raise AssertionError(f"layer {layer}: K/V {bad[0]}, token {bad[1]}, head {lo + bad[2]}, dim {bad[3]}: "
                                 f"got {got[tuple(bad)]:#x}, expected {want[tuple(bad)]:#x} "
                                 f"({int((got != want).sum())} elements differ)")


class SyntheticPrefill:
    """The worker: one compute thread takes requests in order and writes their pattern."""

    def __init__(self, layout: KVLayout, model: str, endpoint: str, lease_s: float, curve=None,
                 listen_host: str = "127.0.0.1", scatter_seed: int | None = None,
                 server_options: dict | None = None):
        """``server_options``: more keyword arguments of the ControlServer (limits, registry)."""
        self.layout = layout
        self.buffers = [alloc_host(layout.region_nbytes(r)) for r in range(layout.num_regions)]
        self.pool = BlockPool(layout.num_blocks)
        if scatter_seed is not None:  # a pool that has served a while: its free list is shuffled
            ids = self.pool.alloc(layout.num_blocks)
            np.random.default_rng(scatter_seed).shuffle(ids)
            self.pool.free(ids)
        self._work: "queue.Queue[tuple[PrefillRequest, dict] | None]" = queue.Queue()
        self.engine = Engine(listen_host=listen_host)
        try:
            self.regions = [self.engine.register(b)[0] for b in self.buffers]
            self.server = ControlServer(endpoint, engine=self.engine, regions=self.regions, layout=layout,
                                        compat=CompatInfo.of(layout, model), pool=self.pool, lease_s=lease_s,
                                        on_submit=self._submitted, curve=curve, name="synthetic-prefill",
                                        **(server_options or {}))
        except BaseException:  # e.g. the endpoint is taken: no engine thread may outlive us
            self.engine.close()
            raise
        self._thread = threading.Thread(target=self._compute, name="synthetic-compute", daemon=True)
        self._thread.start()

    def _submitted(self, req: PrefillRequest) -> None:
        try:
            spec = json.loads(req.payload)
            int(spec["num_tokens"]), int(spec["seed"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"payload must be JSON with num_tokens and seed: {e}") from None
        self._work.put((req, spec))

    def open(self, request_id: str, num_tokens: int, seed: int, layer_delay: float = 0.0) -> None:
        req = self.server.open_request(request_id)
        self._work.put((req, {"num_tokens": num_tokens, "seed": seed, "layer_delay": layer_delay}))

    def _compute(self) -> None:
        while (item := self._work.get()) is not None:
            req, spec = item
            try:
                self._run(req, spec)
            except KVTransferError as e:
                req.fail(str(e), code="prefill_failed")
            except Exception as e:  # a bug here must not strand the request's blocks
                logging.exception("synthetic prefill: request %r", req.request_id)
                req.fail(f"{type(e).__name__}: {e}", code="prefill_failed")

    def _run(self, req: PrefillRequest, spec: dict) -> None:
        n, seed = int(spec["num_tokens"]), int(spec["seed"])
        blocks = self.pool.alloc(self.layout.blocks_for(n))
        req.pin(blocks, n)  # from here on the server owns the blocks
        ready = []
        for layer in range(self.layout.num_layers):
            if req.cancelled:
                return req.fail("cancelled: no reader wants it anymore", code="cancelled")
            if layer == spec.get("fail_after"):
                return req.fail(f"synthetic failure after {layer} layers")
            if spec.get("fill", True):
                write_request(self.layout, self.buffers, layer, blocks, n, seed)
            time.sleep(float(spec.get("layer_delay", 0)))
            if spec.get("publish") == "at_end":
                ready.append(layer)
            else:
                req.layer_ready(layer)
        published_at = time.monotonic()
        if ready:
            req.layer_ready(*ready)
        req.finish(json.dumps({"num_tokens": n, "blocks": blocks, "published_at": published_at}).encode())

    def stats(self) -> dict:
        s = self.server.stats()
        return {"free_blocks": s.free_blocks, "used_blocks": s.used_blocks, "pinned_requests": s.pinned_requests,
                "leases_expired": s.leases_expired, "errors": s.errors, "sessions": s.sessions,
                "waiting": s.waiting}

    def close(self) -> None:
        self._work.put(None)
        self._thread.join(10)
        self.server.close()
        self.engine.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvtransfer.testing.synthetic", description=__doc__.split("\n\n")[0])
    ap.add_argument("--layout", required=True, help="KVLayout fields as JSON")
    ap.add_argument("--model", default="synthetic")
    ap.add_argument("--endpoint", default="tcp://127.0.0.1:0")
    ap.add_argument("--listen-host", default="127.0.0.1", help="the transfer engine's tcp address")
    ap.add_argument("--lease", type=float, default=10.0, help="seconds blocks stay pinned without renewal")
    ap.add_argument("--scatter-seed", type=int, help="shuffle the pool's free list (scattered blocks)")
    ap.add_argument("--curve-secret", help="CURVE secret key file (enables CurveZMQ)")
    ap.add_argument("--curve-clients", help="folder of accepted clients' public keys")
    ap.add_argument("--limits", default="{}", help="kvtransfer.control.Limits fields as JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="synthetic-prefill %(levelname)s %(message)s")
    curve = CurveServerKeys(args.curve_secret, args.curve_clients) if args.curve_secret else None
    worker = SyntheticPrefill(KVLayout(**json.loads(args.layout)), args.model, args.endpoint, args.lease, curve,
                              args.listen_host, args.scatter_seed,
                              server_options={"limits": Limits(**json.loads(args.limits))})
    print(json.dumps({"endpoint": worker.server.endpoint, "pid": os.getpid()}), flush=True)
    try:
        for line in sys.stdin:
            cmd = line.split()
            if not cmd:
                continue
            if cmd[0] == "exit":
                break
            if cmd[0] == "stats":
                reply = worker.stats()
            elif cmd[0] == "open" and len(cmd) in (4, 5):
                worker.open(cmd[1], int(cmd[2]), int(cmd[3]), float(cmd[4]) if len(cmd) == 5 else 0.0)
                reply = {"opened": cmd[1]}
            else:
                reply = {"error": f"unknown command {line.strip()!r}"}
            print(json.dumps(reply), flush=True)
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
