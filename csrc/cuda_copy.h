/* Batched copies on the GPU (cuda_copy.c): thousands of (src, dst, len) ranges in one
 * or a few launches, never one cudaMemcpyAsync per block.
 *
 * A copy is a list of descriptors. The way they run is decided per device, once:
 *   kernel  a gather kernel compiled at run time with NVRTC (libnvrtc loaded with
 *           dlopen: $KVTRANSFER_NVRTC, else libnvrtc.so.13/.12/.11.2/.so on the loader's
 *           path, else /usr/local/cuda/lib64). One launch copies every descriptor, with
 *           16-byte loads and stores where source and destination agree modulo 16,
 *           bytes otherwise (head, tail, odd alignment); its shape (one CTA per
 *           descriptor, or CTAs walking the list) is the one measured best for device
 *           memory, or for pinned host memory (staging). Long ranges are cut into
 *           KVT_COPY_CHUNK-byte descriptors so that the work spreads over every SM.
 *   batch   cuMemcpyBatchAsync (drivers of CUDA 12.8 and later), when NVRTC is missing:
 *           correct, but far slower for many small ranges (bench/README.md).
 * KVTRANSFER_CUDA_COPY=kernel|batch forces one; KVTRANSFER_NVRTC=none disables NVRTC
 * (the batch path, where the driver has it). With neither available, copies fail
 * with EOPNOTSUPP saying why (there is no silent one-copy-per-block fallback).
 * Descriptors may name any memory the device can address: its own, another device's
 * opened through CUDA IPC, pinned host memory. */
#ifndef KVT_CUDA_COPY_H
#define KVT_CUDA_COPY_H

#include <stddef.h>
#include <stdint.h>

#include "cuda.h"

#define KVT_COPY_CHUNK (32u << 10) /* one CTA's copy (cuda_copy.c says why this size) */

/* Descriptors that len bytes take (at most). */
static inline size_t kvt_copy_ndesc(uint64_t len) { return (size_t)((len + KVT_COPY_CHUNK - 1) / KVT_COPY_CHUNK); }

/* Writes the descriptors of one range at out; returns how many. */
static inline size_t kvt_copy_split(kvt_copy_desc *out, uint64_t src, uint64_t dst, uint64_t len)
{
    size_t n = 0;
    for (uint64_t off = 0; off < len; off += KVT_COPY_CHUNK) {
        uint64_t take = len - off < KVT_COPY_CHUNK ? len - off : KVT_COPY_CHUNK;
        out[n++] = (kvt_copy_desc){src + off, dst + off, take};
    }
    return n;
}

/* Enqueues the copies of n descriptors on stream s of device dev, whose context is
 * current. h: the descriptors in host memory; d: a device copy of them, or 0 when h
 * is pinned host memory the kernel reads directly. The caller keeps h (and d) as
 * they are until the stream has run the copy. */
int kvt_copy_launch(int dev, CUstream s, const kvt_copy_desc *h, CUdeviceptr d, size_t n, kvt_err *err);

/* The same, for copies between device memory and pinned host memory (tcp staging):
 * the kernel shape with more bytes in flight, for PCIe's latency. */
int kvt_copy_launch_staged(int dev, CUstream s, const kvt_copy_desc *h, CUdeviceptr d, size_t n, kvt_err *err);

/* read_blocks' shape: n blocks of len bytes each, block i from src + ro[i] to
 * dst + lo[i]. offs: 2n uint64 in pinned, device-mapped host memory (offs_dev as the
 * device addresses it), the n remote offsets (ro), then the n local ones (lo); the
 * kernel computes each block's addresses from them, so the CPU writes 16 bytes a
 * block, not a descriptor per 32 KiB. Blocks of one descriptor (len <= KVT_COPY_CHUNK)
 * are one CTA each, which reads its offsets over PCIe itself: no upload to wait for
 * before the copy starts. Longer blocks are several CTAs reading the same offsets,
 * and concurrent reads of one host cache line wait for each other (bench/README.md):
 * the launch uploads them to dev_offs (device memory of 2n uint64) on stream s first.
 * The caller keeps offs and dev_offs as they are until the stream has run the copy.
 * -EOPNOTSUPP (err untouched, nothing enqueued) when the device copies in batch mode:
 * write descriptors then. */
typedef struct kvt_copy_cols {
    const uint64_t *offs;
    CUdeviceptr offs_dev;
    uint64_t src, dst, len, n;
} kvt_copy_cols;
int kvt_copy_launch_cols(int dev, CUstream s, const kvt_copy_cols *c, CUdeviceptr dev_offs, kvt_err *err);

/* Whether device dev copies with "kernel" or "batch"; compiles the kernel and loads
 * it into dev's primary context at the first call, whatever context is current. 0 or
 * -errno (EOPNOTSUPP: neither works). */
int kvt_copy_prepare(int dev, const char **mode, kvt_err *err);

#endif
