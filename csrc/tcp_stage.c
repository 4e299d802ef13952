/* CUDA staging for the tcp transport; tcp_stage.h says how it overlaps. */
#define _GNU_SOURCE
#include "tcp_stage.h"

#include <errno.h>
#include <stdlib.h>

#include "cuda.h"
#include "cuda_copy.h"
#include "kvt.h"
#include "sock.h"
#include "wire.h"

/* Bytes per staging buffer: KVTRANSFER_TCP_STAGE_KB (64 KiB to 16 MiB), default 2 MiB:
 * smaller buffers pay for a launch and a wait per buffer (bench/README.md). */
static size_t stage_bytes(void)
{
    static size_t v;
    if (!v) {
        const char *e = getenv("KVTRANSFER_TCP_STAGE_KB");
        long kb = e && *e ? strtol(e, NULL, 10) : 2048;
        v = (size_t)(kb < 64 ? 64 : kb > 16384 ? 16384 : kb) << 10;
    }
    return v;
}
#define STAGE_BYTES stage_bytes()
/* a buffer's ranges: at most one per wire entry, plus the chunks a buffer is cut into */
#define STAGE_DESCS (KVT_WIRE_MAX_ENTRIES + STAGE_BYTES / KVT_COPY_CHUNK + 2)

struct kvt_stage {
    int dev; /* device of the stream and events; -1 before the first use */
    CUstream s;
    struct {
        char *buf;         /* pinned, device-mapped: the copy kernel reads or writes it */
        kvt_copy_desc *d;  /* pinned, device-mapped: the kernel reads its ranges there */
        uint64_t buf_dev, d_dev; /* the two as the device addresses them */
        CUevent ev;
        int busy;          /* a copy of this buffer is in flight */
    } b[2];
};

static void unbind(const kvt_cu *c, kvt_stage *st)
{
    for (int i = 0; i < 2; i++) {
        if (st->b[i].ev)
            c->EventDestroy(st->b[i].ev);
        st->b[i].ev = NULL;
        st->b[i].busy = 0;
    }
    if (st->s)
        c->StreamDestroy(st->s);
    st->s = NULL;
    st->dev = -1;
}

void kvt_stage_free(kvt_stage *st)
{
    if (!st)
        return;
    kvt_err e;
    const kvt_cu *c = kvt_cu_get(&e);
    if (c) {
        if (st->dev >= 0 && kvt_cuda_push(st->dev, &e) == 0) {
            if (st->s)
                c->StreamSynchronize(st->s);
            unbind(c, st);
            kvt_cuda_pop();
        }
        for (int i = 0; i < 2; i++) {
            if (st->b[i].buf)
                c->MemFreeHost(st->b[i].buf);
            if (st->b[i].d)
                c->MemFreeHost(st->b[i].d);
        }
    }
    free(st);
}

/* The stage, its buffers, and a stream and events on device dev (context made
 * current here: the calling thread works on that device from now on). */
static kvt_stage *bind(kvt_stage **stp, int dev, kvt_err *e, int *rc)
{
    const kvt_cu *c = kvt_cu_get(e);
    if (!c) {
        *rc = -ENODEV;
        return NULL;
    }
    kvt_stage *st = *stp;
    if (!st) {
        st = calloc(1, sizeof *st);
        if (!st) {
            *rc = kvt_syserr(e, ENOMEM, "calloc", "stage");
            return NULL;
        }
        st->dev = -1;
        *stp = st;
    }
    if ((*rc = kvt_cuda_enter(dev, e)) < 0)
        return NULL;
    if (st->dev == dev)
        return st;
    if (st->dev >= 0) {
        /* another device: its copies are done (callers sync first); new stream here */
        unbind(c, st);
    }
    if ((*rc = kvt_copy_prepare(dev, NULL, e)) < 0)
        return NULL;
    const unsigned flags = CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP;
    CUresult r = c->StreamCreate(&st->s, CU_STREAM_NON_BLOCKING);
    const char *what = "cuStreamCreate";
    for (int i = 0; i < 2 && r == CUDA_SUCCESS; i++) {
        what = "cuMemHostAlloc";
        if (!st->b[i].buf)
            r = c->MemHostAlloc((void **)&st->b[i].buf, STAGE_BYTES, flags);
        if (r == CUDA_SUCCESS && !st->b[i].d)
            r = c->MemHostAlloc((void **)&st->b[i].d, STAGE_DESCS * sizeof(kvt_copy_desc), flags);
        if (r == CUDA_SUCCESS) {
            what = "cuEventCreate";
            r = c->EventCreate(&st->b[i].ev, CU_EVENT_DISABLE_TIMING);
        }
        if (r == CUDA_SUCCESS) {
            /* the same under unified addressing (every 64-bit platform CUDA 11+ runs
               on); asked to be sure, once */
            CUdeviceptr bd = 0, dd = 0;
            what = "cuMemHostGetDevicePointer";
            r = c->MemHostGetDevicePointer(&bd, st->b[i].buf, 0);
            if (r == CUDA_SUCCESS)
                r = c->MemHostGetDevicePointer(&dd, st->b[i].d, 0);
            st->b[i].buf_dev = bd;
            st->b[i].d_dev = dd;
        }
    }
    if (r != CUDA_SUCCESS) {
        *rc = kvt_cu_fail(e, r, what, "tcp staging buffers on device %d", dev);
        unbind(c, st);
        return NULL;
    }
    st->dev = dev;
    return st;
}

static int wait_buf(const kvt_cu *c, kvt_stage *st, int b, kvt_err *e)
{
    if (!st->b[b].busy)
        return 0;
    st->b[b].busy = 0;
    CUresult r = c->EventSynchronize(st->b[b].ev);
    return r == CUDA_SUCCESS ? 0 : kvt_cu_fail(e, r, "cuEventSynchronize", "tcp staging copy on device %d", st->dev);
}

static int launch(const kvt_cu *c, kvt_stage *st, int b, size_t nd, kvt_err *e)
{
    int rc = kvt_copy_launch_staged(st->dev, st->s, st->b[b].d, st->b[b].d_dev, nd, e);
    if (rc == 0) {
        CUresult r = c->EventRecord(st->b[b].ev, st->s);
        if (r != CUDA_SUCCESS)
            rc = kvt_cu_fail(e, r, "cuEventRecord", "device %d", st->dev);
        else
            st->b[b].busy = 1;
    }
    return rc;
}

/* Waits for buffer *pend's copy and sends its `len` bytes. */
static int flush(const kvt_cu *c, kvt_stage *st, int fd, int *pend, uint64_t len, kvt_err *e)
{
    if (*pend < 0)
        return 0;
    int b = *pend;
    *pend = -1;
    int rc = wait_buf(c, st, b, e);
    if (rc == 0)
        rc = kvt_send_all(fd, st->b[b].buf, len, "response data (staged)", e);
    return rc;
}

/* After an error: nothing may still write or read the buffers when they are reused. */
static void drain(const kvt_cu *c, kvt_stage *st)
{
    if (st && st->s)
        c->StreamSynchronize(st->s);
    if (st)
        st->b[0].busy = st->b[1].busy = 0;
}

int kvt_stage_send(kvt_stage **stp, int fd, const kvt_seg *segs, size_t n, kvt_err *e)
{
    const kvt_cu *c = kvt_cu_get(e);
    if (!c)
        return -ENODEV;
    kvt_stage *st = *stp;
    size_t i = 0;
    uint64_t in = 0, pend_len = 0;
    int pend = -1, rc = 0;
    while (rc == 0 && i < n) {
        if (segs[i].kind == KVT_MEM_HOST) {
            rc = flush(c, st, fd, &pend, pend_len, e);
            if (rc == 0)
                rc = kvt_send_all(fd, (const void *)(uintptr_t)(segs[i].addr + in), segs[i].len - in,
                                  "response data", e);
            i++;
            in = 0;
            continue;
        }
        int dev = segs[i].dev;
        if (!st || st->dev != dev) {
            rc = st ? flush(c, st, fd, &pend, pend_len, e) : 0;
            if (rc < 0 || !(st = bind(stp, dev, e, &rc)))
                break;
        }
        int b = pend == 0 ? 1 : 0;
        if ((rc = wait_buf(c, st, b, e)) < 0)
            break;
        const uint64_t base = st->b[b].buf_dev;
        size_t nd = 0;
        uint64_t fill = 0;
        while (i < n && segs[i].kind != KVT_MEM_HOST && segs[i].dev == dev && fill < STAGE_BYTES) {
            uint64_t take = segs[i].len - in < STAGE_BYTES - fill ? segs[i].len - in : STAGE_BYTES - fill;
            if (nd + kvt_copy_ndesc(take) > STAGE_DESCS)
                break;
            nd += kvt_copy_split(st->b[b].d + nd, segs[i].addr + in, base + fill, take);
            fill += take;
            in += take;
            if (in == segs[i].len) {
                i++;
                in = 0;
            }
        }
        rc = launch(c, st, b, nd, e);
        if (rc == 0)
            rc = flush(c, st, fd, &pend, pend_len, e); /* the previous buffer goes out while this one copies */
        pend = b;
        pend_len = fill;
    }
    if (rc == 0)
        rc = flush(c, st, fd, &pend, pend_len, e);
    if (rc < 0)
        drain(c, st);
    return rc;
}

int kvt_stage_recv(kvt_stage **stp, int fd, const kvt_seg *segs, size_t n, kvt_err *e)
{
    if (n == 0)
        return 0;
    const kvt_cu *c = kvt_cu_get(e);
    if (!c)
        return -ENODEV;
    int rc = 0;
    kvt_stage *st = bind(stp, segs[0].dev, e, &rc);
    if (!st)
        return rc;
    size_t i = 0;
    uint64_t in = 0;
    int b = 0;
    while (rc == 0 && i < n) {
        if ((rc = wait_buf(c, st, b, e)) < 0)
            break;
        const uint64_t base = st->b[b].buf_dev;
        size_t nd = 0;
        uint64_t fill = 0;
        while (i < n && fill < STAGE_BYTES) {
            uint64_t take = segs[i].len - in < STAGE_BYTES - fill ? segs[i].len - in : STAGE_BYTES - fill;
            if (nd + kvt_copy_ndesc(take) > STAGE_DESCS)
                break;
            nd += kvt_copy_split(st->b[b].d + nd, base + fill, segs[i].addr + in, take);
            fill += take;
            in += take;
            if (in == segs[i].len) {
                i++;
                in = 0;
            }
        }
        rc = kvt_recv_all(fd, st->b[b].buf, fill, "response data (staged)", e);
        if (rc == 0)
            rc = launch(c, st, b, nd, e); /* scatters this buffer while the next one is received */
        b ^= 1;
    }
    CUresult r = c->StreamSynchronize(st->s);
    st->b[0].busy = st->b[1].busy = 0;
    if (rc == 0 && r != CUDA_SUCCESS)
        rc = kvt_cu_fail(e, r, "cuStreamSynchronize", "tcp staging on device %d", st->dev);
    return rc;
}
