"""The engine's own gather kernel alone, on a GPU: csrc/cuda_copy.c's kernel source
compiled with cupy, one pass (launch + synchronize, median of 30) against torch's
``copy_`` of the same bytes: descriptors in device or pinned host memory (the engine
reads them from pinned memory), one launch or the engine's three jobs (1/16, 1/4,
the rest) on three streams; and the kernel it replaced (commit c407dd5: CTAs taking
groups of descriptors from a counter) for comparison when git has it. Local sources,
and a source on cuda:1 when there are two GPUs. Every variant's bytes are checked
after its timing (the destination is compared with index_select's).

    python3 bench/engine_kernel.py     (needs cupy and torch on a CUDA machine)

bench/gather_sweep.py sweeps other shapes (threads, loads in flight, CTAs per SM)
with its own source; this one times what the engine launches.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from gather_sweep import descs  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
TOTAL = 512 << 20
OLD_COMMIT = "c407dd5"  # CTAs of 1,024 threads taking groups of descriptors from a counter
CHUNK = 32 << 10  # csrc/cuda_copy.h's KVT_COPY_CHUNK


def kernel_source(text: str) -> str:
    """The CUDA C source in cuda_copy.c's KERNEL_SRC string literal."""
    body = text.split("static const char KERNEL_SRC[] =", 1)[1].split(";\n", 1)[0]
    return "".join(eval(m) for m in re.findall(r'"(?:[^"\\]|\\.)*"', body))  # C string literals


def main() -> int:
    import cupy as cp
    import torch

    new = cp.RawModule(code=kernel_source(open(os.path.join(ROOT, "csrc/cuda_copy.c")).read()),
                       options=("-std=c++17",)).get_function("kvt_gather_device")
    try:
        old_text = subprocess.run(["git", "-C", ROOT, "show", f"{OLD_COMMIT}:csrc/cuda_copy.c"], check=True,
                                  capture_output=True, text=True, timeout=30).stdout
        old = cp.RawModule(code=kernel_source(old_text), options=("-std=c++17",)).get_function("kvt_gather_device")
    except (OSError, subprocess.SubprocessError):
        old = None  # not a git checkout with that commit
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    ngpu = torch.cuda.device_count()
    if ngpu > 1:
        for a, b in ((0, 1), (1, 0)):
            with cp.cuda.Device(a):
                try:
                    cp.cuda.runtime.deviceEnablePeerAccess(b)
                except cp.cuda.runtime.CUDARuntimeError:
                    pass  # already enabled
    cp.cuda.Device(0).use()
    dst = torch.empty(TOTAL, dtype=torch.uint8, device="cuda:0")
    ctrs = [cp.zeros(2, dtype=cp.uint32) for _ in range(3)]
    streams = [cp.cuda.Stream(non_blocking=True) for _ in range(3)]

    def timeit(fn, n: int = 30) -> float:
        fn()
        cp.cuda.Device(0).synchronize()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            cp.cuda.Device(0).synchronize()
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts)) * 1e6

    def run(label: str, src, block: int, perm: np.ndarray) -> None:
        d = descs(src.data_ptr(), dst.data_ptr(), perm, block, CHUNK)
        n = len(d)
        dd = cp.asarray(d)
        pin = cp.cuda.alloc_pinned_memory(d.nbytes)
        np.frombuffer(pin, np.uint64, d.size).reshape(d.shape)[:] = d
        want = torch.index_select(src.view(-1, block).to("cuda:0"), 0, torch.from_numpy(perm).to("cuda:0")).view(-1)
        copy_us = timeit(lambda: dst.copy_(src))
        res, bad = {"copy_": copy_us}, []
        cut = [0, n // 16, n // 16 + n // 4, n]

        def jobs(launch) -> None:
            for j in range(3):
                with streams[j]:
                    launch(cut[j], cut[j + 1], j)
            for s in streams:
                s.synchronize()

        def new_one(ptr: int, a: int, b: int) -> None:
            new((b - a,), (256,), (np.uint64(ptr + a * 24), np.uint64(b - a)))

        def old_one(ptr: int, a: int, b: int, ctr) -> None:
            old((min(b - a, sms),), (1024,), (np.uint64(ptr + a * 24), np.uint64(b - a), ctr, np.uint32(4)))

        def timed(name: str, fn) -> None:
            dst.zero_()
            torch.cuda.synchronize()  # the jobs' streams are not ordered with torch's
            res[name] = timeit(fn)
            if not torch.equal(dst, want):
                bad.append(name)

        for where, ptr in (("pin", pin.ptr), ("dev", dd.data.ptr)):
            timed(f"engine {where}", lambda: new_one(ptr, 0, n))
            if old is not None:
                timed(f"old g4 {where}", lambda: old_one(ptr, 0, n, ctrs[0]))
        timed("engine 3 jobs pin", lambda: jobs(lambda a, b, j: new_one(pin.ptr, a, b)))
        if old is not None:
            timed("old g4 3 jobs pin", lambda: jobs(lambda a, b, j: old_one(pin.ptr, a, b, ctrs[j])))
        print(f"== {label}: {n} descriptors; bytes {'ok' if not bad else 'WRONG in ' + ', '.join(bad)}")
        for k, v in res.items():
            print(f"  {k:<22} {v:8.1f} us  {copy_us / v:6.3f}x of copy_")
        sys.stdout.flush()
        if bad:
            raise SystemExit(1)

    rng = np.random.default_rng(0)
    src0 = torch.randint(0, 255, (TOTAL,), dtype=torch.uint8, device="cuda:0")
    print(f"GPU {torch.cuda.get_device_name(0)}, {sms} SMs, {TOTAL >> 20} MiB a pass")
    run("32K local", src0, 32 << 10, rng.permutation(TOTAL >> 15))
    run("256K local", src0, 256 << 10, rng.permutation(TOTAL >> 18))
    if ngpu > 1:
        src1 = torch.randint(0, 255, (TOTAL,), dtype=torch.uint8, device="cuda:1")
        run("32K from cuda:1", src1, 32 << 10, rng.permutation(TOTAL >> 15))
    return 0


if __name__ == "__main__":
    sys.exit(main())
