#define _GNU_SOURCE
#include "queue.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define POOL_MAX 32

kvt_job *kvt_job_get(kvt_queue *q, size_t cap)
{
    kvt_job *j = NULL;
    pthread_mutex_lock(&q->pool_mu);
    for (kvt_job **pp = &q->pool; *pp; pp = &(*pp)->next) {
        if ((*pp)->cap == cap) {
            j = *pp;
            *pp = j->next;
            q->pool_n--;
            break;
        }
    }
    pthread_mutex_unlock(&q->pool_mu);
    if (!j && (j = malloc(sizeof *j + cap * sizeof(kvt_piece))) != NULL) {
        j->home = q;
        j->cap = cap;
    }
    return j;
}

void kvt_job_put(kvt_job *j)
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

int64_t kvt_spin_setting(const char *name, int64_t default_us, _Atomic int64_t *cache)
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

int kvt_queue_push(kvt_queue *q, kvt_job *j)
{
    pthread_mutex_lock(&q->mu);
    if (q->closed) {
        pthread_mutex_unlock(&q->mu);
        return -ECANCELED;
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
    return 0;
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
    return kvt_spin_setting("KVTRANSFER_WORKER_SPIN_US", 200, &cached);
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
    if (j)
        kvt_trace_popped(j->t);
    return j;
}

void kvt_queue_close(kvt_queue *q)
{
    pthread_mutex_lock(&q->mu);
    q->closed = 1;
    pthread_cond_broadcast(&q->cv);
    wake(q);
    pthread_mutex_unlock(&q->mu);
}

kvt_job *kvt_queue_take_all(kvt_queue *q)
{
    pthread_mutex_lock(&q->mu);
    kvt_job *j = q->head;
    q->head = q->tail = NULL;
    atomic_store(&q->queued, 0);
    pthread_mutex_unlock(&q->mu);
    return j;
}

void kvt_queue_cancel(kvt_queue *q)
{
    for (kvt_job *j = kvt_queue_take_all(q), *n; j; j = n) {
        n = j->next;
        kvt_job_cancel(j);
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
