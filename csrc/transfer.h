/* Transfers and the jobs they are cut into (transfer.c).
 *
 * A batch of reads becomes one kvt_transfer and a list of jobs (cut.c), each a run of
 * pieces small enough for one system call, wire frame or kernel launch. Transports
 * complete jobs from their own threads; the transfer finishes when its last job does,
 * and keeps the first error with the index of the entry that caused it. */
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

struct kvt_queue;
struct kvt_paged_cols;

typedef struct kvt_job {
    struct kvt_job *next;
    kvt_transfer *t;
    /* A job of a paged batch (cut.h) comes as a range of the batch's columns: entries
       e0..e1 (inclusive), the first from byte off0, the last up to byte end1.
       pieces[0].entry is set; the rest are written by kvt_job_materialize, where the
       transport needs them (shm's CUDA path reads the columns instead). NULL once
       written, and for jobs of a list of entries. */
    const struct kvt_paged_cols *paged;
    size_t e0, e1;
    uint64_t off0, end1;
    struct kvt_queue *home; /* whose pool the job returns to when done */
    size_t cap;             /* pieces it has room for */
    size_t n;
    uint64_t bytes;
    int local_kind; /* every piece of a job lands in one kind of memory ... */
    int local_dev;  /* ... on one device (CUDA ordinal, -1 for host) */
    void *tp; /* the transport's own word about the job (shm: the GPU slot its caller
                 launched it on); NULL when cut, never read outside the transport */
    kvt_piece pieces[];
} kvt_job;

struct kvt_transfer {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    _Atomic int refs;       /* the caller's handle + one while jobs are outstanding */
    _Atomic int64_t pending; /* jobs not yet completed, + 1 while jobs are being cut */
    int status;             /* 1 running, 0 ok, -errno failed (under mu) */
    int finished;           /* every job completed: nothing writes the destination anymore */
    _Atomic int done;       /* finished, readable without mu (waiters spin on it) */
    kvt_err err;
    int64_t err_entry;
    int notify_fd;
    /* local regions written by this transfer, held until it finishes */
    kvt_region_table *table;
    uint64_t *local_ids;
    size_t n_local;
    struct kvt_paged_cols *paged; /* the columns of a paged batch, or NULL */
    /* The transport's own state about the transfer (shm: the GPU's view, for the
       trace), handed to tp_end when the transfer finishes, which frees it and may add
       a note to the trace line. */
    void *_Atomic tp;
    void (*tp_end)(void *tp, char *note, size_t cap);
    /* KVTRANSFER_TRACE=1: when it started, had its local ranges checked, was cut,
       first popped, a transport first and last started a copy (ns, CLOCK_MONOTONIC;
       0 unset); printed when it finishes */
    int64_t tr_start, tr_checked, tr_cut;
    _Atomic int64_t tr_pop, tr_copy1, tr_copyn;
    size_t tr_entries, tr_jobs;
};

/* A running transfer of n entries into regions of table, with one pending job (the
 * cutting guard kvt_transfer_started drops). NULL: out of memory. */
kvt_transfer *kvt_transfer_new(kvt_region_table *table, size_t n);
/* Undoes kvt_transfer_new before any job: lets the local regions go and frees t. */
void kvt_transfer_discard(kvt_transfer *t);
/* Every job is handed over (rc < 0: cutting failed, the transfer fails with err while
 * what was handed over still finishes): the transfer is the caller's (*out). */
void kvt_transfer_started(kvt_transfer *t, int rc, const kvt_err *err, kvt_transfer **out);
/* A job of t was cut: counted before it is handed over. */
void kvt_transfer_add_job(kvt_transfer *t);
/* Completes a job: rc 0, or -errno with err and the failing entry. Frees the job. */
void kvt_job_done(kvt_job *job, int rc, const kvt_err *err, int64_t entry);
/* Completes a job that never ran because its peer closed: ECANCELED. */
void kvt_job_cancel(kvt_job *job);
/* If the job's transfer has already failed, completes the job without running it and
 * returns 1: one error fails a batch at once, not after every remaining job timed out. */
int kvt_job_skip_if_failed(kvt_job *job);

/* Tracing (KVTRANSFER_TRACE=1: one line per finished transfer of 1,000 entries or
 * more on stderr, at most ten a second): where a batch's time goes. */
int kvt_trace_on(void);
int64_t kvt_now_ns(void);
void kvt_trace_popped(kvt_transfer *t);
/* A transport started copying a job of t (shm's CUDA path: a launch). */
void kvt_trace_copy(kvt_transfer *t);

#endif
