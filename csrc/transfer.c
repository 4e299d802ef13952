#define _GNU_SOURCE
#include "transfer.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static void transfer_unref(kvt_transfer *t)
{
    if (atomic_fetch_sub(&t->refs, 1) != 1)
        return;
    pthread_mutex_destroy(&t->mu);
    pthread_cond_destroy(&t->cv);
    free(t->local_ids);
    free(t);
}

static void release_locals(kvt_transfer *t)
{
    for (size_t i = 0; i < t->n_local; i++)
        kvt_table_release(t->table, t->local_ids[i]);
    t->n_local = 0;
}

static void finish(kvt_transfer *t)
{
    /* the destination is no longer written: let its regions go */
    release_locals(t);
    pthread_mutex_lock(&t->mu);
    if (t->status == 1)
        t->status = 0;
    t->finished = 1;
    if (t->notify_fd >= 0) {
        uint64_t one = 1;
        ssize_t w = write(t->notify_fd, &one, sizeof one);
        (void)w;
    }
    pthread_cond_broadcast(&t->cv);
    pthread_mutex_unlock(&t->mu);
    transfer_unref(t);
}

void kvt_transfer_start_done(kvt_transfer *t)
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

void kvt_job_done(kvt_job *job, int rc, const kvt_err *err, int64_t entry)
{
    kvt_transfer *t = job->t;
    free(job);
    if (rc < 0) {
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
    if (atomic_fetch_sub(&t->pending, 1) == 1)
        finish(t);
}

/* Holds a reference on each distinct local region (batches usually have one). */
static int hold_local(kvt_transfer *t, uint64_t id, size_t *cap, kvt_err *err)
{
    for (size_t i = t->n_local; i-- > 0;)
        if (t->local_ids[i] == id)
            return 0;
    if (t->n_local == *cap) {
        size_t nc = *cap ? *cap * 2 : 4;
        uint64_t *p = realloc(t->local_ids, nc * sizeof *p);
        if (!p)
            return kvt_syserr(err, ENOMEM, "realloc", "%zu", nc * sizeof *p);
        t->local_ids = p;
        *cap = nc;
    }
    kvt_region_view v;
    int rc = kvt_table_acquire(t->table, id, 0, 0, 0, 0, &v, err);
    if (rc < 0)
        return rc;
    t->local_ids[t->n_local++] = id;
    return 0;
}

static kvt_job *new_job(kvt_transfer *t, size_t max_pieces)
{
    kvt_job *j = malloc(sizeof *j + max_pieces * sizeof(kvt_piece));
    if (j) {
        j->next = NULL;
        j->t = t;
        j->n = 0;
        j->bytes = 0;
    }
    return j;
}

static void free_jobs(kvt_job *j)
{
    while (j) {
        kvt_job *n = j->next;
        free(j);
        j = n;
    }
}

int kvt_transfer_build(kvt_region_table *table, const kvt_read_req *reqs, size_t n,
                       size_t max_pieces, uint64_t max_bytes, int device_memory, kvt_transfer **out,
                       kvt_job **jobs, kvt_err *err)
{
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

    size_t cap = 0;
    kvt_job *head = NULL, *cur = NULL;
    int64_t njobs = 0;
    int rc = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        const kvt_read_req *r = &reqs[i];
        kvt_region_view lv;
        kvt_err e;
        if (r->len == 0) {
            rc = kvt_error(err, EINVAL, "read", "entry %zu: length is 0", i);
            break;
        }
        rc = kvt_table_acquire(table, r->local_region, 0, 0, r->local_off, r->len, &lv, &e);
        if (rc < 0) {
            kvt_error(err, -rc, "read", "entry %zu: local %s", i, e.msg);
            break;
        }
        kvt_table_release(table, r->local_region);
        if (lv.mem_kind != KVT_MEM_HOST && !device_memory) {
            rc = kvt_error(err, EOPNOTSUPP, "read",
                           "entry %zu: local region 0x%lx is CUDA memory; this transport reads into host memory only",
                           i, (unsigned long)r->local_region);
            break;
        }
        if ((rc = hold_local(t, r->local_region, &cap, err)) < 0)
            break;
        for (uint64_t done = 0; done < r->len;) {
            if (!cur || cur->n == max_pieces || cur->bytes >= max_bytes) {
                kvt_job *j = new_job(t, max_pieces);
                if (!j) {
                    rc = kvt_syserr(err, ENOMEM, "malloc", "job of %zu pieces", max_pieces);
                    break;
                }
                if (cur)
                    cur->next = j;
                else
                    head = j;
                cur = j;
                njobs++;
            }
            uint64_t room = max_bytes - cur->bytes;
            uint64_t take = r->len - done < room ? r->len - done : room;
            kvt_piece *p = &cur->pieces[cur->n++];
            p->local_addr = lv.addr + done;
            p->remote_region = r->remote_region;
            p->remote_key = r->remote_key;
            p->remote_off = r->remote_off + done;
            p->remote_addr = r->remote_addr + r->remote_off + done;
            p->lkey = lv.lkey;
            p->len = take;
            p->entry = i;
            cur->bytes += take;
            done += take;
        }
    }
    if (rc == 0 && n == 0)
        rc = kvt_error(err, EINVAL, "read", "empty batch");
    if (rc < 0) {
        free_jobs(head);
        release_locals(t);
        atomic_store(&t->refs, 1);
        transfer_unref(t);
        return rc;
    }
    atomic_store(&t->pending, njobs + 1);
    *out = t;
    *jobs = head;
    return 0;
}

int kvt_transfer_wait(kvt_transfer *t, int64_t timeout_ms)
{
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
}

static void wake(kvt_queue *q)
{
    if (q->wake_fd >= 0) {
        uint64_t one = 1;
        ssize_t w = write(q->wake_fd, &one, sizeof one);
        (void)w;
    }
}

void kvt_queue_push_list(kvt_queue *q, kvt_job *jobs)
{
    if (!jobs)
        return;
    kvt_job *last = jobs;
    while (last->next)
        last = last->next;
    pthread_mutex_lock(&q->mu);
    if (q->closed) {
        pthread_mutex_unlock(&q->mu);
        kvt_err e;
        kvt_error(&e, ECANCELED, "read", "peer is closed");
        while (jobs) {
            kvt_job *n = jobs->next;
            kvt_job_done(jobs, e.code, &e, (int64_t)jobs->pieces[0].entry);
            jobs = n;
        }
        return;
    }
    if (q->tail)
        q->tail->next = jobs;
    else
        q->head = jobs;
    q->tail = last;
    pthread_cond_broadcast(&q->cv);
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

kvt_job *kvt_queue_pop(kvt_queue *q, int wait)
{
    pthread_mutex_lock(&q->mu);
    while (!q->head && !q->closed && wait)
        pthread_cond_wait(&q->cv, &q->mu);
    kvt_job *j = q->closed ? NULL : q->head;
    if (j) {
        q->head = j->next;
        if (!q->head)
            q->tail = NULL;
        j->next = NULL;
    }
    pthread_mutex_unlock(&q->mu);
    return j;
}

void kvt_queue_close(kvt_queue *q, const char *why)
{
    pthread_mutex_lock(&q->mu);
    q->closed = 1;
    kvt_job *j = q->head;
    q->head = q->tail = NULL;
    pthread_cond_broadcast(&q->cv);
    wake(q);
    pthread_mutex_unlock(&q->mu);
    kvt_err e;
    kvt_error(&e, ECANCELED, "read", "%s", why);
    while (j) {
        kvt_job *n = j->next;
        kvt_job_done(j, e.code, &e, (int64_t)j->pieces[0].entry);
        j = n;
    }
}

void kvt_queue_destroy(kvt_queue *q)
{
    pthread_mutex_destroy(&q->mu);
    pthread_cond_destroy(&q->cv);
}
