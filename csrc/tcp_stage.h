/* The tcp transport's CUDA staging (tcp_stage.c): device memory crosses a socket
 * through pinned host buffers, two per connection, so that copies between the GPU and
 * the buffers overlap with the socket's sends and receives.
 *
 * Target: kvt_stage_send sends a response's ranges in order; a CUDA range is gathered
 * into pinned buffer A by one copy launch (cuda_copy.c) while buffer B, filled
 * before, goes out on the socket. Reader: kvt_stage_recv receives a job's bytes into
 * pinned buffer A while buffer B, received before, is scattered to the destination
 * blocks by one launch; it returns once every byte is in device memory. Host ranges
 * in a target's response are sent straight from memory, in their place. */
#ifndef KVT_TCP_STAGE_H
#define KVT_TCP_STAGE_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

typedef struct kvt_seg {
    uint64_t addr;
    uint64_t len;
    int kind; /* KVT_MEM_HOST or KVT_MEM_CUDA */
    int dev;  /* CUDA ordinal */
} kvt_seg;

typedef struct kvt_stage kvt_stage; /* one per connection thread; made at first use */

int kvt_stage_send(kvt_stage **st, int fd, const kvt_seg *segs, size_t n, kvt_err *err);
/* segs: the destinations, all CUDA memory of one device. */
int kvt_stage_recv(kvt_stage **st, int fd, const kvt_seg *segs, size_t n, kvt_err *err);
void kvt_stage_free(kvt_stage *st);

#endif
