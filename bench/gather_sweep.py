"""Tuning the gather kernel on a GPU: shapes of a block-gather kernel against torch's
``copy_`` of the same bytes, in one process, wall time of synchronized calls.

The engine's shm path copies a READ's blocks with one gather kernel (csrc/cuda_copy.c).
This script compiles shapes of such a kernel with cupy (NVRTC) and times each on the
benchmark's workloads: 16,384 blocks of 32 KiB gathered in a random permutation (a
Llama-3-8B 4,096-token prompt), the same blocks in order, and 2,048 of 256 KiB.
Shapes: threads per CTA, 16-byte loads in flight per thread (U) before their stores,
CTAs per SM (0: one CTA per descriptor), one descriptor per CTA or per warp, how
long ranges are cut (chunk), and load/store cache hints. Calls are timed back to back
(a stream of copies), or with ``--single`` one pass at a time, launch to synchronize
(as a READ waits for its batch: what chose cuda_copy.c's current shape, one CTA of 256
threads per 32 KiB descriptor; back to back, persistent shapes had looked better). The
script is kept to redo that on another card.

  python3 bench/gather_sweep.py [--total 512M] [--quick] [--json FILE]
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import numpy as np

from kvtransfer.testing.target import parse_size

SRC = r"""
struct kvt_copy { unsigned long long src, dst, len; };
template <int LD> __device__ __forceinline__ uint4 ld16(const uint4 *p)
{
    uint4 v;
    if (LD == 1) {
        asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
        return v;
    }
    if (LD == 2) return __ldcs(p);
    if (LD == 3) {
        asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
        return v;
    }
    return __ldg(p);
}
template <int ST> __device__ __forceinline__ void st16(uint4 *p, uint4 v)
{
    if (ST == 1) __stcs(p, v);
    else if (ST == 2) __stcg(p, v);
    else *p = v;
}
template <int U, int LD, int ST>
__device__ __forceinline__ void copy_one(const kvt_copy &c, unsigned t, unsigned B)
{
    const uint4 *s = (const uint4 *)c.src;
    uint4 *d = (uint4 *)c.dst;
    const unsigned long long nv = c.len >> 4;
    unsigned long long j = t;
    for (; j + (U - 1) * B < nv; j += U * B) {
        uint4 v[U];
#pragma unroll
        for (int u = 0; u < U; u++) v[u] = ld16<LD>(s + j + u * B);
#pragma unroll
        for (int u = 0; u < U; u++) st16<ST>(d + j + u * B, v[u]);
    }
    for (; j < nv; j += B) st16<ST>(d + j, ld16<LD>(s + j));
}
template <int T, int U, int W, int LD, int ST>
__global__ void __launch_bounds__(T) g(const kvt_copy *__restrict__ d, unsigned long long n)
{
    if (W == 2) {
        /* flat: the copy as one range of 16-byte vectors, every descriptor of d[0].len
         * bytes (a power of two), a thread's U loads a grid apart, like an elementwise copy */
        const unsigned long long nvd = d[0].len >> 4, total = n * nvd;
        const int shift = __ffsll(nvd) - 1;
        const unsigned long long stride = (unsigned long long)gridDim.x * T;
        for (unsigned long long v = (unsigned long long)blockIdx.x * T + threadIdx.x; v < total; v += stride * U) {
            uint4 r[U];
            uint4 *to[U];
#pragma unroll
            for (int u = 0; u < U; u++) {
                const unsigned long long x = v + u * stride;
                to[u] = 0;
                if (x < total) {
                    const kvt_copy c = d[x >> shift];
                    const unsigned long long off = x & (nvd - 1);
                    r[u] = ld16<LD>((const uint4 *)c.src + off);
                    to[u] = (uint4 *)c.dst + off;
                }
            }
#pragma unroll
            for (int u = 0; u < U; u++)
                if (to[u]) st16<ST>(to[u], r[u]);
        }
    } else if (W) {
        const unsigned lane = threadIdx.x & 31;
        const unsigned long long nw = (unsigned long long)gridDim.x * (T / 32);
        for (unsigned long long i = (unsigned long long)blockIdx.x * (T / 32) + threadIdx.x / 32; i < n; i += nw) {
            const kvt_copy c = d[i];
            copy_one<U, LD, ST>(c, lane, 32);
        }
    } else {
        for (unsigned long long i = blockIdx.x; i < n; i += gridDim.x) {
            const kvt_copy c = d[i];
            copy_one<U, LD, ST>(c, threadIdx.x, T);
        }
    }
}
"""


def shapes(quick: bool) -> list[tuple]:
    """(threads, U, warp, LD, ST, per_sm, chunk KiB)."""
    out = []
    for t, u in itertools.product((128, 256, 512, 1024), (2, 4, 8)):
        for per_sm in (0, 1, 2, 4, 99):  # 99: as many as fit
            out.append((t, u, 0, 0, 0, per_sm, 64))
    for t, u, chunk in itertools.product((256, 512), (1, 2, 4, 8), (8, 32)):
        for per_sm in (2, 99):
            out.append((t, u, 1, 0, 0, per_sm, chunk))
    for t, u, per_sm in itertools.product((256, 512, 1024), (2, 4, 8), (2, 99)):
        out.append((t, u, 2, 0, 0, per_sm, 64))
    for ld, st in itertools.product(range(4), range(3)):
        out.append((256, 8, 0, ld, st, 99, 64))
        out.append((512, 4, 0, ld, st, 99, 64))
    for chunk in (8, 16, 32):
        out.append((256, 8, 0, 0, 0, 99, chunk))
        out.append((512, 4, 0, 0, 0, 0, chunk))
        out.append((256, 8, 0, 0, 0, 0, chunk))  # cuda_copy.c's device shape: 32 KiB
    out = list(dict.fromkeys(out))
    return out[::7] if quick else out


def descs(src_ptr: int, dst_ptr: int, perm: np.ndarray, block: int, chunk: int) -> np.ndarray:
    """Copy descriptors (src, dst, len) gathering blocks of ``block`` bytes: local block i
    from source block ``perm[i]``. A block that is a multiple of ``chunk`` is cut into
    ``chunk``-byte pieces (as the transports cut long ranges); any other is one piece.
    bench/transfer_bw.py's "kernel" system uses it too."""
    per = block // chunk if block % chunk == 0 and block >= chunk else 1
    piece = block // per
    k = np.arange(per, dtype=np.uint64) * np.uint64(piece)
    s = np.uint64(src_ptr) + perm.astype(np.uint64)[:, None] * np.uint64(block) + k
    d = np.uint64(dst_ptr) + np.arange(len(perm), dtype=np.uint64)[:, None] * np.uint64(block) + k
    return np.ascontiguousarray(np.stack([s.ravel(), d.ravel(), np.full(s.size, piece, np.uint64)], axis=1))


def _per_call(fn, iters: int, then=None) -> float:
    """Seconds per call of `iters` calls of `fn` back to back, `then()` (a synchronize)
    once after them inside the timing."""
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if then is not None:
        then()
    return (time.perf_counter() - t0) / iters


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--total", type=parse_size, default="512M", help="bytes (K, M, G: powers of 1024)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="every 7th shape")
    ap.add_argument("--single", action="store_true",
                    help="time single passes (launch + synchronize, median of --iters), not calls back to back")
    ap.add_argument("--src-device", type=int, default=0,
                    help="the source's GPU (the destination is GPU 0): 1 times reads from another GPU")
    ap.add_argument("--run-on", choices=("dst", "src"), default="dst",
                    help="which GPU runs the kernel: the destination's (pull) or the source's (push)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import cupy as cp
    import torch

    total = args.total
    dev = torch.device("cuda:0")
    src = torch.randint(0, 255, (total,), dtype=torch.uint8, device=f"cuda:{args.src_device}")
    dst = torch.empty(total, dtype=torch.uint8, device=dev)
    runs_on = 0 if args.run_on == "dst" else args.src_device
    sms = torch.cuda.get_device_properties(runs_on).multi_processor_count
    if args.src_device != 0:
        for a, b in ((0, args.src_device), (args.src_device, 0)):
            with cp.cuda.Device(a):
                try:
                    cp.cuda.runtime.deviceEnablePeerAccess(b)
                except cp.cuda.runtime.CUDARuntimeError as e:  # already enabled
                    print("peer access", a, "->", b, ":", e)

    def sync() -> None:
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)

    def timed(fn) -> float:
        """seconds per call: the best of 3 rounds of `iters` calls back to back, synchronized
        once at the end of a round (launch gaps and kernel tails count, as they do in a
        stream of copies); --single: the median of `iters` passes, each synchronized"""
        fn()
        sync()
        if args.single:
            return float(np.median([_per_call(fn, 1, then=sync) for _ in range(args.iters)]))
        return min(_per_call(fn, args.iters, then=sync) for _ in range(3))

    def gbps(sec: float) -> float:
        return total / sec / 1e9

    rng = np.random.default_rng(0)
    workloads = {"32K perm": (32 << 10, rng.permutation(total >> 15)),
                 "32K order": (32 << 10, np.arange(total >> 15)),
                 "256K perm": (256 << 10, rng.permutation(total >> 18))}
    copy_s = [timed(lambda: dst.copy_(src))]
    base = {}
    for name, (block, perm) in workloads.items():
        if args.src_device != 0:
            break  # index_select wants one device
        idx = torch.from_numpy(perm).to(src.device)
        base[name] = timed(lambda: torch.index_select(src.view(-1, block), 0, idx, out=dst.view(-1, block)))
    print(f"GPU {torch.cuda.get_device_name(0)}, {sms} SMs; source on cuda:{args.src_device}, kernel on "
          f"cuda:{runs_on}; {total >> 20} MiB; copy_ {gbps(copy_s[0]):.0f} GB/s; "
          + "; ".join(f"index_select {k} {gbps(v):.0f} GB/s ({copy_s[0] / v:.3f}x)" for k, v in base.items()),
          flush=True)

    todo = shapes(args.quick)
    names = sorted({f"g<{t},{u},{w},{ld},{st}>" for t, u, w, ld, st, _, _ in todo})
    cp.cuda.Device(runs_on).use()
    mod = cp.RawModule(code=SRC, options=("-std=c++17",), name_expressions=names)
    mod.compile()
    rows = []
    ref = {}
    for name, (block, perm) in workloads.items():
        idx = torch.from_numpy(perm).to(src.device)
        ref[name] = torch.index_select(src.view(-1, block), 0, idx).view(-1).to(dev)
    for t, u, w, ld, st, per_sm, chunk in todo:
        fn = mod.get_function(f"g<{t},{u},{w},{ld},{st}>")
        try:
            fit = cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.kernel.ptr, t, 0)
        except AttributeError:
            fit = 2048 // t
        row = {"fit": fit, "threads": t, "U": u, "warp": w, "ld": ld, "st": st, "per_sm": per_sm, "chunk_kib": chunk}
        bad = []
        for name, (block, perm) in workloads.items():
            d = descs(src.data_ptr(), dst.data_ptr(), perm, block, chunk << 10)
            dd = cp.asarray(d)  # on cuda:runs_on
            n = len(d)
            if per_sm == 0:
                grid = n if not w else (n + t // 32 - 1) // (t // 32)
            else:
                grid = sms * min(per_sm, fit)

            def launch(grid=grid, dd=dd, n=n):
                fn((grid,), (t,), (dd, np.uint64(n)))

            sec = timed(launch)
            row[name] = round(copy_s[0] / sec, 4)
            # every workload's bytes, once: a zeroed destination, one launch
            dst.zero_()
            sync()
            launch()
            sync()
            if not torch.equal(dst, ref[name]):
                bad.append(name)
        row["ok"] = not bad
        if bad:
            row["wrong_bytes"] = bad
        rows.append(row)
        print(json.dumps(row), flush=True)
    copy_s.append(timed(lambda: dst.copy_(src)))
    print(f"copy_ again {gbps(copy_s[-1]):.0f} GB/s", flush=True)
    for key in workloads:
        best = sorted(rows, key=lambda r: -r[key])[:5]
        print(f"best for {key}: " + " | ".join(
            f"T{r['threads']} U{r['U']} W{r['warp']} ld{r['ld']} st{r['st']} sm{r['per_sm']} c{r['chunk_kib']}: "
            f"{r[key]:.3f}x" for r in best))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_gbps": [gbps(s) for s in copy_s], "index_select_ratio":
                       {k: copy_s[0] / v for k, v in base.items()}, "rows": rows}, f, indent=1)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
