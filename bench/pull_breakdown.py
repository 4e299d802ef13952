"""Where one connector load's time goes, without vLLM: a KVCacheSource in a child process
(the KV shape of bench/vllm_pd.py's model: 4 layers x 2 KV heads x 32, float32, 32-token
blocks, LBHNC) and, here, the pulls a KVCacheSink makes, one at a time, with their
:class:`~kvtransfer.control.PullTimings`.

    .venv/bin/python bench/pull_breakdown.py [--tokens 128] [--loads 30] [--transport shm|tcp] [--order ...]

``--order served``: the producer serves the request before the pull starts; ``waiting``:
the pull's Subscribe is there first (as in vLLM, where the consumer asks a step before
the producer's engine serves). ``--plan-ahead``: the pull is told the producer's blocks
(as the vLLM connector does), so it plans its reads while the Subscribe travels.
Columns (ms, medians; the first pull, which connects, is left out): ``answer`` the pull's
start to the producer's first message (a waiting one includes the wait), ``plan`` that message to the plan made, ``submit..in place`` the
plan made to every layer in place (the read's submit, the read, its completion),
``xfer`` = plan + submit..in place (``kvtransfer_pull_seconds``), ``reads`` the time
reads were in flight, ``release`` every layer in place to the producer's Released (after
which the load is reported done). Every load's bytes are checked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kvtransfer.connector.core import KVCacheSink, KVCacheSource  # noqa: E402
from kvtransfer.testing.children import start_child, stop_child  # noqa: E402

MODEL = "pull-breakdown"
LAYERS, HEADS, BLOCK, DIM, BLOCKS = 4, 2, 32, 32, 256


def caches(filled: bool) -> list:
    """vLLM's CPU cache shape (LBHNC, one buffer); the producer's pages hold their index."""
    import torch
    flat = (torch.arange if filled else torch.zeros)(LAYERS * BLOCKS * HEADS * BLOCK * 2 * DIM, dtype=torch.float32)
    return list(flat.view(LAYERS, BLOCKS, HEADS, BLOCK, 2 * DIM).unbind(0))


def serve() -> None:
    """The child: serves ``{"rid", "blocks", "tokens"}`` lines, answers each with ``{}``."""
    with KVCacheSource(caches(True), model=MODEL) as src:
        print(json.dumps({"endpoint": src.endpoint}), flush=True)
        for line in sys.stdin:
            cmd = json.loads(line)
            src.serve(cmd["rid"], cmd["blocks"], cmd["tokens"])
            src.take_done()
            print("{}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--loads", type=int, default=30)
    ap.add_argument("--transport", choices=("shm", "tcp"), default="shm")
    ap.add_argument("--order", choices=("served", "waiting"), default="waiting")
    ap.add_argument("--plan-ahead", action="store_true")
    ap.add_argument("--summarize", metavar="FILE", help="only print the columns of the pulls in FILE (JSON lines "
                    "of PullTimings, as bench/vllm_pd_connector.py writes them with KVTRANSFER_PULL_TIMINGS; "
                    "its first pull, which connects, is left out)")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.summarize:
        with open(args.summarize) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        print_columns([r for r in rows if r.get("outcome", "ok") == "ok" and r["waited_s"] is not None][1:])
        return 0
    if args.serve:
        serve()
        return 0
    proc, hello = start_child([sys.executable, __file__, "--serve"], timeout=120, what="kv source")
    want, got = caches(True), caches(False)
    n = -(-args.tokens // BLOCK)
    rows = []
    try:
        with KVCacheSink(got, model=MODEL, transport=args.transport) as sink:
            for i in range(args.loads + 1):  # the first connects: not counted
                # scattered blocks (37 and 11 are prime to BLOCKS: no repeats)
                src = [37 * (i * n + k) % BLOCKS for k in range(n)]
                dst = [(11 * (i * n + k) + 5) % BLOCKS for k in range(n)]
                rid = f"r{i}"

                def serve_it() -> None:
                    proc.stdin.write(json.dumps({"rid": rid, "blocks": src, "tokens": args.tokens}) + "\n")
                    proc.stdin.flush()
                    proc.stdout.readline()

                if args.order == "served":
                    serve_it()
                sink.start(rid, hello["endpoint"], rid, dst, remote=(src, args.tokens) if args.plan_ahead else None)
                if args.order == "waiting":
                    time.sleep(0.005)
                    serve_it()
                load = sink._loads[rid]  # the sink keeps the Pull (and its timings) here until take_done
                sink.wait([rid], 30)
                finished, failed = sink.take_done()
                if failed or rid not in finished:
                    print(f"load {rid} failed: {failed}", file=sys.stderr)
                    return 2
                for layer in range(LAYERS):
                    if not all(got[layer][d].equal(want[layer][s]) for s, d in zip(src, dst)):
                        print(f"load {rid}: layer {layer} differs", file=sys.stderr)
                        return 1
                if i:
                    rows.append(load.pull.timings)
    finally:
        stop_child(proc)
    print(f" {args.loads} loads of {args.tokens} tokens ({rows[0].bytes} bytes), {args.transport}, order "
          f"{args.order}, plan ahead {'on' if args.plan_ahead else 'off'}; bytes checked")
    print_columns([t.as_dict() for t in rows])
    return 0


def print_columns(rows: list[dict]) -> None:
    """The columns of the module's docstring, medians in ms, from PullTimings.as_dict()s."""
    cols = {
        "answer": [t["waited_s"] for t in rows],
        "plan": [t["pinned_s"] - t["waited_s"] for t in rows],
        "submit..in place": [t["total_s"] - t["pinned_s"] for t in rows],
        "xfer": [t["total_s"] - t["waited_s"] for t in rows],
        "reads": [t["transfer_s"] for t in rows],
        "release": [t["released_s"] - t["total_s"] for t in rows],
    }
    print(f" {len(rows)} pulls, medians [ms]\n " + "  ".join(f"{k:>16}" for k in cols))
    print(" " + "  ".join(f"{np.median(v) * 1e3:>16.3f}" for v in cols.values()))


if __name__ == "__main__":
    sys.exit(main())
