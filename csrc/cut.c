#define _GNU_SOURCE
#include "cut.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "queue.h"

/* Column buffers of paged batches, kept for reuse process-wide (a few, up to
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

void kvt_paged_cols_free(kvt_paged_cols *b)
{
    if (b) {
        cols_free(b->lo, b->cap);
        free(b);
    }
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

static kvt_job *new_job(kvt_transfer *t, kvt_queue *q, size_t max_pieces, const kvt_region_view *lv)
{
    kvt_job *j = kvt_job_get(q, max_pieces);
    if (j) {
        j->next = NULL;
        j->paged = NULL;
        j->tp = NULL;
        j->t = t;
        j->n = 0;
        j->bytes = 0;
        j->local_kind = (int)lv->mem_kind;
        j->local_dev = lv->mem_kind == KVT_MEM_HOST ? -1 : (int)lv->device;
    }
    return j;
}

/* Hands a job over: the sink's take, else its queue. */
static void hand(kvt_transfer *t, const kvt_job_sink *s, kvt_job *j)
{
    kvt_transfer_add_job(t);
    if (s->take && s->take(s->ctx, j))
        return;
    if (kvt_queue_push(s->q, j) < 0)
        kvt_job_cancel(j);
}

/* Cuts a paged batch into jobs of entry ranges (see kvt_paged_cols), the same jobs and
 * pieces cut_entries makes. */
static int cut_paged(kvt_transfer *t, const kvt_read_cols *c, const kvt_region_view *lv, const kvt_job_limits lim[2],
                     const kvt_job_sink *sink, kvt_err *err)
{
    size_t n = c->n;
    kvt_paged_cols *b = calloc(1, sizeof *b);
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
    t->paged = b;

    /* A job's columns are copied just before it is handed over: the first job goes out
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
    const int kind = (int)lv->mem_kind;
    const size_t cap = lim[kind == KVT_MEM_HOST ? 0 : 1].pieces; /* full size: jobs are pooled by size */
    int dev_jobs = 0;
    kvt_job_limits jl = {0, 0};
    if (!b->ln && whole_entries(lim, kind, b->len0)) {
        /* one length dividing every job's byte limit (the usual shape): the same jobs
           as the loop below makes, each a count of whole entries, cut without visiting
           the entries: a column copy, not a visit per block */
        for (size_t i = 0; i < n;) {
            jl = job_limits(lim, kind, &dev_jobs);
            size_t k = (size_t)(jl.bytes / b->len0);
            k = k < jl.pieces ? k : jl.pieces;
            k = k < n - i ? k : n - i;
            kvt_job *j = new_job(t, sink->q, cap, lv);
            if (!j)
                return kvt_syserr(err, ENOMEM, "malloc", "job");
            j->paged = b;
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
            hand(t, sink, j);
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
                    hand(t, sink, cur);
                }
                jl = job_limits(lim, kind, &dev_jobs);
                cur = new_job(t, sink->q, cap, lv);
                if (!cur)
                    return kvt_syserr(err, ENOMEM, "malloc", "job");
                cur->paged = b;
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
        hand(t, sink, cur);
    }
#undef COPY_UPTO
    return 0;
}

/* Each entry of a paged job is one piece. */
void kvt_job_materialize(kvt_job *j)
{
    const kvt_paged_cols *b = j->paged;
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
    j->paged = NULL;
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

/* Every local range, before any job is cut; holds the local regions in ls. One local
 * region (the common case) is looked up once and its ranges checked in a tight loop;
 * the general loop runs from the first entry that finds bad, to say which and why.
 * kick: wake the transport threads once the destination is known to be host memory. */
static int check_locals(kvt_transfer *t, const kvt_read_cols *c, local_set *ls, kvt_queue *kick, kvt_err *err)
{
    int rc = 0;
    size_t from = 0;
    if (c->local_region.stride == 0 && (rc = hold_local(t, ls, c->local_region.p[0], 0, err)) == 0) {
        if (kick && ls->views[0].mem_kind == KVT_MEM_HOST)
            kvt_queue_kick(kick);
        const uint64_t rlen = ls->views[0].region_len;
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
            return kvt_error(err, EINVAL, "read", "entry %zu: %s (%ld, %ld, %ld)", i, what, (long)off, (long)roff,
                             (long)len);
        }
        if ((rc = hold_local(t, ls, id, i, err)) < 0)
            break;
        uint64_t rlen = ls->views[ls->last].region_len;
        if (off > rlen || len > rlen - off)
            return kvt_error(err, ERANGE, "read",
                             "entry %zu: local range [%lu, %lu) is outside region 0x%lx of %lu bytes", i,
                             (unsigned long)off, (unsigned long)(off + len), (unsigned long)id, (unsigned long)rlen);
    }
    return rc;
}

/* Cuts a list of entries into jobs, each handed over as soon as it is full. Only
 * memory can fail here. */
static int cut_entries(kvt_transfer *t, const kvt_read_cols *c, local_set *ls, const kvt_job_limits lim[2],
                       const kvt_job_sink *sink, kvt_err *err)
{
    kvt_job *cur = NULL;
    kvt_job_limits jl = {0, 0}; /* the current job's limits */
    int dev_jobs = 0, rc = 0;
    const kvt_region_view *lv = NULL;
    uint64_t lid = 0;
    int ldev = -1;
    for (size_t i = 0; i < c->n && rc == 0; i++) {
        uint64_t id = col(&c->local_region, i), len = col(&c->len, i);
        if (!lv || id != lid) {
            hold_local(t, ls, id, i, err); /* found: check_locals added it */
            lv = &ls->views[ls->last];
            lid = id;
            ldev = lv->mem_kind == KVT_MEM_HOST ? -1 : (int)lv->device;
        }
        uint64_t laddr = lv->addr + col(&c->local_off, i);
        uint64_t rregion = col(&c->remote_region, i), rkey = col(&c->remote_key, i);
        uint64_t roff = col(&c->remote_off, i), raddr = col(&c->remote_addr, i);
        if (cur && cur->n < jl.pieces && len <= jl.bytes - cur->bytes && cur->local_kind == (int)lv->mem_kind &&
            cur->local_dev == ldev) {
            /* the common case: the whole entry fits in the current job */
            cur->pieces[cur->n++] = (kvt_piece){.local_addr = laddr,
                                                .remote_region = rregion,
                                                .remote_key = rkey,
                                                .remote_off = roff,
                                                .remote_addr = raddr + roff,
                                                .len = len,
                                                .entry = i,
                                                .lkey = lv->lkey};
            cur->bytes += len;
            continue;
        }
        for (uint64_t done = 0; done < len;) {
            if (!cur || cur->n == jl.pieces || cur->bytes >= jl.bytes || cur->local_kind != (int)lv->mem_kind ||
                cur->local_dev != ldev) {
                if (cur)
                    hand(t, sink, cur);
                const kvt_job_limits *cl = &lim[lv->mem_kind == KVT_MEM_HOST ? 0 : 1];
                jl = job_limits(lim, (int)lv->mem_kind, &dev_jobs);
                cur = new_job(t, sink->q, cl->pieces, lv); /* full size: jobs are pooled by size */
                if (!cur) {
                    rc = kvt_syserr(err, ENOMEM, "malloc", "job of %zu pieces", cl->pieces);
                    break;
                }
            }
            uint64_t room = jl.bytes - cur->bytes;
            uint64_t take = len - done < room ? len - done : room;
            cur->pieces[cur->n++] = (kvt_piece){.local_addr = laddr + done,
                                                .remote_region = rregion,
                                                .remote_key = rkey,
                                                .remote_off = roff + done,
                                                .remote_addr = raddr + roff + done,
                                                .len = take,
                                                .entry = i,
                                                .lkey = lv->lkey};
            cur->bytes += take;
            done += take;
        }
    }
    if (cur && rc == 0)
        hand(t, sink, cur);
    return rc;
}

int kvt_transfer_start(kvt_region_table *table, const kvt_read_cols *c, enum kvt_batch_kind kind,
                       const kvt_job_limits lim[3], const kvt_job_sink *sink, kvt_transfer **out, kvt_err *err)
{
    if (c->n == 0)
        return kvt_error(err, EINVAL, "read", "empty batch");
    kvt_transfer *t = kvt_transfer_new(table, c->n);
    if (!t)
        return kvt_syserr(err, ENOMEM, "calloc", "transfer");
    /* Sleeping transport threads wake while the ranges are checked and cut; not where
     * the sink may start a paged batch's jobs (of one length) into device memory itself: there the
     * kick would delay the first launch (it wakes them for host memory only). */
    kvt_queue *kick = c->n >= KICK_ENTRIES ? sink->q : NULL;
    if (kick && !(sink->take && kind == KVT_BATCH_PAGED && c->len.stride == 0)) {
        kvt_queue_kick(kick);
        kick = NULL;
    }
    local_set ls = {0};
    int rc = check_locals(t, c, &ls, kick, err);
    if (t->tr_start)
        t->tr_checked = kvt_now_ns();
    if (rc < 0) {
        free(ls.views);
        kvt_transfer_discard(t);
        return rc;
    }
    if (kind == KVT_BATCH_PAGED) {
        const kvt_job_limits paged[2] = {lim[0], lim[2]};
        rc = cut_paged(t, c, &ls.views[0], paged, sink, err);
    } else {
        rc = cut_entries(t, c, &ls, lim, sink, err);
    }
    free(ls.views);
    kvt_transfer_started(t, rc, err, out);
    return 0;
}
