"""The transfer demo (`make demo-transfer`): two processes, one registers, the other reads.

A target process (``python -m kvtransfer.testing.target``) registers 256 MiB of seeded random
bytes and serves them from C threads. This process registers a destination, connects
(the engine picks ``shm`` on one host; ``tcp`` is then forced for comparison), reads
the target's blocks in a random order (like KV pages) with one batched call, checks
every byte, and prints what moved and how fast.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from kvtransfer import Engine, EngineDescriptor, RegionDescriptor, alloc_host
from kvtransfer.testing.children import start_child, stop_child
from kvtransfer.testing.target import parse_size, seeded_bytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="kvtransfer two-process transfer demo")
    ap.add_argument("--bytes", type=parse_size, default=256 << 20, help="bytes the target serves (default 256M)")
    ap.add_argument("--block", type=parse_size, default=64 << 10, help="block size (default 64K)")
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--seed", type=int, default=2024)
    args = ap.parse_args(argv)
    total, block = args.bytes - args.bytes % args.block, args.block
    blocks = total // block
    # a progress line redrawn in place on a terminal, one line per pass in a log
    tty = sys.stdout.isatty()
    lead, end, close_line = ("\r", "", "\n") if tty else ("", "\n", "")

    print(f"[reader] starting a target process that registers {total >> 20} MiB of seeded random bytes ...")
    proc, hello = start_child([sys.executable, "-m", "kvtransfer.testing.target", "--bytes", str(total), "--seed",
                               str(args.seed)], timeout=60.0, what="target")
    try:
        remote_engine = EngineDescriptor.from_bytes(bytes.fromhex(hello["engine"]))
        remote = RegionDescriptor.from_bytes(bytes.fromhex(hello["region"]))
        print(f"[target pid {hello['pid']}] registered region {remote.region_id:#x}: {remote.nbytes} bytes at "
              f"{remote.addr:#x}, serving on {remote_engine.tcp_host}:{remote_engine.tcp_port} and shm")
        expected = seeded_bytes(total, args.seed)
        perm = np.random.default_rng(args.seed + 1).permutation(blocks)
        want = expected.reshape(blocks, block)[perm].reshape(-1)
        dst = alloc_host(total)
        with Engine() as eng:
            local, _ = eng.register(dst)
            for forced in (None, "tcp"):
                with eng.connect(remote_engine, transport=forced) as peer:
                    how = "forced" if forced else "chosen automatically"
                    times = []
                    for i in range(args.passes):
                        dst[:] = 0
                        t0 = time.perf_counter()
                        peer.read_blocks(local, np.arange(blocks) * block, remote, perm * block, block).wait(60)
                        times.append(time.perf_counter() - t0)
                        ok = np.array_equal(dst, want)
                        bar = "#" * (i + 1) + "." * (args.passes - i - 1)
                        print(f"{lead}[reader] {peer.transport:>3} [{bar}] pass {i + 1}/{args.passes}: "
                              f"{total / times[-1] / 1e9:6.2f} GB/s, bytes {'verified' if ok else 'WRONG'}",
                              end=end, flush=True)
                        if not ok:
                            print()
                            bad = int(np.nonzero(dst != want)[0][0])
                            print(f"[reader] byte {bad} differs: got {dst[bad]}, want {want[bad]}")
                            return 1
                    best = min(times)
                    print(f"{close_line}[reader] {peer.transport} ({how}): moved {total >> 20} MiB as {blocks} scattered "
                          f"{block >> 10} KiB blocks per pass in one batched read; best {best * 1e3:.1f} ms = "
                          f"{total / best / 1e9:.2f} GB/s, median {total / np.median(times) / 1e9:.2f} GB/s; "
                          f"target's Python ran no code to serve it")
        print("[reader] all bytes verified.")
    finally:
        stop_child(proc)
    print(f"[target pid {hello['pid']}] exited with code {proc.returncode}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
