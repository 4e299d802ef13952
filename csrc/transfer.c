#define _GNU_SOURCE
#include "transfer.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Column buffers of lazily cut batches, kept for reuse process-wide (a few, up to
 * 4 MiB each): allocating and freeing ~400 KB per batch would map and unmap fresh
 * pages each time, and unmapping costs every core a TLB shootdown. */
#define COLS_CACHE 4
#define COLS_CACHE_MAX (4u << 20)
static struct {
    pthread_mutex_t mu;
    void *buf[COLS_CACHE];
    size_t cap[COLS_CACHE];
} cols_cache = {.mu = PTHREAD_MUTEX_INITIALIZER};

static void *cols_alloc(size_t bytes, size_t *cap)
{
    pthread_mutex_lock(&cols_cache.mu);
    for (int i = 0; i < COLS_CACHE; i++) {
        if (cols_cache.buf[i] && cols_cache.cap[i] >= bytes) {
            void *p = cols_cache.buf[i];
            *cap = cols_cache.cap[i];
            cols_cache.buf[i] = NULL;
            pthread_mutex_unlock(&cols_cache.mu);
            return p;
        }
    }
    pthread_mutex_unlock(&cols_cache.mu);
    *cap = bytes;
    return malloc(bytes);
}

static void cols_free(void *p, size_t cap)
{
    if (!p)
        return;
    if (cap <= COLS_CACHE_MAX) {
        pthread_mutex_lock(&cols_cache.mu);
        int slot = -1;
        for (int i = 0; i < COLS_CACHE && slot < 0; i++)
            if (!cols_cache.buf[i])
                slot = i;
        for (int i = 0; i < COLS_CACHE && slot < 0; i++) /* else replace a smaller one */
            if (cols_cache.cap[i] < cap)
                slot = i;
        if (slot >= 0) {
            void *old = cols_cache.buf[slot];
            cols_cache.buf[slot] = p;
            cols_cache.cap[slot] = cap;
            p = old;
        }
        pthread_mutex_unlock(&cols_cache.mu);
    }
    free(p);
}

static void transfer_unref(kvt_transfer *t)
{
    if (atomic_fetch_sub(&t->refs, 1) != 1)
        return;
    pthread_mutex_destroy(&t->mu);
    pthread_cond_destroy(&t->cv);
    free(t->local_ids);
    if (t->batch) {
        cols_free(t->batch->lo, t->batch->cap);
        free(t->batch);
    }
    free(t);
}

static void release_locals(kvt_transfer *t)
{
    for (size_t i = 0; i < t->n_local; i++)
        kvt_table_release(t->table, t->local_ids[i]);
    t->n_local = 0;
}

int kvt_trace_on(void)
{
    static _Atomic int on = -1;
    int v = atomic_load(&on);
    if (v < 0) {
        const char *e = getenv("KVTRANSFER_TRACE");
        v = e && *e && strcmp(e, "0") != 0;
        atomic_store(&on, v);
    }
    return v;
}

int64_t kvt_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

void kvt_trace_launch(kvt_transfer *t)
{
    if (!t->tr_start)
        return;
    int64_t now = kvt_now_ns(), zero = 0;
    atomic_compare_exchange_strong(&t->tr_launch1, &zero, now);
    atomic_store(&t->tr_launchn, now);
}

static void trace_print(kvt_transfer *t)
{
    static _Atomic int64_t last;
    int64_t now = kvt_now_ns(), l = atomic_load(&last);
    if (t->tr_entries < 1000 || now - l < 100000000 || !atomic_compare_exchange_strong(&last, &l, now))
        return;
    int64_t s = t->tr_start;
#define US(x) ((x) ? ((x) - s) / 1000.0 : -1.0)
    char gpu[48] = ""; /* shm's CUDA path: how long the GPU worked on the batch */
    if (atomic_load(&t->tr_gpu_ns) > 0)
        snprintf(gpu, sizeof gpu, "; gpu %.1f us", atomic_load(&t->tr_gpu_ns) / 1000.0);
    fprintf(stderr, "kvtransfer trace: %zu entries, %zu jobs: checked +%.1f us, cut +%.1f, first pop +%.1f, first launch "
            "+%.1f, last launch +%.1f, done +%.1f us%s\n", t->tr_entries, t->tr_jobs, US(t->tr_checked),
            US(t->tr_cut), US(atomic_load(&t->tr_pop)), US(atomic_load(&t->tr_launch1)),
            US(atomic_load(&t->tr_launchn)), US(now), gpu);
#undef US
}

static void finish(kvt_transfer *t)
{
    if (t->tr_start)
        trace_print(t);
    void *mark = atomic_load(&t->tr_gpu_mark);
    if (mark && t->tr_gpu_free)
        t->tr_gpu_free(mark);
    /* the destination is no longer written: let its regions go */
    release_locals(t);
    pthread_mutex_lock(&t->mu);
    if (t->status == 1)
        t->status = 0;
    t->finished = 1;
    atomic_store(&t->done, 1);
    if (t->notify_fd >= 0) {
        uint64_t one = 1;
        ssize_t w = write(t->notify_fd, &one, sizeof one);
        (void)w;
    }
    pthread_cond_broadcast(&t->cv);
    pthread_mutex_unlock(&t->mu);
    transfer_unref(t);
}

static void start_done(kvt_transfer *t)
{
    if (atomic_fetch_sub(&t->pending, 1) == 1)
        finish(t);
}

int kvt_job_skip_if_failed(kvt_job *job)
{
    pthread_mutex_lock(&job->t->mu);
    int st = job->t->status;
    pthread_mutex_unlock(&job->t->mu);
    if (st >= 0)
        return 0;
    kvt_job_done(job, st, NULL, -1); /* the first error stays the transfer's error */
    return 1;
}

#define POOL_MAX 32

static void job_put(kvt_job *j)
{
    kvt_queue *q = j->home;
    if (q) {
        pthread_mutex_lock(&q->pool_mu);
        if (q->pool_n < POOL_MAX) {
            j->next = q->pool;
            q->pool = j;
            q->pool_n++;
            j = NULL;
        }
        pthread_mutex_unlock(&q->pool_mu);
    }
    free(j);
}

/* The first error stays the transfer's error. */
static void fail(kvt_transfer *t, int rc, const kvt_err *err, int64_t entry)
{
    pthread_mutex_lock(&t->mu);
    if (t->status == 1) {
        t->status = rc;
        if (err)
            t->err = *err;
        else
            kvt_error(&t->err, -rc, "read", "failed");
        t->err_entry = entry;
    }
    pthread_mutex_unlock(&t->mu);
}

void kvt_job_done(kvt_job *job, int rc, const kvt_err *err, int64_t entry)
{
    kvt_transfer *t = job->t;
    job_put(job);
    if (rc < 0)
        fail(t, rc, err, entry);
    if (atomic_fetch_sub(&t->pending, 1) == 1)
        finish(t);
}

/* The local regions of a batch: each distinct id is looked up (and referenced) once. */
typedef struct local_set {
    kvt_region_view *views; /* parallel to t->local_ids */
    size_t cap;
    size_t last; /* index of the last one used: batches rarely switch */
} local_set;

static int hold_local(kvt_transfer *t, local_set *ls, uint64_t id, size_t entry, kvt_err *err)
{
    if (t->n_local && t->local_ids[ls->last] == id)
        return 0;
    for (size_t i = t->n_local; i-- > 0;)
        if (t->local_ids[i] == id) {
            ls->last = i;
            return 0;
        }
    if (t->n_local == ls->cap) {
        size_t nc = ls->cap ? ls->cap * 2 : 4;
        uint64_t *p = realloc(t->local_ids, nc * sizeof *p);
        if (p)
            t->local_ids = p;
        kvt_region_view *v = p ? realloc(ls->views, nc * sizeof *v) : NULL;
        if (!v)
            return kvt_syserr(err, ENOMEM, "realloc", "%zu local regions", nc);
        ls->views = v;
        ls->cap = nc;
    }
    kvt_region_view v;
    kvt_err e;
    int rc = kvt_table_acquire(t->table, id, 0, 0, 0, 0, &v, &e);
    if (rc < 0)
        return kvt_error(err, -rc, "read", "entry %zu: local %s", entry, e.msg);
    ls->last = t->n_local;
    ls->views[t->n_local] = v;
    t->local_ids[t->n_local++] = id;
    return 0;
}

static kvt_job *new_job(kvt_transfer *t, kvt_queue *q, size_t max_pieces, const kvt_region_view *lv)
{
    kvt_job *j = NULL;
    pthread_mutex_lock(&q->pool_mu);
    for (kvt_job **pp = &q->pool; *pp; pp = &(*pp)->next) {
        if ((*pp)->cap == max_pieces) {
            j = *pp;
            *pp = j->next;
            q->pool_n--;
            break;
        }
    }
    pthread_mutex_unlock(&q->pool_mu);
    if (!j && (j = malloc(sizeof *j + max_pieces * sizeof(kvt_piece))) != NULL) {
        j->home = q;
        j->cap = max_pieces;
    }
    if (j) {
        j->next = NULL;
        j->batch = NULL;
        j->settle = NULL;
        j->settle_arg = NULL;
        j->t = t;
        j->n = 0;
        j->bytes = 0;
        j->local_kind = (int)lv->mem_kind;
        j->local_dev = lv->mem_kind == KVT_MEM_HOST ? -1 : (int)lv->device;
    }
    return j;
}

static inline uint64_t col(const kvt_col *c, size_t i) { return c->p[i * c->stride]; }

/* Job limits: the first jobs into device memory are smaller (1/16, 1/4), so the GPU
 * starts copying sooner while the rest of the batch is cut, and the next job is ready
 * before the GPU runs out (1/8 then the rest measured worse: bench/README.md). */
static kvt_job_limits job_limits(const kvt_job_limits lim[2], int kind, int *dev_jobs)
{
    const kvt_job_limits *cl = &lim[kind == KVT_MEM_HOST ? 0 : 1];
    kvt_job_limits jl = *cl;
    if (kind != KVT_MEM_HOST && *dev_jobs < 2) {
        int shift = *dev_jobs == 0 ? 4 : 2;
        jl.pieces = cl->pieces >> shift > 0 ? cl->pieces >> shift : 1;
        jl.bytes = cl->bytes >> shift > 0 ? cl->bytes >> shift : 1;
    }
    *dev_jobs += kind != KVT_MEM_HOST;
    return jl;
}

static void push_job(kvt_transfer *t, kvt_queue *q, kvt_job *j);

/* Whether entries of `len` bytes fill every job of this kind exactly (each limit
 * job_limits hands out, the smaller first ones too): then no entry is split. */
static int whole_entries(const kvt_job_limits lim[2], int kind, uint64_t len)
{
    for (int dev_jobs = 0; dev_jobs < 3;) {
        kvt_job_limits jl = job_limits(lim, kind, &dev_jobs);
        if (len == 0 || jl.bytes % len != 0)
            return 0;
        if (kind == KVT_MEM_HOST)
            break; /* host jobs are all alike */
    }
    return 1;
}

/* Cuts a one-region-to-one-region batch into lazy jobs (see kvt_batch), the same jobs
 * and pieces the general path makes. */
static int cut_lazy(kvt_transfer *t, const kvt_read_cols *c, const kvt_region_view *lv, const kvt_job_limits lim[2],
                    kvt_queue *q, kvt_err *err)
{
    size_t n = c->n;
    kvt_batch *b = calloc(1, sizeof *b);
    uint64_t *cols = b ? cols_alloc((c->len.stride ? 3 : 2) * n * sizeof(uint64_t), &b->cap) : NULL;
    if (!cols) {
        free(b);
        return kvt_syserr(err, ENOMEM, "malloc", "columns of %zu entries", n);
    }
    b->lo = cols;
    b->ro = cols + n;
    b->ln = c->len.stride ? cols + 2 * n : NULL;
    b->len0 = c->len.p[0];
    b->local_base = lv->addr;
    b->lkey = lv->lkey;
    b->remote_region = c->remote_region.p[0];
    b->remote_key = c->remote_key.p[0];
    b->remote_addr = c->remote_addr.p[0];
    t->batch = b;

    /* A job's columns are copied just before it is queued: the first job goes out
     * after copying its own entries, not the whole batch's. */
    const uint64_t *lo = c->local_off.p, *ro = c->remote_off.p, *ln = c->len.p;
    const size_t so = c->local_off.stride, sr = c->remote_off.stride, sl = c->len.stride;
    size_t copied = 0; /* entries [0, copied) are in b */
#define COPY_UPTO(end)                                                                                               \
    do {                                                                                                             \
        for (; copied < (end); copied++) {                                                                           \
            b->lo[copied] = lo[copied * so];                                                                         \
            b->ro[copied] = ro[copied * sr];                                                                         \
            if (b->ln)                                                                                               \
                b->ln[copied] = ln[copied * sl];                                                                     \
        }                                                                                                            \
    } while (0)
    int kind = (int)lv->mem_kind, dev_jobs = 0;
    kvt_job_limits jl = {0, 0};
    if (!b->ln && whole_entries(lim, kind, b->len0)) {
        /* one length dividing every job's byte limit (read_blocks' usual shape): the
           same jobs as the loop below makes, each a count of whole entries, cut without
           visiting the entries (16,384 blocks: a column copy, not ~5 ns per block) */
        for (size_t i = 0; i < n;) {
            jl = job_limits(lim, kind, &dev_jobs);
            size_t k = (size_t)(jl.bytes / b->len0);
            k = k < jl.pieces ? k : jl.pieces;
            k = k < n - i ? k : n - i;
            kvt_job *j = new_job(t, q, lim[kind == KVT_MEM_HOST ? 0 : 1].pieces, lv);
            if (!j)
                return kvt_syserr(err, ENOMEM, "malloc", "job");
            j->batch = b;
            j->e0 = i;
            j->e1 = i + k - 1;
            j->off0 = 0;
            j->end1 = b->len0;
            j->n = k;
            j->bytes = k * b->len0;
            j->pieces[0].entry = i;
            if (so == 1 && sr == 1) {
                memcpy(b->lo + i, lo + i, k * sizeof *lo);
                memcpy(b->ro + i, ro + i, k * sizeof *ro);
                copied = i + k;
            } else {
                COPY_UPTO(i + k);
            }
            push_job(t, q, j);
            i += k;
        }
        return 0;
    }
    kvt_job *cur = NULL;
    for (size_t i = 0; i < n; i++) {
        uint64_t len = ln[i * sl];
        for (uint64_t done = 0; done < len;) {
            if (!cur || cur->n == jl.pieces || cur->bytes >= jl.bytes) {
                if (cur) {
                    COPY_UPTO(cur->e1 + 1);
                    push_job(t, q, cur);
                }
                jl = job_limits(lim, kind, &dev_jobs);
                cur = new_job(t, q, lim[kind == KVT_MEM_HOST ? 0 : 1].pieces, lv);
                if (!cur)
                    return kvt_syserr(err, ENOMEM, "malloc", "job");
                cur->batch = b;
                cur->e0 = i;
                cur->off0 = done;
                cur->pieces[0].entry = i;
            }
            uint64_t room = jl.bytes - cur->bytes;
            uint64_t take = len - done < room ? len - done : room;
            cur->n++;
            cur->bytes += take;
            done += take;
            cur->e1 = i;
            cur->end1 = done;
        }
    }
    if (cur) {
        COPY_UPTO(n);
        push_job(t, q, cur);
    }
#undef COPY_UPTO
    return 0;
}

/* Each entry of a lazy job is one piece. */
void kvt_job_materialize(kvt_job *j)
{
    const kvt_batch *b = j->batch;
    if (!b)
        return; /* cut with its pieces, or written already */
    size_t k = 0;
    for (size_t i = j->e0; i <= j->e1; i++) {
        uint64_t len = b->ln ? b->ln[i] : b->len0;
        uint64_t start = i == j->e0 ? j->off0 : 0, end = i == j->e1 ? j->end1 : len;
        j->pieces[k++] = (kvt_piece){.local_addr = b->local_base + b->lo[i] + start,
                                     .remote_region = b->remote_region,
                                     .remote_key = b->remote_key,
                                     .remote_off = b->ro[i] + start,
                                     .remote_addr = b->remote_addr + b->ro[i] + start,
                                     .len = end - start,
                                     .entry = i,
                                     .lkey = b->lkey};
    }
    j->batch = NULL;
}

static void push_job(kvt_transfer *t, kvt_queue *q, kvt_job *j)
{
    t->tr_jobs++;
    atomic_fetch_add(&t->pending, 1);
    if (!q->direct || !q->direct(q->direct_ctx, j))
        kvt_queue_push(q, j);
}

/* Every job is queued (or cutting failed: the transfer fails, with what was queued
 * still finishing): the transfer is the caller's from here. */
static int started(kvt_transfer *t, int rc, const kvt_err *err, kvt_transfer **out)
{
    if (rc < 0)
        fail(t, rc, err, -1);
    if (t->tr_start)
        t->tr_cut = kvt_now_ns();
    *out = t;
    start_done(t);
    return 0;
}

/* read_blocks' ranges, 256 entries at a time: how many entries lead the batch in
 * blocks of 256 with every local offset at most `last` and no offset negative (see
 * the caller). With AVX2 where the CPU has it (half the time of SSE2), chosen when
 * the library loads. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
static size_t good_blocks(const uint64_t *lo, const uint64_t *ro, size_t n, uint64_t last)
{
    size_t i = 0;
    for (; i + 256 <= n; i += 256) {
        uint64_t bad = 0;
        for (size_t k = 0; k < 256; k++)
            bad |= (last - lo[i + k]) | lo[i + k] | ro[i + k];
        if (bad >> 63)
            break;
    }
    return i;
}

/* Batches this long take long enough to check and cut (several microseconds) that
 * waking the transport threads first hides their wake-up. */
#define KICK_ENTRIES 256

int kvt_transfer_start(kvt_region_table *table, const kvt_read_cols *c, enum kvt_batch_kind kind,
                       const kvt_job_limits lim[3], kvt_queue *q, kvt_transfer **out, kvt_err *err)
{
    const int paged = kind == KVT_BATCH_PAGED; /* one local and one remote region: cut lazily (cut_lazy) */
    if (c->n == 0)
        return kvt_error(err, EINVAL, "read", "empty batch");
    kvt_transfer *t = calloc(1, sizeof *t);
    if (!t)
        return kvt_syserr(err, ENOMEM, "calloc", "transfer");
    pthread_mutex_init(&t->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC); /* deadlines below are monotonic */
    pthread_cond_init(&t->cv, &ca);
    pthread_condattr_destroy(&ca);
    t->status = 1;
    t->notify_fd = -1;
    t->err_entry = -1;
    t->table = table;
    atomic_store(&t->refs, 2);
    atomic_store(&t->pending, 1); /* a guard, dropped once every job is queued */
    if (kvt_trace_on()) {
        t->tr_start = kvt_now_ns();
        t->tr_entries = c->n;
    }
    /* Sleeping transport threads wake while the ranges are checked and cut; not where
     * the caller will start the copies itself (a queue's direct hook, read_blocks into
     * GPU memory): there the kick delays the first launch, and queueing the started
     * jobs wakes the threads that settle them. */
    int kick = c->n >= KICK_ENTRIES;
    if (kick && !(q->direct && paged && c->len.stride == 0)) {
        kvt_queue_kick(q);
        kick = 0;
    }

    /* Pass 1: every local range, before anything is queued. One local region (the
     * common case) is looked up once and its ranges checked in a tight loop; the
     * general loop below runs when that finds a bad entry, to say which and why. */
    local_set ls = {0};
    int rc = 0;
    size_t from = 0;
    if (c->local_region.stride == 0 &&
        (rc = hold_local(t, &ls, c->local_region.p[0], 0, err)) == 0) {
        if (kick && ls.views[0].mem_kind == KVT_MEM_HOST)
            kvt_queue_kick(q);
        const uint64_t rlen = ls.views[0].region_len;
        const uint64_t *lo = c->local_off.p, *ln = c->len.p, *ro = c->remote_off.p;
        const size_t so = c->local_off.stride, sl = c->len.stride, sr = c->remote_off.stride;
        size_t i = 0;
        if (so == 1 && sr == 1 && sl == 0 && ln[0] != 0 && ln[0] <= rlen) {
            /* read_blocks' shape (offset arrays, one length): blocks of 256 entries checked
               with subtractions and ORs alone, which the compiler vectorizes (x86-64 has no
               64-bit vector compare before SSE4.2): last - lo has its top bit set exactly
               when lo > last, for lo below 2^63, and lo's own top bit catches the rest; a
               negative remote offset has its top bit set. The loop below finds the entry
               at fault in a bad block. */
            i = good_blocks(lo, ro, c->n, rlen - ln[0]);
        }
        for (; i < c->n; i++) {
            uint64_t off = lo[i * so], len = ln[i * sl];
            if (len == 0 || off > rlen || len > rlen - off || (int64_t)ro[i * sr] < 0)
                break;
        }
        from = i;
    }
    for (size_t i = from; i < c->n && rc == 0; i++) {
        uint64_t id = col(&c->local_region, i), off = col(&c->local_off, i), len = col(&c->len, i);
        int64_t roff = (int64_t)col(&c->remote_off, i);
        if (len == 0 || (int64_t)len < 0 || (int64_t)off < 0 || roff < 0) {
            const char *what = len == 0 ? "length is 0" : (int64_t)len < 0 ? "negative length"
                             : (int64_t)off < 0 ? "negative local offset" : "negative remote offset";
            rc = kvt_error(err, EINVAL, "read", "entry %zu: %s (%ld, %ld, %ld)", i, what, (long)off, (long)roff,
                           (long)len);
            break;
        }
        if ((rc = hold_local(t, &ls, id, i, err)) < 0)
            break;
        uint64_t rlen = ls.views[ls.last].region_len;
        if (off > rlen || len > rlen - off) {
            rc = kvt_error(err, ERANGE, "read", "entry %zu: local range [%lu, %lu) is outside region 0x%lx of %lu bytes",
                           i, (unsigned long)off, (unsigned long)(off + len), (unsigned long)id, (unsigned long)rlen);
            break;
        }
    }
    if (t->tr_start)
        t->tr_checked = kvt_now_ns();
    if (rc < 0) {
        free(ls.views);
        release_locals(t);
        atomic_store(&t->refs, 1);
        transfer_unref(t);
        return rc;
    }

    /* A paged batch: copy the columns, cut jobs without pieces; the popping threads
     * write them. */
    if (paged) {
        const kvt_job_limits lazy[2] = {lim[0], lim[2]};
        rc = cut_lazy(t, c, &ls.views[0], lazy, q, err);
        free(ls.views);
        return started(t, rc, err, out);
    }

    /* Pass 2: cut into jobs, each queued as soon as it is full. Only memory can fail
     * here; then the transfer fails (with what was queued still finishing). */
    kvt_job *cur = NULL;
    kvt_job_limits jl = {0, 0}; /* the current job's limits */
    int dev_jobs = 0;
    const kvt_region_view *lv = NULL;
    uint64_t lid = 0;
    int ldev = -1;
    for (size_t i = 0; i < c->n && rc == 0; i++) {
        uint64_t id = col(&c->local_region, i), len = col(&c->len, i);
        if (!lv || id != lid) {
            hold_local(t, &ls, id, i, err); /* found: pass 1 added it */
            lv = &ls.views[ls.last];
            lid = id;
            ldev = lv->mem_kind == KVT_MEM_HOST ? -1 : (int)lv->device;
        }
        uint64_t laddr = lv->addr + col(&c->local_off, i);
        uint64_t rregion = col(&c->remote_region, i), rkey = col(&c->remote_key, i);
        uint64_t roff = col(&c->remote_off, i), raddr = col(&c->remote_addr, i);
        if (cur && cur->n < jl.pieces && len <= jl.bytes - cur->bytes && cur->local_kind == (int)lv->mem_kind &&
            cur->local_dev == ldev) {
            /* the common case: the whole entry fits in the current job */
            size_t k = cur->n;
            cur->n = k + 1;
            cur->bytes += len;
            cur->pieces[k] = (kvt_piece){.local_addr = laddr,
                                         .remote_region = rregion,
                                         .remote_key = rkey,
                                         .remote_off = roff,
                                         .remote_addr = raddr + roff,
                                         .len = len,
                                         .entry = i,
                                         .lkey = lv->lkey};
            continue;
        }
        for (uint64_t done = 0; done < len;) {
            if (!cur || cur->n == jl.pieces || cur->bytes >= jl.bytes || cur->local_kind != (int)lv->mem_kind ||
                cur->local_dev != ldev) {
                if (cur)
                    push_job(t, q, cur);
                const kvt_job_limits *cl = &lim[lv->mem_kind == KVT_MEM_HOST ? 0 : 1];
                jl = job_limits(lim, (int)lv->mem_kind, &dev_jobs);
                cur = new_job(t, q, cl->pieces, lv); /* full size: jobs are pooled by size */
                if (!cur) {
                    rc = kvt_syserr(err, ENOMEM, "malloc", "job of %zu pieces", cl->pieces);
                    break;
                }
            }
            uint64_t room = jl.bytes - cur->bytes;
            uint64_t take = len - done < room ? len - done : room;
            kvt_piece *p = &cur->pieces[cur->n++];
            p->local_addr = laddr + done;
            p->remote_region = rregion;
            p->remote_key = rkey;
            p->remote_off = roff + done;
            p->remote_addr = raddr + roff + done;
            p->lkey = lv->lkey;
            p->len = take;
            p->entry = i;
            cur->bytes += take;
            done += take;
        }
    }
    if (cur && rc == 0)
        push_job(t, q, cur);
    free(ls.views);
    return started(t, rc, err, out);
}

/* How long to poll before sleeping, in ns: environment variable `name` (microseconds;
 * 0 never spins), else `default_us` on machines with 8 CPUs or more and 0 below —
 * spinning pays only where cores are spare; on a small machine the polling thread
 * takes the core the copy (or the peer process) needs. Read once into *cache. */
static int64_t spin_setting(const char *name, int64_t default_us, _Atomic int64_t *cache)
{
    int64_t v = atomic_load(cache);
    if (v < 0) {
        const char *e = getenv(name);
        v = e && *e ? strtoll(e, NULL, 10) : (sysconf(_SC_NPROCESSORS_ONLN) >= 8 ? default_us : 0);
        v = v < 0 ? 0 : v * 1000;
        atomic_store(cache, v);
    }
    return v;
}

/* A waiter: a GPU batch finishes in hundreds of microseconds to a few milliseconds,
 * and waking a sleeping thread costs tens of microseconds (more in a VM); 5 ms covers
 * a 512 MiB read from another GPU (bench/README.md). The spin ends when the transfer
 * does. */
static int64_t spin_ns(void)
{
    static _Atomic int64_t cached = -1;
    return spin_setting("KVTRANSFER_WAIT_SPIN_US", 5000, &cached);
}

int kvt_transfer_wait(kvt_transfer *t, int64_t timeout_ms)
{
    int64_t spin = spin_ns();
    if (timeout_ms >= 0 && timeout_ms * 1000000 < spin)
        spin = timeout_ms * 1000000;
    if (spin > 0 && !atomic_load(&t->done)) {
        int64_t end = kvt_now_ns() + spin;
        for (unsigned i = 1; !atomic_load(&t->done); i++) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
            if ((i & 63) == 0 && kvt_now_ns() >= end)
                break;
        }
    }
    struct timespec dl;
    clock_gettime(CLOCK_MONOTONIC, &dl);
    if (timeout_ms >= 0) {
        dl.tv_sec += timeout_ms / 1000;
        dl.tv_nsec += (timeout_ms % 1000) * 1000000L;
        if (dl.tv_nsec >= 1000000000L) {
            dl.tv_sec++;
            dl.tv_nsec -= 1000000000L;
        }
    }
    int rc = 0;
    pthread_mutex_lock(&t->mu);
    while (!t->finished) {
        if (timeout_ms < 0) {
            pthread_cond_wait(&t->cv, &t->mu);
        } else if (pthread_cond_timedwait(&t->cv, &t->mu, &dl) == ETIMEDOUT) {
            rc = t->finished ? 0 : -ETIMEDOUT;
            break;
        }
    }
    pthread_mutex_unlock(&t->mu);
    return rc;
}

int kvt_transfer_status(kvt_transfer *t, kvt_err *err, int64_t *entry)
{
    pthread_mutex_lock(&t->mu);
    int st = t->finished ? t->status : 1;
    if (st < 0) {
        if (err)
            *err = t->err;
        if (entry)
            *entry = t->err_entry;
    }
    pthread_mutex_unlock(&t->mu);
    return st;
}

void kvt_transfer_set_notify_fd(kvt_transfer *t, int fd)
{
    pthread_mutex_lock(&t->mu);
    t->notify_fd = fd;
    if (fd >= 0 && t->finished) {
        uint64_t one = 1;
        ssize_t w = write(fd, &one, sizeof one);
        (void)w;
    }
    pthread_mutex_unlock(&t->mu);
}

void kvt_transfer_release(kvt_transfer *t)
{
    pthread_mutex_lock(&t->mu);
    t->notify_fd = -1;
    pthread_mutex_unlock(&t->mu);
    transfer_unref(t);
}

void kvt_queue_init(kvt_queue *q)
{
    memset(q, 0, sizeof *q);
    q->wake_fd = -1;
    pthread_mutex_init(&q->mu, NULL);
    pthread_cond_init(&q->cv, NULL);
    pthread_mutex_init(&q->pool_mu, NULL);
}

static void wake(kvt_queue *q)
{
    if (q->wake_fd >= 0) {
        uint64_t one = 1;
        ssize_t w = write(q->wake_fd, &one, sizeof one);
        (void)w;
    }
}

void kvt_queue_push(kvt_queue *q, kvt_job *j)
{
    pthread_mutex_lock(&q->mu);
    if (q->closed) {
        pthread_mutex_unlock(&q->mu);
        if (j->settle) {
            j->settle(j); /* started already: it completes when its copy has */
            return;
        }
        kvt_err e;
        kvt_error(&e, ECANCELED, "read", "peer is closed");
        kvt_job_done(j, e.code, &e, (int64_t)j->pieces[0].entry);
        return;
    }
    j->next = NULL;
    if (q->tail)
        q->tail->next = j;
    else
        q->head = j;
    q->tail = j;
    atomic_fetch_add(&q->queued, 1);
    pthread_cond_signal(&q->cv); /* one job: one waiter, not a stampede */
    wake(q);
    pthread_mutex_unlock(&q->mu);
}

int kvt_queue_is_closed(kvt_queue *q)
{
    pthread_mutex_lock(&q->mu);
    int c = q->closed;
    pthread_mutex_unlock(&q->mu);
    return c;
}

/* A transport thread whose queue ran dry: the next job of a batch usually follows soon. */
static int64_t worker_spin_ns(void)
{
    static _Atomic int64_t cached = -1;
    return spin_setting("KVTRANSFER_WORKER_SPIN_US", 200, &cached);
}

void kvt_queue_kick(kvt_queue *q)
{
    if (worker_spin_ns() <= 0)
        return; /* threads that do not spin would only go back to sleep */
    pthread_mutex_lock(&q->mu);
    q->kicks++;
    pthread_cond_broadcast(&q->cv);
    pthread_mutex_unlock(&q->mu);
}

kvt_job *kvt_queue_pop(kvt_queue *q, int wait)
{
again:
    if (wait && atomic_load(&q->queued) == 0) {
        int64_t spin = worker_spin_ns();
        if (spin > 0) {
            int64_t end = kvt_now_ns() + spin;
            for (unsigned i = 1; atomic_load(&q->queued) == 0; i++) {
#if defined(__x86_64__) || defined(__i386__)
                __builtin_ia32_pause();
#endif
                if ((i & 63) == 0 && (kvt_now_ns() >= end || kvt_queue_is_closed(q)))
                    break;
            }
        }
    }
    pthread_mutex_lock(&q->mu);
    const unsigned kicks = q->kicks;
    while (!q->head && !q->closed && wait && q->kicks == kicks)
        pthread_cond_wait(&q->cv, &q->mu);
    if (!q->head && !q->closed && wait) { /* kicked: a batch is being cut, spin for its jobs */
        pthread_mutex_unlock(&q->mu);
        goto again;
    }
    kvt_job *j = q->closed ? NULL : q->head;
    if (j) {
        q->head = j->next;
        if (!q->head)
            q->tail = NULL;
        j->next = NULL;
        atomic_fetch_sub(&q->queued, 1);
    }
    pthread_mutex_unlock(&q->mu);
    if (j && j->t->tr_start) {
        int64_t zero = 0;
        atomic_compare_exchange_strong(&j->t->tr_pop, &zero, kvt_now_ns());
    }
    return j;
}

void kvt_queue_close(kvt_queue *q, const char *why)
{
    pthread_mutex_lock(&q->mu);
    q->closed = 1;
    kvt_job *j = q->head;
    q->head = q->tail = NULL;
    atomic_store(&q->queued, 0);
    pthread_cond_broadcast(&q->cv);
    wake(q);
    pthread_mutex_unlock(&q->mu);
    kvt_err e;
    kvt_error(&e, ECANCELED, "read", "%s", why);
    while (j) {
        kvt_job *n = j->next;
        if (j->settle)
            j->settle(j);
        else
            kvt_job_done(j, e.code, &e, (int64_t)j->pieces[0].entry);
        j = n;
    }
}

void kvt_queue_destroy(kvt_queue *q)
{
    while (q->pool) {
        kvt_job *j = q->pool;
        q->pool = j->next;
        free(j);
    }
    pthread_mutex_destroy(&q->pool_mu);
    pthread_mutex_destroy(&q->mu);
    pthread_cond_destroy(&q->cv);
}
