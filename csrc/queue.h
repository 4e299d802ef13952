/* The FIFO of jobs a peer's transport threads pull from, and the pool jobs are
 * taken from and returned to (queue.c). */
#ifndef KVT_QUEUE_H
#define KVT_QUEUE_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "transfer.h"

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
} kvt_queue;

void kvt_queue_init(kvt_queue *q);
/* 0, or -ECANCELED when the queue is closed: the job was not taken, and the caller
 * completes it. */
int kvt_queue_push(kvt_queue *q, kvt_job *j);
int kvt_queue_is_closed(kvt_queue *q);
/* NULL once closed; with wait == 0, NULL when empty. With wait, an empty queue is
 * polled for KVTRANSFER_WORKER_SPIN_US (default 200) before the thread sleeps: the
 * next batch usually comes right after the last one, and waking a sleeping thread
 * costs tens of microseconds (more in a VM). */
kvt_job *kvt_queue_pop(kvt_queue *q, int wait);
/* Wakes threads asleep in kvt_queue_pop to spin for jobs about to be pushed (a large
 * batch starts: waking them first hides the wake-up); nothing where threads do not
 * spin (KVTRANSFER_WORKER_SPIN_US=0, or fewer than 8 CPUs by default). */
void kvt_queue_kick(kvt_queue *q);
/* Refuses new jobs and wakes every popper; the jobs still queued stay for
 * kvt_queue_take_all (a transport may have started some) or kvt_queue_cancel. */
void kvt_queue_close(kvt_queue *q);
/* The jobs still queued, oldest first (linked by next); the queue is left empty. */
kvt_job *kvt_queue_take_all(kvt_queue *q);
/* Completes every job still queued with ECANCELED (kvt_job_cancel). */
void kvt_queue_cancel(kvt_queue *q);
void kvt_queue_destroy(kvt_queue *q);

/* A job with room for cap pieces, from q's pool or fresh (NULL: out of memory); it
 * goes back to q's pool when done. */
kvt_job *kvt_job_get(kvt_queue *q, size_t cap);
void kvt_job_put(kvt_job *j);

/* How long to poll before sleeping, in ns: environment variable `name` (microseconds;
 * 0 never spins), else `default_us` on machines with 8 CPUs or more and 0 below —
 * spinning pays only where cores are spare. Read once into *cache (start it at -1). */
int64_t kvt_spin_setting(const char *name, int64_t default_us, _Atomic int64_t *cache);

#endif
