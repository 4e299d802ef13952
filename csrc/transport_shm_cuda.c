/* shm transport, CUDA memory: same-host reads through CUDA IPC and the gather kernel.
 *
 * Each of the target's CUDA allocations is opened once (cuda_ipc.c); a job's blocks
 * are copied by one launch of cuda_copy.c's kernel on the destination's device. A
 * thread keeps up to two jobs in flight per device (a slot each: stream, pinned
 * descriptors, event), and a job completes only after its event: nothing writes the
 * destination after that. Paged jobs of whole blocks launch from their offset columns,
 * without descriptors, and from the caller's thread where its lane is free
 * (kvt_shm_cuda_take). Host memory on either side is correct, not fast: a bounce
 * buffer one way, cuMemcpyDtoH per block the other. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>

#include "cuda.h"
#include "cuda_copy.h"
#include "transport_shm_cuda.h"

/* room for the descriptors of any job: paged ones are the larger (16-byte column
 * pairs of whole-block jobs fit in it too) */
#define SLOT_DESCS (SHM_DEV_PAGED_MAX_PIECES + SHM_DEV_PAGED_MAX_BYTES / KVT_COPY_CHUNK)
#define COLS_BYTES (2 * SHM_DEV_PAGED_MAX_PIECES * sizeof(uint64_t))
#define BOUNCE_BYTES (4u << 20)
#define BOUNCE_IOVS 1024
#define FIFO_MAX (2 * KVT_CUDA_MAX_DEVICES)

/* The last remote region a lane resolved: checked and mapped once, not per block. */
typedef struct remote {
    uint64_t id, key;
    uint64_t len;
    uint32_t kind;
    int map_dev;  /* CUDA: the device (here) its allocation is opened on */
    uint64_t src; /* where the region starts in this process (CUDA: in its opened allocation) */
} remote;

typedef struct slot {
    CUstream s;       /* its own: a job's copy may start while the one before drains */
    kvt_copy_desc *h; /* pinned, device-mapped: the kernel reads its descriptors here */
    CUdeviceptr d;    /* h as the device addresses it */
    CUevent ev;
    CUdeviceptr cols; /* device memory: a whole-block job's offset columns (kvt_copy_launch_cols) */
    kvt_job *job; /* in flight, or NULL */
    /* a caller's slot (kvt_shm_cuda_take): in use from the launch until the job is
       settled; where settling looks for its device and peer */
    _Atomic int busy;
    int dev;
    shm_peer *peer;
} slot;

/* A transport thread's lane uses two slots, a caller's lane (kvt_shm_cuda_take) all
 * four: a batch's first jobs are launched one right after the other. */
#define LANE_SLOTS 4

typedef struct lane {
    int dev;
    int nslots;
    slot slots[LANE_SLOTS];
    int next;
    remote last;
} lane;

struct kvt_shm_cuda {
    lane *lanes[KVT_CUDA_MAX_DEVICES];
    struct {
        lane *l;
        int slot;
    } fifo[FIFO_MAX];
    int head, count;
    remote host_last; /* for host destinations */
    void *bounce;     /* pinned */
    struct iovec *liov, *riov;
    int cur_dev; /* whose primary context is current in this thread */
};

static int enter(kvt_shm_cuda *cu, int dev, kvt_err *e)
{
    if (cu->cur_dev == dev)
        return 0;
    int rc = kvt_cuda_enter(dev, e);
    if (rc == 0)
        cu->cur_dev = dev;
    return rc;
}

static void lane_free(const kvt_cu *c, lane *l)
{
    for (int i = 0; i < l->nslots; i++) {
        if (l->slots[i].ev)
            c->EventDestroy(l->slots[i].ev);
        if (l->slots[i].h)
            c->MemFreeHost(l->slots[i].h);
        if (l->slots[i].cols)
            c->MemFree(l->slots[i].cols);
        if (l->slots[i].s)
            c->StreamDestroy(l->slots[i].s);
    }
    free(l);
}

/* Streams and descriptor buffers on device dev (its context current). */
static lane *lane_new(int dev, int nslots, shm_peer *peer, kvt_err *e, int *rc)
{
    if (dev < 0 || dev >= KVT_CUDA_MAX_DEVICES) {
        *rc = kvt_error(e, EINVAL, "read", "CUDA device %d out of range", dev);
        return NULL;
    }
    const kvt_cu *c = kvt_cu_get(e);
    if (!c) {
        *rc = -ENODEV;
        return NULL;
    }
    if ((*rc = kvt_copy_prepare(dev, NULL, e)) < 0)
        return NULL;
    lane *l = calloc(1, sizeof *l);
    if (!l) {
        *rc = kvt_syserr(e, ENOMEM, "calloc", "lane");
        return NULL;
    }
    l->dev = dev;
    l->nslots = nslots;
    CUresult r = CUDA_SUCCESS;
    const char *what = "cuStreamCreate";
    for (int i = 0; i < nslots && r == CUDA_SUCCESS; i++) {
        l->slots[i].dev = dev;
        l->slots[i].peer = peer;
        what = "cuStreamCreate";
        r = c->StreamCreate(&l->slots[i].s, CU_STREAM_NON_BLOCKING);
        if (r == CUDA_SUCCESS) {
            what = "cuMemHostAlloc";
            r = c->MemHostAlloc((void **)&l->slots[i].h, SLOT_DESCS * sizeof(kvt_copy_desc),
                                CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP);
        }
        if (r == CUDA_SUCCESS) {
            what = "cuMemHostGetDevicePointer";
            r = c->MemHostGetDevicePointer(&l->slots[i].d, l->slots[i].h, 0);
        }
        if (r == CUDA_SUCCESS) {
            what = "cuMemAlloc";
            r = c->MemAlloc(&l->slots[i].cols, COLS_BYTES);
        }
        if (r == CUDA_SUCCESS) {
            what = "cuEventCreate";
            r = c->EventCreate(&l->slots[i].ev, kvt_trace_on() ? 0 : CU_EVENT_DISABLE_TIMING);
        }
    }
    if (r != CUDA_SUCCESS) {
        *rc = kvt_cu_fail(e, r, what, "copy buffers for %d descriptors on device %d", (int)SLOT_DESCS, dev);
        lane_free(c, l);
        return NULL;
    }
    return l;
}

/* This thread's lane on device dev (its context current). */
static lane *get_lane(kvt_shm_cuda *cu, shm_peer *s, int dev, kvt_err *e, int *rc)
{
    if (dev >= 0 && dev < KVT_CUDA_MAX_DEVICES && cu->lanes[dev])
        return cu->lanes[dev];
    lane *l = lane_new(dev, 2, s, e, rc);
    if (l)
        cu->lanes[dev] = l;
    return l;
}

/* Checks piece p against the target's table (once per region, then bounds only) and
 * finds its source address in this process. dev: the destination's device, where a
 * CUDA source is opened; -1 (host destination): the source's own device. */
static int resolve(shm_peer *s, kvt_shm_cuda *cu, remote *r, int dev, const kvt_piece *p, uint64_t *src,
                   kvt_err *e)
{
    if (r->id != p->remote_region || r->key != p->remote_key) {
        kvt_shared_slot snap;
        r->id = 0;
        int rc = kvt_shared_snapshot(s->table, p->remote_region, p->remote_key, &snap, e);
        if (rc < 0)
            return rc;
        r->len = snap.len;
        r->kind = snap.mem_kind;
        r->src = snap.addr;
        if (snap.mem_kind == KVT_MEM_CUDA) {
            r->map_dev = dev;
            if (dev < 0) {
                rc = s->same_process ? (r->map_dev = (int)snap.cuda.device, 0)
                                     : kvt_cuda_device_by_pci(snap.cuda.pci_bus_id, &r->map_dev, e);
                if (rc == 0)
                    rc = enter(cu, r->map_dev, e);
            }
            uint64_t alloc_here = 0;
            if (rc == 0)
                rc = kvt_ipc_map(s->ipc, r->map_dev, &snap.cuda, s->same_process, &alloc_here, e);
            if (rc < 0)
                return rc;
            r->src = alloc_here + (snap.addr - snap.cuda.base);
        }
        r->id = p->remote_region;
        r->key = p->remote_key;
    }
    if (p->remote_off > r->len || p->len > r->len - p->remote_off)
        return kvt_error(e, ERANGE, "read", "range [%lu, %lu) is outside region 0x%lx of %lu bytes",
                         (unsigned long)p->remote_off, (unsigned long)(p->remote_off + p->len),
                         (unsigned long)p->remote_region, (unsigned long)r->len);
    *src = r->src + p->remote_off;
    return 0;
}

/* KVTRANSFER_TRACE=1: the GPU's view of a batch, kept as the transfer's tp. The first
 * job launched records an event before its copy; each job's end is timed against it
 * when the job retires; the trace line gets the longest. */
typedef struct gpu_view {
    CUevent mark;
    _Atomic int64_t ns;
} gpu_view;

static void gpu_view_end(void *tp, char *note, size_t cap)
{
    gpu_view *v = tp;
    if (atomic_load(&v->ns) > 0)
        snprintf(note, cap, "; gpu %.1f us", atomic_load(&v->ns) / 1000.0);
    kvt_cu_get(NULL)->EventDestroy(v->mark);
    free(v);
}

static void gpu_mark(kvt_transfer *t, CUstream s)
{
    const kvt_cu *c = kvt_cu_get(NULL);
    gpu_view *v;
    if (atomic_load(&t->tp) || !c->EventElapsedTime || !(v = calloc(1, sizeof *v)))
        return;
    void *none = NULL;
    if (c->EventCreate(&v->mark, 0) != CUDA_SUCCESS) {
        free(v);
        return;
    }
    if (c->EventRecord(v->mark, s) != CUDA_SUCCESS || !atomic_compare_exchange_strong(&t->tp, &none, (void *)v)) {
        c->EventDestroy(v->mark);
        free(v);
    } else {
        t->tp_end = gpu_view_end; /* read when the transfer finishes, after every job is done */
    }
}

static void gpu_span(kvt_transfer *t, CUevent end)
{
    const kvt_cu *c = kvt_cu_get(NULL);
    gpu_view *v = atomic_load(&t->tp);
    float ms = 0;
    if (!v || c->EventElapsedTime(&ms, v->mark, end) != CUDA_SUCCESS)
        return;
    int64_t ns = (int64_t)(ms * 1e6), seen = atomic_load(&v->ns);
    while (ns > seen && !atomic_compare_exchange_weak(&v->ns, &seen, ns))
        ;
}

/* Launches the copy of the slot's first n descriptors. The kernel reads them from
 * the pinned buffer itself (over PCIe, each CTA its own): no upload to wait for
 * before the copy starts. */
static int launch(lane *l, slot *sl, size_t n, kvt_transfer *t, kvt_err *e)
{
    if (t->tr_start)
        gpu_mark(t, sl->s);
    int rc = kvt_copy_launch(l->dev, sl->s, sl->h, sl->d, n, e);
    if (rc == 0)
        kvt_trace_copy(t);
    return rc;
}

/* Device <- host blocks of a job, through the bounce buffer, on the slot's stream;
 * synchronous. */
static int from_host(shm_peer *s, kvt_shm_cuda *cu, lane *l, CUstream stream, const kvt_job *job, kvt_err *e,
                     int64_t *entry)
{
    const kvt_cu *c = kvt_cu_get(e);
    if (!cu->bounce) {
        CUresult r = c->MemHostAlloc(&cu->bounce, BOUNCE_BYTES, CU_MEMHOSTALLOC_PORTABLE);
        cu->liov = malloc(2 * BOUNCE_IOVS * sizeof(struct iovec));
        if (r != CUDA_SUCCESS || !cu->liov) {
            if (r == CUDA_SUCCESS)
                c->MemFreeHost(cu->bounce);
            cu->bounce = NULL;
            free(cu->liov);
            cu->liov = NULL;
            return r != CUDA_SUCCESS ? kvt_cu_fail(e, r, "cuMemHostAlloc", "%u-byte bounce buffer", BOUNCE_BYTES)
                                     : kvt_syserr(e, ENOMEM, "malloc", "iovecs");
        }
        cu->riov = cu->liov + BOUNCE_IOVS;
    }
    struct {
        uint64_t dst, len;
    } parts[BOUNCE_IOVS];
    size_t i = 0;
    uint64_t in_piece = 0; /* bytes of piece i already done */
    while (i < job->n) {
        size_t n = 0;
        uint64_t fill = 0;
        int64_t first_entry = -1;
        for (; i < job->n && n < BOUNCE_IOVS && fill < BOUNCE_BYTES;) {
            const kvt_piece *p = &job->pieces[i];
            uint64_t src;
            int rc = resolve(s, cu, &l->last, l->dev, p, &src, e);
            if (rc < 0) {
                *entry = (int64_t)p->entry;
                return rc;
            }
            if (l->last.kind != KVT_MEM_HOST) {
                i++;
                continue;
            }
            uint64_t take = p->len - in_piece < BOUNCE_BYTES - fill ? p->len - in_piece : BOUNCE_BYTES - fill;
            cu->liov[n] = (struct iovec){(char *)cu->bounce + fill, take};
            cu->riov[n] = (struct iovec){(void *)(uintptr_t)(src + in_piece), take};
            parts[n].dst = p->local_addr + in_piece;
            parts[n].len = take;
            if (first_entry < 0)
                first_entry = (int64_t)p->entry;
            n++;
            fill += take;
            in_piece += take;
            if (in_piece == p->len) {
                in_piece = 0;
                i++;
            }
        }
        if (n == 0)
            break;
        uint64_t done = 0;
        int rc = kvt_shm_readv(s, cu->liov, cu->riov, n, fill, &done, e);
        if (rc < 0) {
            *entry = first_entry;
            return rc;
        }
        uint64_t off = 0;
        for (size_t k = 0; k < n; k++) {
            CUresult r = c->MemcpyHtoDAsync(parts[k].dst, (char *)cu->bounce + off, parts[k].len, stream);
            if (r != CUDA_SUCCESS) {
                *entry = first_entry;
                return kvt_cu_fail(e, r, "cuMemcpyHtoDAsync", "%lu bytes to 0x%lx on device %d",
                                   (unsigned long)parts[k].len, (unsigned long)parts[k].dst, l->dev);
            }
            off += parts[k].len;
        }
        CUresult r = c->StreamSynchronize(stream); /* before the bounce buffer is filled again */
        if (r != CUDA_SUCCESS) {
            *entry = first_entry;
            return kvt_cu_fail(e, r, "cuStreamSynchronize", "device %d", l->dev);
        }
    }
    return 0;
}

static void complete(shm_peer *s, kvt_job *job, int rc, kvt_err *e, int64_t entry)
{
    if (rc == 0)
        rc = kvt_shm_verify(s, job, e, &entry);
    kvt_job_done(job, rc, rc < 0 ? e : NULL, entry);
}

/* Waits for the copy in flight on a slot (its device's context current). */
static int wait_slot(slot *sl, const kvt_job *job, kvt_err *e)
{
    CUresult r = kvt_cu_get(e)->EventSynchronize(sl->ev);
    if (r != CUDA_SUCCESS)
        return kvt_cu_fail(e, r, "cuEventSynchronize", "copy of %zu blocks on device %d", job->n, sl->dev);
    if (job->t->tr_start)
        gpu_span(job->t, sl->ev);
    return 0;
}

void kvt_shm_cuda_retire(shm_peer *s, kvt_shm_cuda *cu)
{
    if (!cu || cu->count == 0)
        return;
    lane *l = cu->fifo[cu->head].l;
    slot *sl = &l->slots[cu->fifo[cu->head].slot];
    cu->head = (cu->head + 1) % FIFO_MAX;
    cu->count--;
    kvt_job *job = sl->job;
    sl->job = NULL;
    kvt_err e;
    int rc = enter(cu, l->dev, &e);
    if (rc == 0)
        rc = wait_slot(sl, job, &e);
    complete(s, job, rc, &e, (int64_t)job->pieces[0].entry);
}

/* A paged job's descriptors straight from its batch's columns, without pieces: the
 * source region is looked up once and every range's bounds are checked in the same
 * loop. The number of descriptors; 0 when the pieces path must take the job (the
 * source is host memory, or a range is out of bounds: that path names the entry);
 * -errno when the source region is not there. */
static long paged_descs(shm_peer *s, kvt_shm_cuda *cu, lane *l, const kvt_job *job, kvt_copy_desc *out, kvt_err *e)
{
    const kvt_paged_cols *b = job->paged;
    const kvt_piece whole = {.remote_region = b->remote_region, .remote_key = b->remote_key, .entry = job->e0};
    uint64_t src0;
    int rc = resolve(s, cu, &l->last, l->dev, &whole, &src0, e);
    if (rc < 0)
        return rc;
    if (l->last.kind != KVT_MEM_CUDA)
        return 0;
    const uint64_t rlen = l->last.len, dst0 = b->local_base;
    uint64_t bad = 0;
    size_t n = 0;
    for (size_t i = job->e0; i <= job->e1; i++) {
        const uint64_t len = b->ln ? b->ln[i] : b->len0;
        const uint64_t from = i == job->e0 ? job->off0 : 0, to = i == job->e1 ? job->end1 : len;
        const uint64_t ro = b->ro[i] + from, k = to - from;
        bad |= (uint64_t)(ro > rlen) | (uint64_t)(k > rlen - ro);
        n += kvt_copy_split(out + n, src0 + ro, dst0 + b->lo[i] + from, k);
    }
    return bad ? 0 : (long)n;
}

/* A paged job of whole blocks of one length, launched without descriptors: its two
 * offset columns go to the slot's pinned buffer (remote bounds checked on the way)
 * and the kernel computes each block's addresses: 16 bytes a block, so jobs can be
 * large. cu is NULL in the caller's thread. 1 launched; 0 when the job is not of that
 * shape, its source is not CUDA memory, or a range is out of bounds (the descriptor
 * path takes it, and names the entry); -errno. */
static int cols_launch(shm_peer *s, kvt_shm_cuda *cu, lane *l, slot *sl, const kvt_job *job, kvt_err *e)
{
    const kvt_paged_cols *b = job->paged;
    if (b->ln || job->off0 != 0 || job->end1 != b->len0)
        return 0;
    const kvt_piece whole = {.remote_region = b->remote_region, .remote_key = b->remote_key, .entry = job->e0};
    uint64_t src0;
    int rc = resolve(s, cu, &l->last, l->dev, &whole, &src0, e);
    if (rc < 0)
        return rc;
    if (l->last.kind != KVT_MEM_CUDA || b->len0 > l->last.len)
        return 0;
    const size_t n = job->e1 - job->e0 + 1;
    const uint64_t last = l->last.len - b->len0, *bro = b->ro + job->e0, *blo = b->lo + job->e0;
    uint64_t *ro = (uint64_t *)sl->h, *lo = ro + n, bad = 0;
    for (size_t i = 0; i < n; i++) { /* ro[i] > last, or ro[i] >= 2^63: top bit set */
        bad |= (last - bro[i]) | bro[i];
        ro[i] = bro[i];
        lo[i] = blo[i];
    }
    if (bad >> 63)
        return 0;
    if (job->t->tr_start)
        gpu_mark(job->t, sl->s);
    const kvt_copy_cols c = {.offs = ro, .offs_dev = sl->d, .src = src0, .dst = b->local_base, .len = b->len0, .n = n};
    rc = kvt_copy_launch_cols(l->dev, sl->s, &c, sl->cols, e);
    if (rc == -EOPNOTSUPP)
        return 0;
    if (rc == 0)
        kvt_trace_copy(job->t);
    return rc < 0 ? rc : 1;
}

/* A job's descriptors from its pieces, written to the slot: their number, or -errno
 * (*entry: the piece at fault). Blocks from host memory are counted in *nhost and
 * left for from_host. */
static long piece_descs(shm_peer *s, kvt_shm_cuda *cu, lane *l, slot *sl, kvt_job *job, size_t *nhost, kvt_err *e,
                        int64_t *entry)
{
    size_t n = 0;
    int rc = 0;
    for (size_t i = 0; i < job->n && rc == 0; i++) {
        const kvt_piece *p = &job->pieces[i];
        uint64_t src;
        rc = resolve(s, cu, &l->last, l->dev, p, &src, e);
        if (rc == 0 && l->last.kind == KVT_MEM_HOST) {
            (*nhost)++;
            continue;
        }
        if (rc == 0)
            n += kvt_copy_split(sl->h + n, src, p->local_addr, p->len);
        else
            *entry = (int64_t)p->entry;
    }
    return rc < 0 ? rc : (long)n;
}

static void dev_job(shm_peer *s, kvt_shm_cuda *cu, kvt_job *job)
{
    kvt_err e;
    int64_t entry = (int64_t)job->pieces[0].entry;
    int dev = job->local_dev;
    int rc = enter(cu, dev, &e);
    lane *l = rc == 0 ? get_lane(cu, s, dev, &e, &rc) : NULL;
    if (!l) {
        kvt_job_done(job, rc, &e, entry);
        return;
    }
    const kvt_cu *c = kvt_cu_get(&e);
    int si = l->next;
    slot *sl = &l->slots[si];
    while (sl->job) /* its previous job: retire in order until it is done */
        kvt_shm_cuda_retire(s, cu);
    rc = enter(cu, dev, &e); /* retiring may have switched devices */
    if (rc < 0) {
        kvt_job_done(job, rc, &e, entry);
        return;
    }
    l->next ^= 1;
    size_t nhost = 0;
    rc = job->paged ? cols_launch(s, cu, l, sl, job, &e) : 0;
    if (rc == 0) {
        long n = job->paged ? paged_descs(s, cu, l, job, sl->h, &e) : 0;
        if (n == 0) { /* not paged, or the paged path handed it over */
            if (job->paged)
                kvt_job_materialize(job);
            n = piece_descs(s, cu, l, sl, job, &nhost, &e, &entry);
        }
        rc = n < 0 ? (int)n : n > 0 ? launch(l, sl, (size_t)n, job->t, &e) : 0;
    } else if (rc > 0) {
        rc = 0;
    }
    if (rc == 0 && nhost)
        rc = from_host(s, cu, l, sl->s, job, &e, &entry);
    if (rc == 0 && !nhost) {
        CUresult r = c->EventRecord(sl->ev, sl->s);
        if (r == CUDA_SUCCESS) {
            sl->job = job;
            int tail = (cu->head + cu->count) % FIFO_MAX;
            cu->fifo[tail].l = l;
            cu->fifo[tail].slot = si;
            cu->count++;
            return;
        }
        rc = kvt_cu_fail(&e, r, "cuEventRecord", "device %d", dev);
    }
    /* Completed here (an error, or host sources): first wait for what was launched,
     * so that nothing writes the destination once the job is done. */
    CUresult r = c->StreamSynchronize(sl->s);
    if (rc == 0 && r != CUDA_SUCCESS)
        rc = kvt_cu_fail(&e, r, "cuStreamSynchronize", "device %d", dev);
    complete(s, job, rc, &e, entry);
}

void kvt_shm_cuda_settle(kvt_job *job)
{
    slot *sl = job->tp;
    kvt_err e;
    int rc = kvt_cuda_push(sl->dev, &e);
    if (rc == 0) {
        rc = wait_slot(sl, job, &e);
        kvt_cuda_pop();
    }
    if (rc == 0) /* else the copy may still run: the slot is never used again */
        atomic_store(&sl->busy, 0);
    complete(sl->peer, job, rc, &e, (int64_t)job->e0);
}

int kvt_shm_cuda_take(void *ctx, kvt_job *job)
{
    shm_peer *s = ctx;
    const kvt_paged_cols *b = job->paged;
    const int dev = job->local_dev;
    if (!b || job->local_kind != KVT_MEM_CUDA || dev < 0 || dev >= KVT_CUDA_MAX_DEVICES ||
        pthread_mutex_trylock(&s->caller_mu) != 0)
        return 0;
    kvt_err e;
    int rc = kvt_cuda_push(dev, &e);
    if (rc < 0) {
        pthread_mutex_unlock(&s->caller_mu);
        return 0; /* the transport thread says why */
    }
    lane *l = s->caller_lanes[dev] ? s->caller_lanes[dev] : (s->caller_lanes[dev] = lane_new(dev, LANE_SLOTS, s, &e, &rc));
    slot *sl = NULL;
    for (int i = 0; l && !sl && i < l->nslots; i++) {
        slot *c = &l->slots[(l->next + i) % l->nslots];
        if (!atomic_load(&c->busy))
            sl = c;
    }
    rc = sl ? cols_launch(s, NULL, l, sl, job, &e) : 0;
    if (rc > 0) {
        CUresult r = kvt_cu_get(&e)->EventRecord(sl->ev, sl->s);
        rc = r == CUDA_SUCCESS ? 1 : kvt_cu_fail(&e, r, "cuEventRecord", "device %d", dev);
    }
    if (rc < 0) /* nothing may write the destination once the job is done */
        kvt_cu_get(NULL)->StreamSynchronize(sl->s);
    if (rc > 0) {
        atomic_store(&sl->busy, 1);
        l->next = (int)(sl - l->slots + 1) % l->nslots;
        job->tp = sl;
    }
    kvt_cuda_pop();
    pthread_mutex_unlock(&s->caller_mu);
    if (rc > 0 && kvt_queue_push(s->queue, job) < 0) /* a transport thread settles it ... */
        kvt_shm_cuda_settle(job); /* ... or, the peer closing, this one */
    else if (rc < 0)
        kvt_job_done(job, rc, &e, (int64_t)job->e0);
    return rc != 0;
}

void kvt_shm_caller_lanes_end(shm_peer *s)
{
    kvt_err e;
    const kvt_cu *c = kvt_cu_get(&e);
    for (int dev = 0; dev < KVT_CUDA_MAX_DEVICES; dev++) {
        if (s->caller_lanes[dev] && kvt_cuda_push(dev, &e) == 0) {
            lane_free(c, s->caller_lanes[dev]);
            kvt_cuda_pop();
        }
    }
    pthread_mutex_destroy(&s->caller_mu);
}

/* Host destination, some source in CUDA memory: one cuMemcpyDtoH per block. */
static void host_job(shm_peer *s, kvt_shm_cuda *cu, kvt_job *job)
{
    kvt_err e;
    int64_t entry = (int64_t)job->pieces[0].entry;
    int rc = 0;
    const kvt_cu *c = kvt_cu_get(&e);
    for (size_t i = 0; i < job->n && rc == 0; i++) {
        const kvt_piece *p = &job->pieces[i];
        uint64_t src;
        entry = (int64_t)p->entry;
        rc = resolve(s, cu, &cu->host_last, -1, p, &src, &e);
        if (rc < 0)
            break;
        if (cu->host_last.kind == KVT_MEM_CUDA) {
            rc = enter(cu, cu->host_last.map_dev, &e);
            CUresult r = rc == 0 ? c->MemcpyDtoH((void *)(uintptr_t)p->local_addr, src, p->len) : CUDA_SUCCESS;
            if (r != CUDA_SUCCESS)
                rc = kvt_cu_fail(&e, r, "cuMemcpyDtoH", "%lu bytes from device %d", (unsigned long)p->len,
                                 cu->host_last.map_dev);
        } else {
            struct iovec l = {(void *)(uintptr_t)p->local_addr, p->len}, r = {(void *)(uintptr_t)src, p->len};
            uint64_t done;
            rc = kvt_shm_readv(s, &l, &r, 1, p->len, &done, &e);
        }
    }
    complete(s, job, rc, &e, entry);
}

void kvt_shm_cuda_job(shm_peer *s, kvt_shm_cuda **cup, kvt_job *job)
{
    kvt_err e;
    if (!*cup) {
        if (!kvt_cu_get(&e)) {
            kvt_job_done(job, e.code, &e, (int64_t)job->pieces[0].entry);
            return;
        }
        kvt_shm_cuda *cu = calloc(1, sizeof *cu);
        if (!cu) {
            kvt_syserr(&e, ENOMEM, "calloc", "CUDA state");
            kvt_job_done(job, -ENOMEM, &e, (int64_t)job->pieces[0].entry);
            return;
        }
        cu->cur_dev = -1;
        *cup = cu;
    }
    if (job->local_kind == KVT_MEM_CUDA)
        dev_job(s, *cup, job);
    else
        host_job(s, *cup, job);
}

int kvt_shm_cuda_busy(const kvt_shm_cuda *cu) { return cu && cu->count > 0; }

void kvt_shm_cuda_end(shm_peer *s, kvt_shm_cuda *cu)
{
    if (!cu)
        return;
    while (cu->count)
        kvt_shm_cuda_retire(s, cu);
    kvt_err e;
    const kvt_cu *c = kvt_cu_get(&e);
    for (int d = 0; d < KVT_CUDA_MAX_DEVICES; d++) {
        if (cu->lanes[d] && enter(cu, d, &e) == 0)
            lane_free(c, cu->lanes[d]);
    }
    if (cu->bounce)
        c->MemFreeHost(cu->bounce);
    free(cu->liov);
    free(cu);
}
