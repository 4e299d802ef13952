/* shm transport: both engines on one host. The reader maps the target's region table
 * (read-only, through /proc/PID/fd/N), checks key and bounds there, and copies with
 * process_vm_readv: one copy, batched iovecs, no CPU time on the target. The target's
 * region ids are re-checked after each copy, so a region deregistered mid-read fails
 * the read; a pidfd tells whether the target is still the process we connected to.
 *
 * CUDA memory (transport_shm_cuda.c): the target's table also holds each CUDA
 * region's allocation and IPC handle; jobs that touch CUDA memory go there.
 *
 * Trust: the kernel lets a same-user process read any of the target's memory; keys
 * here guard against stale or wrong descriptors, not against a hostile local user. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include "transport_shm.h"
#include "transport_shm_cuda.h"

#define SHM_MAX_PIECES 1024 /* IOV_MAX */
#define SHM_MAX_BYTES (4u << 20)

/* The entry of the piece that holds byte `at` of the job. */
static int64_t entry_at(const kvt_job *job, uint64_t at)
{
    for (size_t i = 0; i < job->n; i++) {
        if (at < job->pieces[i].len)
            return (int64_t)job->pieces[i].entry;
        at -= job->pieces[i].len;
    }
    return (int64_t)job->pieces[job->n - 1].entry;
}

/* Host memory on both sides. Returns 1 without doing anything when a source is CUDA
 * memory (the CUDA path takes the job), else completes the job and returns 0. */
static int run_job(shm_peer *s, kvt_job *job, struct iovec *liov, struct iovec *riov)
{
    kvt_err e;
    for (size_t i = 0; i < job->n; i++) {
        const kvt_piece *p = &job->pieces[i];
        kvt_region_view v;
        int rc = kvt_shared_check(s->table, p->remote_region, p->remote_key, p->remote_off, p->len, &v, &e);
        if (rc == 0 && v.mem_kind != KVT_MEM_HOST)
            return 1;
        if (rc < 0) {
            kvt_job_done(job, rc, &e, (int64_t)p->entry);
            return 0;
        }
        liov[i].iov_base = (void *)(uintptr_t)p->local_addr;
        liov[i].iov_len = p->len;
        riov[i].iov_base = (void *)(uintptr_t)v.addr;
        riov[i].iov_len = p->len;
    }
    uint64_t done = 0;
    int64_t entry = -1;
    int rc = kvt_shm_readv(s, liov, riov, job->n, job->bytes, &done, &e);
    if (rc < 0)
        entry = entry_at(job, done);
    else
        rc = kvt_shm_verify(s, job, &e, &entry);
    kvt_job_done(job, rc, rc < 0 ? &e : NULL, entry);
    return 0;
}

static void *worker(void *arg)
{
    shm_peer *s = arg;
    struct iovec *liov = malloc(2 * SHM_MAX_PIECES * sizeof *liov);
    kvt_shm_cuda *cu = NULL; /* this thread's CUDA state, made at its first CUDA job */
    for (;;) {
        /* With CUDA jobs in flight, look for more work without sleeping; with none to
         * start, finish the oldest one (that waits for the GPU). */
        int busy = kvt_shm_cuda_busy(cu);
        kvt_job *job = kvt_queue_pop(s->queue, !busy);
        if (!job) {
            if (!busy)
                break; /* closed */
            kvt_shm_cuda_retire(s, cu);
            continue;
        }
        if (job->tp) { /* started by its caller (kvt_shm_cuda_take): wait for it */
            kvt_shm_cuda_settle(job);
            continue;
        }
        if (kvt_job_skip_if_failed(job))
            continue;
        if (!liov) {
            kvt_err e;
            kvt_syserr(&e, ENOMEM, "malloc", "iovecs");
            kvt_job_done(job, -ENOMEM, &e, (int64_t)job->pieces[0].entry);
            continue;
        }
        if (job->local_kind == KVT_MEM_HOST)
            kvt_job_materialize(job); /* the CUDA path copies paged jobs from their columns */
        if (job->local_kind != KVT_MEM_HOST || run_job(s, job, liov, liov + SHM_MAX_PIECES))
            kvt_shm_cuda_job(s, &cu, job);
    }
    kvt_shm_cuda_end(s, cu);
    free(liov);
    return NULL;
}

static void shm_close(kvt_peer *p)
{
    shm_peer *s = p->impl;
    for (int i = 0; i < s->nthreads; i++)
        pthread_join(s->threads[i], NULL);
    /* Jobs their callers started on the GPU finish when their copies do, the rest as
       the engine cancels them; then the lanes can go. */
    for (kvt_job *j = kvt_queue_take_all(&p->queue), *n; j; j = n) {
        n = j->next;
        if (j->tp)
            kvt_shm_cuda_settle(j);
        else
            kvt_job_cancel(j);
    }
    kvt_shm_caller_lanes_end(s);
    kvt_ipc_cache_destroy(s->ipc); /* after the threads: nothing copies from them now */
    kvt_shm_peer_release(s);
    free(s);
}

static int shm_reach(const kvt_engine *e, const kvt_engine_info *peer, int forced, kvt_reach *r)
{
    if (!kvt_same_host(&e->info, peer, r))
        return 0;
    size_t n = strlen(r->why);
    snprintf(r->why + n, sizeof r->why - n, ": process_vm_readv / CUDA IPC");
    return 1;
}

static int shm_facts(const kvt_engine *e, kvt_fact *f, size_t *n, char *why, size_t cap)
{
    if (!e->info.boot_id[0]) {
        snprintf(why, cap, "shm needs Linux and a boot id");
        return 0;
    }
    f[0] = (kvt_fact){.key = "boot_id"};
    snprintf(f[0].s, sizeof f[0].s, "%s", e->info.boot_id);
    f[1] = (kvt_fact){.key = "pidns", .is_int = 1, .i = (long long)e->info.pidns};
    *n = 2;
    return 1;
}

static int shm_connect(kvt_peer *p, const kvt_engine_info *peer, kvt_err *err)
{
    shm_peer *s = calloc(1, sizeof *s);
    if (!s)
        return kvt_syserr(err, ENOMEM, "calloc", "shm peer");
    s->ipc = kvt_ipc_cache_create();
    if (!s->ipc) {
        free(s);
        return kvt_syserr(err, ENOMEM, "calloc", "ipc cache");
    }
    int rc = kvt_shm_peer_open(s, peer, err);
    if (rc < 0) {
        kvt_ipc_cache_destroy(s->ipc);
        free(s);
        return rc;
    }
    s->queue = &p->queue;
    pthread_mutex_init(&s->caller_mu, NULL);
    s->nthreads = p->eng->opts.shm_threads;
    p->impl = s;
    p->max_pieces = SHM_MAX_PIECES;
    p->max_bytes = SHM_MAX_BYTES;
    p->dev_max_pieces = SHM_DEV_MAX_PIECES;
    p->dev_max_bytes = SHM_DEV_MAX_BYTES;
    return kvt_shm_start_threads(p, s->threads, &s->nthreads, worker, s, err);
}

/* Paged batches into CUDA memory cost the CPU two offsets a block here
 * (transport_shm_cuda.c): their jobs may be far larger than other CUDA jobs. */
static int shm_submit(kvt_peer *p, const kvt_read_cols *cols, enum kvt_batch_kind kind, kvt_transfer **out,
                      kvt_err *err)
{
    kvt_job_limits lim[3];
    kvt_peer_limits(p, lim);
    lim[2] = (kvt_job_limits){SHM_DEV_PAGED_MAX_PIECES, SHM_DEV_PAGED_MAX_BYTES};
    const kvt_job_sink sink = {.q = &p->queue, .take = kvt_shm_cuda_take, .ctx = p->impl};
    return kvt_transfer_start(&p->eng->table, cols, kind, lim, &sink, out, err);
}

const kvt_transport_ops kvt_shm_ops = {
    .name = "shm",
    .reach = shm_reach,
    .connect = shm_connect,
    .submit = shm_submit,
    .close = shm_close,
    .facts = shm_facts,
};
