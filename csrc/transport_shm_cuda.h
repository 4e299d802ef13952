/* The shm transport's CUDA path (transport_shm_cuda.c): what its host half
 * (transport_shm.c) hands it. */
#ifndef KVT_TRANSPORT_SHM_CUDA_H
#define KVT_TRANSPORT_SHM_CUDA_H

#include "shm_peer.h"

/* The CUDA path, per worker thread (*cu is made at the first CUDA job). A job whose
 * destination is CUDA memory and whose sources are too is queued on the GPU and
 * stays in flight (up to two per device and thread); every other CUDA job completes
 * before this returns. busy: jobs in flight; retire: waits for the oldest and
 * completes it; end: completes everything and frees the thread's CUDA state. */
void kvt_shm_cuda_job(shm_peer *s, kvt_shm_cuda **cu, kvt_job *job);
int kvt_shm_cuda_busy(const kvt_shm_cuda *cu);
void kvt_shm_cuda_retire(shm_peer *s, kvt_shm_cuda *cu);
void kvt_shm_cuda_end(shm_peer *s, kvt_shm_cuda *cu);

/* shm's job sink (cut.h): a paged job of whole blocks into GPU memory from GPU memory
 * is launched in the caller's thread, on a lane of the peer's own (the first copy
 * starts without waiting for a transport thread), marked (job->tp: its slot) and
 * queued for a transport thread to settle: wait for its copy, then complete it. 0
 * (queue it) when the job has another shape, the lane is taken by another caller or
 * full, or a range is out of bounds (the transport thread names the entry).
 * caller_lanes_end frees the lanes, once every job is settled. */
int kvt_shm_cuda_take(void *ctx, kvt_job *job);
void kvt_shm_cuda_settle(kvt_job *job);
void kvt_shm_caller_lanes_end(shm_peer *s);

#endif
