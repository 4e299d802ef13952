"""Overhead of the control plane on top of raw transfers, and its message latency.

    .venv/bin/python bench/control_overhead.py [--tokens 4096] [--iters 7] [--transport shm|tcp] [--json FILE]

The prefill side is ``python -m kvtransfer.testing.synthetic`` with the KV shape of Llama-3-8B
(32 layers, 8 KV heads x 128 dims, bf16, 16-token blocks, vLLM's flash layout) and a
shuffled free list, so a request's blocks are scattered, as in a pool that has served a
while. A 4,096-token request is 256 blocks per layer: 512 MiB in 16,384 ranges of
32 KiB. This process is the decode side, with its own pool and scattered blocks.

1. verify  one pull with the pattern written; every byte checked.
2. raw     the same 16,384 entries (that request's plan) in one ``peer.read_indexed`` +
           ``wait``: the engine alone.
3. control the same request whose layers are announced all at once after the
           prefill side "computed" them (``publish: at_end``; ``fill: false`` so the
           prefill side does not rewrite 512 MiB each time — the blocks are the same,
           the pool reuses them). Timed from the prefill side announcing the manifest
           (``time.monotonic()``, a system-wide clock) to the last byte in place here.
           Raw and control passes alternate, ``--iters`` of each after one warm-up
           pass each. Each control pass follows a raw read of the same bytes, so at the
           end the destination is zeroed and one more control pull's bytes are checked.
4. latency of control messages on loopback, over ``--small`` 1-token requests: Ping
           round trips; Submit -> Pinned (which includes the prefill application's thread
           taking the request and allocating blocks); a Manifest one way (announced on the
           prefill side -> handled here); Release -> Released. p50/p99 in microseconds.

Target (issue #4): control / raw <= 1.05 (medians), control messages <= 1 ms p99.
Exit status 0 when everything ran and verified, 1 on a byte mismatch, 2 on errors.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kvtransfer import Engine, alloc_host  # noqa: E402
from kvtransfer.control import ControlClient  # noqa: E402
from kvtransfer.kv import BlockPool, CompatInfo, KVLayout, plan_reads  # noqa: E402
from kvtransfer.testing.synthetic import check_request  # noqa: E402
from kvtransfer.testing.children import start_child, stop_child  # noqa: E402
from report import exit_with  # noqa: E402  (bench/report.py; this folder is on the path)

MODEL = "llama-3-8b-shape"
LLAMA3_8B = dict(kind="flash", num_layers=32, block_size=16, num_kv_heads=8, head_dim=128, dtype="bfloat16")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def start_prefill(layout: KVLayout) -> tuple[object, str]:
    fields = {f: getattr(layout, f) for f in layout.__struct_fields__}
    cmd = [sys.executable, "-m", "kvtransfer.testing.synthetic", "--layout", json.dumps(fields), "--model", MODEL,
           "--scatter-seed", "1", "--lease", "30"]
    proc, hello = start_child(cmd, timeout=120, what="synthetic prefill")
    return proc, hello["endpoint"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--pings", type=int, default=2000)
    ap.add_argument("--small", type=int, default=300, help="1-token requests for the Submit/Release latency")
    ap.add_argument("--transport", choices=("shm", "tcp", "verbs"), default=None)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    blocks_needed = -(-args.tokens // LLAMA3_8B["block_size"])
    layout = KVLayout(**LLAMA3_8B, num_blocks=blocks_needed + 64)
    prefill, endpoint = start_prefill(layout)
    try:
        with Engine() as eng:
            buf = alloc_host(layout.region_nbytes())
            region, _ = eng.register(buf)
            pool = BlockPool(layout.num_blocks)
            ids = pool.alloc(layout.num_blocks)
            np.random.default_rng(2).shuffle(ids)
            dst = ids[:blocks_needed]
            with ControlClient(endpoint, engine=eng, regions=[region], layout=layout,
                               compat=CompatInfo.of(layout, MODEL), timeout=30, transport=args.transport) as c:
                return run(args, c, layout, buf, dst)
    finally:
        stop_child(prefill)


def request(n: int, seed: int, **extra) -> bytes:
    return json.dumps({"num_tokens": n, "seed": seed, **extra}).encode()


def run(args, c: ControlClient, layout: KVLayout, buf: np.ndarray, dst: list[int]) -> int:
    n = args.tokens
    gb = n // layout.block_size * layout.block_bytes * layout.num_layers / 1e9
    # 1. verify
    first = c.pull("verify", dst, payload=request(n, 7))
    src_blocks = json.loads(first.wait(120))["blocks"]
    check_request(layout, [buf], dst, n, 7)

    # 2 and 3, interleaved so that both see the same machine (it is shared and noisy):
    # the raw engine reads of the same entries, then the same request through the control plane
    plan = np.concatenate(plan_reads(c.remote_layout, layout, src_blocks, dst, n))
    raw, ctl, last = [], [], None
    for i in range(args.iters + 1):
        t0 = time.perf_counter()
        c.peer.read_indexed(c.regions, plan["dst_region"], plan["dst_off"], c.remote_regions, plan["src_region"],
                            plan["src_off"], plan["len"]).wait(60)
        raw.append(time.perf_counter() - t0)
        pull = c.pull(f"ctl-{i}", dst, payload=request(n, 7, publish="at_end", fill=False))
        result = json.loads(pull.wait(120))
        if result["blocks"] != src_blocks:
            raise RuntimeError("the prefill pool handed out other blocks; the unfilled pattern would not be there")
        ctl.append(pull.timings.started + pull.timings.total_s - result["published_at"])
        last = pull
    raw, ctl = raw[1:], ctl[1:]  # the first pass of each warms page tables and caches
    # each control pull above landed on the bytes the raw read before it had put there:
    # zeroed, one more control pull must put them in place by itself
    buf[:] = 0
    check = c.pull("ctl-check", dst, payload=request(n, 7, publish="at_end", fill=False))
    if json.loads(check.wait(120))["blocks"] != src_blocks:
        raise RuntimeError("the prefill pool handed out other blocks; the unfilled pattern would not be there")
    check_request(layout, [buf], dst, n, 7)

    # 4. control message latency
    pings = [c.ping() for _ in range(args.pings)]
    pinned, manifest, released = [], [], []
    for i in range(args.small):
        p = c.pull(f"small-{i}", dst[:1], payload=request(1, i, fill=False, publish="at_end"))
        result = json.loads(p.wait(30))
        pinned.append(p.timings.pinned_s)
        manifest.append(p.timings.started + p.timings.first_manifest_s - result["published_at"])
        released.append(p.timings.released_s - p.timings.total_s)

    raw_med, ctl_med = float(np.median(raw)), float(np.median(ctl))
    rec = {
        "transport": c.transport, "tokens": n, "bytes": int(plan["len"].sum()), "entries": len(plan),
        "raw_median_s": raw_med, "control_median_s": ctl_med, "ratio": ctl_med / raw_med,
        "raw_gbps": gb / raw_med, "control_gbps": gb / ctl_med,
        "ping_p50_us": pct(pings, 50) * 1e6, "ping_p99_us": pct(pings, 99) * 1e6,
        "submit_to_pinned_p50_us": pct(pinned, 50) * 1e6, "submit_to_pinned_p99_us": pct(pinned, 99) * 1e6,
        "manifest_p50_us": pct(manifest, 50) * 1e6, "manifest_p99_us": pct(manifest, 99) * 1e6,
        "release_p50_us": pct(released, 50) * 1e6, "release_p99_us": pct(released, 99) * 1e6,
        "last_pull": last.timings.as_dict(),
    }
    print(f" {'transport':<22}: {c.transport}")
    print(f" {'KV shape':<22}: 32 layers x 8 heads x 128 dims, bf16, 16-token blocks (Llama-3-8B)")
    print(f" {'request':<22}: {n} tokens, {rec['bytes'] / 2**20:.0f} MiB in {len(plan)} ranges, scattered")
    print(f" {'host':<22}: {platform.node()}, {os.cpu_count()} CPUs")
    print()
    print(f" {'path':<10} {'median[ms]':>11} {'min[ms]':>9} {'GB/s':>8}")
    for name, xs in (("raw", raw), ("control", ctl)):
        print(f" {name:<10} {np.median(xs) * 1e3:>11.2f} {min(xs) * 1e3:>9.2f} {gb / np.median(xs):>8.2f}")
    print(f"\n control / raw = {rec['ratio']:.3f}x   (target <= 1.05x)")
    print(f"\n {'message':<22} {'p50[us]':>9} {'p99[us]':>9}")
    for name, key in (("Ping round trip", "ping"), ("Submit -> Pinned *", "submit_to_pinned"),
                      ("Manifest, one way", "manifest"), ("Release -> Released", "release")):
        print(f" {name:<22} {rec[key + '_p50_us']:>9.0f} {rec[key + '_p99_us']:>9.0f}")
    print(" (target: p99 <= 1000 us; * includes the prefill application picking the request up)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rec, f, indent=1)
    return 0


if __name__ == "__main__":
    exit_with(main)
