/* Starting a transfer: checking a batch and cutting it into jobs (cut.c). */
#ifndef KVT_CUT_H
#define KVT_CUT_H

#include <stddef.h>
#include <stdint.h>

#include "kvt.h"
#include "region.h"
#include "transfer.h"

struct kvt_queue;

/* The two shapes a batch comes in: a list of entries (any ranges of any regions), and
 * a paged batch (kvt_paged_batch: one local and one remote region, offset columns, one
 * block length or a column of them). */
enum kvt_batch_kind { KVT_BATCH_ENTRIES, KVT_BATCH_PAGED };

/* A paged batch's columns, copied: its jobs are cut without writing pieces (a range
 * of entries each), so that cutting thousands of blocks costs the caller little and
 * the pieces are written in parallel, by the transport threads, while copies run. */
typedef struct kvt_paged_cols {
    uint64_t *lo, *ro, *ln; /* local and remote offsets, lengths (ln NULL: len0 each) */
    size_t cap;             /* bytes of the buffer lo points into (ro, ln follow) */
    uint64_t len0;
    uint64_t local_base;
    uint32_t lkey;
    uint64_t remote_region, remote_key, remote_addr;
} kvt_paged_cols;

void kvt_paged_cols_free(kvt_paged_cols *b);
/* Writes the pieces of a paged job, in the popping thread; nothing for other jobs. */
void kvt_job_materialize(kvt_job *j);

/* How big a job may be: lim[0] into host memory, lim[1] into CUDA memory, lim[2] into
 * CUDA memory for a paged batch. */
typedef struct kvt_job_limits {
    size_t pieces;
    uint64_t bytes;
} kvt_job_limits;

/* Where each job goes as it is cut. take, where set, may start a job into device
 * memory itself (shm launches paged jobs from the caller's thread) and returns 1 when
 * it took the job (started it, or completed it with an error); else the job is queued
 * on q, and a job q refuses (closed) completes with ECANCELED. */
typedef struct kvt_job_sink {
    struct kvt_queue *q;
    int (*take)(void *ctx, kvt_job *job);
    void *ctx;
} kvt_job_sink;

/* Starts a batch of a kind: checks every local range first (an error names the entry,
 * and no job is cut), holds the local regions, then cuts the entries into jobs of at
 * most lim[...].pieces pieces and .bytes bytes (a longer entry is split), each landing
 * in one memory kind and device, and hands each to the sink as soon as it is cut, so
 * transports start on the first while the rest are cut. */
int kvt_transfer_start(kvt_region_table *table, const kvt_read_cols *cols, enum kvt_batch_kind kind,
                       const kvt_job_limits lim[3], const kvt_job_sink *sink, kvt_transfer **out, kvt_err *err);

#endif
