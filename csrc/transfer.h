/* Transfers, the jobs they are cut into, and the queue transports pull jobs from.
 *
 * A batch of reads becomes one kvt_transfer and a list of jobs, each a run of
 * pieces small enough for one system call or one wire frame. Transports complete
 * jobs from their own threads; the transfer finishes when its last job does, and
 * keeps the first error with the index of the entry that caused it. */
#ifndef KVT_TRANSFER_H
#define KVT_TRANSFER_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "kvt.h"
#include "region.h"

typedef struct kvt_piece {
    uint64_t local_addr;
    uint64_t remote_region;
    uint64_t remote_key;
    uint64_t remote_off;
    uint64_t remote_addr; /* absolute remote address (verbs) */
    uint64_t len;
    uint64_t entry; /* index of the batch entry this piece belongs to */
    uint32_t lkey;  /* of the local region (verbs) */
} kvt_piece;

typedef struct kvt_job {
    struct kvt_job *next;
    kvt_transfer *t;
    size_t n;
    uint64_t bytes;
    kvt_piece pieces[];
} kvt_job;

struct kvt_transfer {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    _Atomic int refs;       /* the caller's handle + one while jobs are outstanding */
    _Atomic int64_t pending; /* jobs not yet completed */
    int status;             /* 1 running, 0 ok, -errno failed (under mu) */
    int finished;           /* every job completed: nothing writes the destination anymore */
    kvt_err err;
    int64_t err_entry;
    int notify_fd;
    /* local regions written by this transfer, held until it finishes */
    kvt_region_table *table;
    uint64_t *local_ids;
    size_t n_local;
};

/* Cuts reqs into jobs of at most max_pieces pieces and max_bytes bytes (a longer
 * entry is split). Local ranges are checked and referenced here. On success the
 * transfer has pending = number of jobs + 1 (a guard the caller drops with
 * kvt_transfer_start_done() after queueing every job). */
int kvt_transfer_build(kvt_region_table *table, const kvt_read_req *reqs, size_t n,
                       size_t max_pieces, uint64_t max_bytes, int device_memory, kvt_transfer **out,
                       kvt_job **jobs, kvt_err *err);
void kvt_transfer_start_done(kvt_transfer *t);
/* If the job's transfer has already failed, completes the job without running it and
 * returns 1: one error fails a batch at once, not after every remaining job timed out. */
int kvt_job_skip_if_failed(kvt_job *job);
/* Completes a job: rc 0, or -errno with err and the failing entry. Frees the job. */
void kvt_job_done(kvt_job *job, int rc, const kvt_err *err, int64_t entry);

/* A FIFO of jobs with blocking pop; closing it wakes every waiter. */
typedef struct kvt_queue {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    kvt_job *head, *tail;
    int closed;
    int wake_fd; /* an eventfd written on every push and on close, for consumers that
                    poll() other fds too (verbs); -1 when unused */
} kvt_queue;

void kvt_queue_init(kvt_queue *q);
void kvt_queue_push_list(kvt_queue *q, kvt_job *jobs);
int kvt_queue_is_closed(kvt_queue *q);
/* NULL once closed; with wait == 0, NULL when empty. */
kvt_job *kvt_queue_pop(kvt_queue *q, int wait);
/* Closes the queue and fails what is left in it with ECANCELED. */
void kvt_queue_close(kvt_queue *q, const char *why);
void kvt_queue_destroy(kvt_queue *q);

#endif
