/* shm transport internals shared by its host path (transport_shm.c, process_vm_readv)
 * and its CUDA path (transport_shm_cuda.c, CUDA IPC and batched device copies). */
#ifndef KVT_TRANSPORT_SHM_H
#define KVT_TRANSPORT_SHM_H

#include <pthread.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "cuda.h"
#include "engine.h"

/* Jobs into CUDA memory: 64 MiB is ~45 us of an H100's copy bandwidth, long enough
 * to hide a launch, short enough that the first kernel starts early. The CUDA path
 * sizes its descriptor buffers from these. */
#define SHM_DEV_MAX_PIECES 4096
#define SHM_DEV_MAX_BYTES (64u << 20)
/* read_blocks jobs into CUDA memory: the CPU's work is copying two offsets a block
 * (transport_shm_cuda.c), so they can be large: fewer launches, each kernel's ramp
 * and tail paid fewer times (2,048 x 256 KiB blocks on an H200: the GPU's time on the
 * batch 303 -> 283 us going from 10 jobs to 4). The first ones stay small
 * (transfer.c): 1,024 blocks of 32 KiB start the GPU. */
#define SHM_DEV_LAZY_MAX_PIECES 16384
#define SHM_DEV_LAZY_MAX_BYTES (512ull << 20)

typedef struct kvt_ipc_cache kvt_ipc_cache;
typedef struct kvt_shm_cuda kvt_shm_cuda;
struct lane;

typedef struct shm_peer {
    pid_t pid;
    int pidfd;
    int same_process; /* the target is this process: its device pointers are ours */
    const kvt_shared_table *table;
    kvt_queue *queue;
    kvt_ipc_cache *ipc; /* the target's CUDA allocations opened here (cuda_ipc.c) */
    int nthreads;
    pthread_t threads[KVT_MAX_THREADS];
    /* the callers' CUDA lanes, one per device (kvt_shm_cuda_direct), shared by every
       thread reading over the peer: one at a time (a caller finding them taken leaves
       its jobs to the transport threads) */
    pthread_mutex_t direct_mu;
    struct lane *direct[KVT_CUDA_MAX_DEVICES];
} shm_peer;

/* After a job's bytes are in place: 0 if every source region outlived the copy and
 * the target is the process we connected to; else -errno, *err and *entry. */
int kvt_shm_verify(shm_peer *s, const kvt_job *job, kvt_err *err, int64_t *entry);
/* process_vm_readv of n ranges of the target into local host memory; the lists are
 * consumed. 0 or -errno with *err (done: bytes copied before the failure). */
int kvt_shm_readv(shm_peer *s, struct iovec *liov, struct iovec *riov, size_t n, uint64_t bytes, uint64_t *done,
                  kvt_err *err);

/* The CUDA path, per worker thread (*cu is made at the first CUDA job). A job whose
 * destination is CUDA memory and whose sources are too is queued on the GPU and
 * stays in flight (up to two per device and thread); every other CUDA job completes
 * before this returns. busy: jobs in flight; retire: waits for the oldest and
 * completes it; end: completes everything and frees the thread's CUDA state. */
void kvt_shm_cuda_job(shm_peer *s, kvt_shm_cuda **cu, kvt_job *job);
int kvt_shm_cuda_busy(const kvt_shm_cuda *cu);
void kvt_shm_cuda_retire(shm_peer *s, kvt_shm_cuda *cu);
void kvt_shm_cuda_end(shm_peer *s, kvt_shm_cuda *cu);

/* The peer queue's direct hook (kvt_queue): a read_blocks job into GPU memory from GPU
 * memory is launched in the caller's thread, on a lane of the peer's own (the first
 * copy starts without waiting for a transport thread), and queued for a transport
 * thread to settle (wait for and complete). 0 (the job is left to the queue) when the
 * job has another shape, the lane is taken by another caller or all its slots are in
 * use, or a range is out of bounds (the transport thread names the entry). end: frees
 * the lanes, once every job is settled. */
int kvt_shm_cuda_direct(void *ctx, kvt_job *job);
void kvt_shm_direct_end(shm_peer *s);

/* The peer's IPC mappings (cuda_ipc.c). map: the address in this process, on device
 * dev (its context current), of the allocation a region slot describes, opened once
 * per (device, allocation) and kept until the peer closes. */
kvt_ipc_cache *kvt_ipc_cache_create(void);
int kvt_ipc_map(kvt_ipc_cache *c, int dev, const kvt_cuda_alloc *a, int same_process, uint64_t *base,
                kvt_err *err);
void kvt_ipc_cache_destroy(kvt_ipc_cache *c);

#endif
