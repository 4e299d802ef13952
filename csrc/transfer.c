#define _GNU_SOURCE
#include "transfer.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cut.h"
#include "queue.h"

kvt_transfer *kvt_transfer_new(kvt_region_table *table, size_t n)
{
    kvt_transfer *t = calloc(1, sizeof *t);
    if (!t)
        return NULL;
    pthread_mutex_init(&t->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC); /* kvt_transfer_wait's deadline is monotonic */
    pthread_cond_init(&t->cv, &ca);
    pthread_condattr_destroy(&ca);
    t->status = 1;
    t->notify_fd = -1;
    t->err_entry = -1;
    t->table = table;
    atomic_store(&t->refs, 2);
    atomic_store(&t->pending, 1); /* a guard, dropped once every job is handed over */
    if (kvt_trace_on()) {
        t->tr_start = kvt_now_ns();
        t->tr_entries = n;
    }
    return t;
}

static void transfer_unref(kvt_transfer *t)
{
    if (atomic_fetch_sub(&t->refs, 1) != 1)
        return;
    pthread_mutex_destroy(&t->mu);
    pthread_cond_destroy(&t->cv);
    free(t->local_ids);
    kvt_paged_cols_free(t->paged);
    free(t);
}

static void release_locals(kvt_transfer *t)
{
    for (size_t i = 0; i < t->n_local; i++)
        kvt_table_release(t->table, t->local_ids[i]);
    t->n_local = 0;
}

void kvt_transfer_discard(kvt_transfer *t)
{
    release_locals(t);
    atomic_store(&t->refs, 1);
    transfer_unref(t);
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

void kvt_trace_popped(kvt_transfer *t)
{
    int64_t zero = 0;
    if (t->tr_start)
        atomic_compare_exchange_strong(&t->tr_pop, &zero, kvt_now_ns());
}

void kvt_trace_copy(kvt_transfer *t)
{
    if (!t->tr_start)
        return;
    int64_t now = kvt_now_ns(), zero = 0;
    atomic_compare_exchange_strong(&t->tr_copy1, &zero, now);
    atomic_store(&t->tr_copyn, now);
}

static void trace_print(kvt_transfer *t, const char *note)
{
    static _Atomic int64_t last;
    int64_t now = kvt_now_ns(), l = atomic_load(&last);
    if (t->tr_entries < 1000 || now - l < 100000000 || !atomic_compare_exchange_strong(&last, &l, now))
        return;
    int64_t s = t->tr_start;
#define US(x) ((x) ? ((x) - s) / 1000.0 : -1.0)
    fprintf(stderr, "kvtransfer trace: %zu entries, %zu jobs: checked +%.1f us, cut +%.1f, first pop +%.1f, first launch "
            "+%.1f, last launch +%.1f, done +%.1f us%s\n", t->tr_entries, t->tr_jobs, US(t->tr_checked),
            US(t->tr_cut), US(atomic_load(&t->tr_pop)), US(atomic_load(&t->tr_copy1)),
            US(atomic_load(&t->tr_copyn)), US(now), note);
#undef US
}

static void finish(kvt_transfer *t)
{
    char note[64] = "";
    void *tp = atomic_load(&t->tp);
    if (tp && t->tp_end)
        t->tp_end(tp, note, sizeof note);
    if (t->tr_start)
        trace_print(t, note);
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

static void pending_done(kvt_transfer *t)
{
    if (atomic_fetch_sub(&t->pending, 1) == 1)
        finish(t);
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

void kvt_transfer_add_job(kvt_transfer *t)
{
    t->tr_jobs++;
    atomic_fetch_add(&t->pending, 1);
}

void kvt_transfer_started(kvt_transfer *t, int rc, const kvt_err *err, kvt_transfer **out)
{
    if (rc < 0)
        fail(t, rc, err, -1);
    if (t->tr_start)
        t->tr_cut = kvt_now_ns();
    *out = t;
    pending_done(t);
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

void kvt_job_cancel(kvt_job *job)
{
    kvt_err e;
    kvt_error(&e, ECANCELED, "read", "peer closed before the read ran");
    kvt_job_done(job, e.code, &e, (int64_t)job->pieces[0].entry);
}

void kvt_job_done(kvt_job *job, int rc, const kvt_err *err, int64_t entry)
{
    kvt_transfer *t = job->t;
    kvt_job_put(job);
    if (rc < 0)
        fail(t, rc, err, entry);
    pending_done(t);
}

/* A waiter: a GPU batch finishes in hundreds of microseconds to a few milliseconds,
 * and waking a sleeping thread costs tens of microseconds (more in a VM); 5 ms covers
 * a 512 MiB read from another GPU (bench/README.md). The spin ends when the transfer
 * does. */
static int64_t spin_ns(void)
{
    static _Atomic int64_t cached = -1;
    return kvt_spin_setting("KVTRANSFER_WAIT_SPIN_US", 5000, &cached);
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

