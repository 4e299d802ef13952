"""Reading another GPU's KV over shm (CUDA IPC + peer access), against torch's
peer-to-peer ``copy_`` of the same bytes. Needs two GPUs.

    python bench/gpu_peer.py [--blocks 16384] [--block 32K] [--iters 20] [--json FILE]

A child process holds ``blocks x block`` seeded bytes in a tensor on cuda:1 and
registers it; this process registers a destination on cuda:0 and reads the blocks in a
random permutation with one ``read_blocks`` call (the first pass is verified). The
baseline: the same bytes in a tensor on cuda:1 of this process, ``dst.copy_(src)`` to
cuda:0 (contiguous; what torch moves over NVLink/PCIe peer access). Target (issue #6):
shm >= 0.9x the peer copy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kvtransfer import Engine, EngineDescriptor, RegionDescriptor  # noqa: E402
from kvtransfer.testing.children import start_child, stop_child  # noqa: E402
from kvtransfer.testing.target import parse_size, seeded_bytes  # noqa: E402

SEED = 7  # the child's bytes: seeded_bytes(nbytes, SEED), which this process regenerates to check and copy


def child(nbytes: int) -> int:
    src = torch.from_numpy(seeded_bytes(nbytes, SEED)).to("cuda:1")
    torch.cuda.synchronize()
    with Engine() as eng:
        _, desc = eng.register(src)
        print(json.dumps({"engine": eng.descriptor.to_bytes().hex(), "region": desc.to_bytes().hex()}), flush=True)
        sys.stdin.read()  # serve until stdin ends
    return 0


def timed(fn, iters: int) -> list[float]:
    out = []
    for _ in range(iters):
        for d in ("cuda:0", "cuda:1"):
            torch.cuda.synchronize(d)
        t0 = time.perf_counter()
        fn()
        for d in ("cuda:0", "cuda:1"):
            torch.cuda.synchronize(d)
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=16384)
    ap.add_argument("--block", type=parse_size, default=32 << 10)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    if torch.cuda.device_count() < 2:
        print("needs two GPUs", file=sys.stderr)
        return 2
    nbytes = args.blocks * args.block
    proc, hello = start_child([sys.executable, __file__, "--child", str(nbytes)], timeout=120, what="cuda:1 target")
    try:
        with Engine() as eng:
            dst = torch.zeros(nbytes, dtype=torch.uint8, device="cuda:0")
            region, _ = eng.register(dst)
            peer = eng.connect(EngineDescriptor.from_bytes(bytes.fromhex(hello["engine"])), transport="shm")
            remote = RegionDescriptor.from_bytes(bytes.fromhex(hello["region"]))
            perm = np.random.default_rng(1).permutation(args.blocks).astype(np.int64)
            lo = np.arange(args.blocks, dtype=np.int64) * args.block
            ro = perm * args.block

            def shm() -> None:
                peer.read_blocks(region, lo, remote, ro, args.block).wait(60)

            shm()
            want = torch.from_numpy(seeded_bytes(nbytes, SEED)).view(args.blocks, args.block)[torch.from_numpy(perm)]
            if not torch.equal(dst.cpu().view(args.blocks, args.block), want):
                print("VERIFY FAILED: shm read from cuda:1", file=sys.stderr)
                return 1
            src = torch.from_numpy(seeded_bytes(nbytes, SEED)).to("cuda:1")
            copy = timed(lambda: dst.copy_(src), args.iters + 2)[2:]
            read = timed(shm, args.iters + 2)[2:]
    finally:
        stop_child(proc)
    gb = nbytes / 1e9
    rec = {"blocks": args.blocks, "block_bytes": args.block, "iters": args.iters,
           "shm_gbps": gb / np.median(read), "peer_copy_gbps": gb / np.median(copy),
           "ratio": float(np.median(copy) / np.median(read)), "devices": [torch.cuda.get_device_name(i) for i in (0, 1)]}
    print(f" {'devices':<16}: cuda:1 -> cuda:0, {rec['devices'][0]}")
    print(f" {'workload':<16}: {args.blocks} blocks of {args.block} bytes, random permutation, verified")
    print(f" shm read (median)   : {rec['shm_gbps']:8.1f} GB/s")
    print(f" peer copy_ (median) : {rec['peer_copy_gbps']:8.1f} GB/s")
    print(f" shm / peer copy_    : {rec['ratio']:.2f}x   (target >= 0.9x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rec, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
