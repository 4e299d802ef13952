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

/* A batch of one local and one remote region, kept as columns: its jobs are cut
 * without writing pieces, and the thread that pops a job writes them (kvt_queue_pop),
 * so that cutting a batch of thousands of blocks costs the caller little and the
 * pieces are written in parallel, by the transport threads, while copies run. */
typedef struct kvt_batch {
    uint64_t *lo, *ro, *ln; /* local and remote offsets, lengths (ln NULL: len0 each) */
    size_t cap;             /* bytes of the buffer lo points into (ro, ln follow) */
    uint64_t len0;
    uint64_t local_base;
    uint32_t lkey;
    uint64_t remote_region, remote_key, remote_addr;
} kvt_batch;

typedef struct kvt_job {
    struct kvt_job *next;
    kvt_transfer *t;
    /* lazy jobs (batch != NULL): entries e0..e1 (inclusive), the first from byte off0,
       the last up to byte end1; pieces[0].entry is set, the rest written at pop */
    const kvt_batch *batch;
    size_t e0, e1;
    uint64_t off0, end1;
    struct kvt_queue *home; /* whose pool the job returns to when done */
    size_t cap;             /* pieces it has room for */
    size_t n;
    uint64_t bytes;
    int local_kind; /* every piece of a job lands in one kind of memory ... */
    int local_dev;  /* ... on one device (CUDA ordinal, -1 for host) */
    /* A job its queue's direct hook started in the caller's thread (see kvt_queue):
       settle waits for its copy and completes it. Whoever takes it from the queue (a
       transport thread, or kvt_queue_close) calls settle, never kvt_job_done. NULL
       for every other job. */
    void (*settle)(struct kvt_job *job);
    void *settle_arg;
    kvt_piece pieces[];
} kvt_job;

/* How big a job may be: lim[0] into host memory, lim[1] into CUDA memory, lim[2] into
 * CUDA memory for a batch of one region to one region (read_blocks), cut lazily. */
typedef struct kvt_job_limits {
    size_t pieces;
    uint64_t bytes;
} kvt_job_limits;

struct kvt_transfer {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    _Atomic int refs;       /* the caller's handle + one while jobs are outstanding */
    _Atomic int64_t pending; /* jobs not yet completed */
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
    kvt_batch *batch; /* the columns of a lazily cut batch, or NULL */
    /* KVTRANSFER_TRACE=1: when it started, had its local ranges checked, was cut,
       first popped, first and last launched on a GPU (ns, CLOCK_MONOTONIC; 0 unset);
       printed when it finishes */
    int64_t tr_start, tr_checked, tr_cut;
    _Atomic int64_t tr_pop, tr_launch1, tr_launchn;
    /* a CUDA path's GPU view (shm): an event it recorded before the first copy, freed
       by tr_gpu_free when the transfer finishes, and the longest time from it to a
       job's end (ns): how long the GPU worked on the batch */
    void *_Atomic tr_gpu_mark;
    void (*tr_gpu_free)(void *);
    _Atomic int64_t tr_gpu_ns;
    size_t tr_entries, tr_jobs;
};

/* Tracing (KVTRANSFER_TRACE=1: one line per finished transfer of 1,000 entries or
 * more on stderr, at most ten a second): where a batch's time goes. */
int kvt_trace_on(void);
int64_t kvt_now_ns(void);
void kvt_trace_launch(kvt_transfer *t);

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
    _Atomic long queued; /* jobs in the queue, read without mu by threads that spin */
    int closed;
    unsigned kicks; /* kvt_queue_kick: sleeping poppers go back to spinning */
    int wake_fd; /* an eventfd written on every push and on close, for consumers that
                    poll() other fds too (verbs); -1 when unused */
    /* finished jobs kept for reuse: a batch of 16,384 blocks is ~1 MiB of pieces, and
       fresh memory for it each time costs page faults in the reading call */
    pthread_mutex_t pool_mu;
    kvt_job *pool;
    size_t pool_n;
    /* Set by a transport that can start some jobs in the thread that cuts them (shm:
       read_blocks into GPU memory, so the first copy starts without a hand-off to its
       threads): called for each job as it is cut; 1 when it took the job (started it
       and queued it with settle set, or completed it with an error), 0 to leave it to
       the queue. */
    int (*direct)(void *ctx, kvt_job *job);
    void *direct_ctx;
} kvt_queue;

void kvt_queue_init(kvt_queue *q);
void kvt_queue_push(kvt_queue *q, kvt_job *j);
int kvt_queue_is_closed(kvt_queue *q);
/* NULL once closed; with wait == 0, NULL when empty. With wait, an empty queue is
 * polled for KVTRANSFER_WORKER_SPIN_US (default 200) before the thread sleeps: the
 * next batch usually comes right after the last one, and waking a sleeping thread
 * costs tens of microseconds (more in a VM). A job may come lazy (job->batch set, its
 * pieces not written): the consumer writes them with kvt_job_materialize where it
 * needs them (shm's CUDA path copies from the batch's columns instead). */
kvt_job *kvt_queue_pop(kvt_queue *q, int wait);
/* Writes the pieces of a lazy job, in the popping thread (so the pieces of a batch of
 * thousands of blocks are written in parallel, while copies run); nothing for a job
 * that is not lazy. */
void kvt_job_materialize(kvt_job *j);
/* Wakes threads asleep in kvt_queue_pop to spin for jobs about to be pushed (a large
 * batch starts: waking them first hides the wake-up); nothing where threads do not
 * spin (KVTRANSFER_WORKER_SPIN_US=0, or fewer than 8 CPUs by default). */
void kvt_queue_kick(kvt_queue *q);
/* Closes the queue and fails what is left in it with ECANCELED (jobs already started,
 * with settle set, are settled: their copies finish first). */
void kvt_queue_close(kvt_queue *q, const char *why);
void kvt_queue_destroy(kvt_queue *q);

/* Starts a batch (of a kind: KVT_BATCH_PAGED's regions, keys and addresses are one for
 * every entry, its jobs cut lazily): checks every local range first (an error names the entry, and
 * nothing is queued), holds the local regions, then cuts the entries into jobs of at
 * most lim[kind].pieces pieces and lim[kind].bytes bytes (kind: of the destination, and
 * whether the batch is cut lazily; a longer entry is split) and pushes each job to q
 * as soon as it is cut, so transports start on the first while the rest are cut. A
 * job lands in one memory kind and device. */
enum kvt_batch_kind { KVT_BATCH_ENTRIES, KVT_BATCH_PAGED };
int kvt_transfer_start(kvt_region_table *table, const kvt_read_cols *cols, enum kvt_batch_kind kind,
                       const kvt_job_limits lim[3], kvt_queue *q, kvt_transfer **out, kvt_err *err);

#endif
