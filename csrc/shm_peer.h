/* The shm peer both halves of the shm transport work on (shm_peer.c): host copies
 * (transport_shm.c) and CUDA copies (transport_shm_cuda.c). */
#ifndef KVT_SHM_PEER_H
#define KVT_SHM_PEER_H

#include <pthread.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "cuda.h"
#include "cuda_ipc.h"
#include "engine.h"

/* Jobs into CUDA memory: long enough to hide a launch, short enough that the first
 * kernel starts early. The CUDA path sizes its descriptor buffers from these. */
#define SHM_DEV_MAX_PIECES 4096
#define SHM_DEV_MAX_BYTES (64u << 20)
/* Paged jobs into CUDA memory: the CPU's work is copying two offsets a block
 * (transport_shm_cuda.c), so they can be large: fewer launches, each kernel's ramp
 * and tail paid fewer times (bench/README.md). The first ones stay small (cut.c). */
#define SHM_DEV_PAGED_MAX_PIECES 16384
#define SHM_DEV_PAGED_MAX_BYTES (512ull << 20)

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
    /* the callers' CUDA lanes, one per device (kvt_shm_cuda_take), shared by every
       thread reading over the peer: one at a time (a caller finding them taken leaves
       its jobs to the transport threads) */
    pthread_mutex_t caller_mu;
    struct lane *caller_lanes[KVT_CUDA_MAX_DEVICES];
} shm_peer;

/* After a job's bytes are in place: 0 if every source region outlived the copy and
 * the target is the process we connected to; else -errno, *err and *entry. */
int kvt_shm_verify(shm_peer *s, const kvt_job *job, kvt_err *err, int64_t *entry);
/* process_vm_readv of n ranges of the target into local host memory; the lists are
 * consumed. 0 or -errno with *err (done: bytes copied before the failure). */
int kvt_shm_readv(shm_peer *s, struct iovec *liov, struct iovec *riov, size_t n, uint64_t bytes, uint64_t *done,
                  kvt_err *err);

/* Starts *n threads running fn(arg) for peer p; if one cannot start, closes the queue
 * and the peer (p->ops->close, with *n the threads started) and returns -errno. */
int kvt_shm_start_threads(kvt_peer *p, pthread_t *threads, int *n, void *(*fn)(void *), void *arg, kvt_err *err);
/* The target is still the process we connected to (its pidfd is not readable). */
int kvt_shm_target_alive(const shm_peer *s);
/* Opens the target for reading: its pidfd, its region table (read-only), and a probe
 * that process_vm_readv works on it. Fills pid, pidfd, same_process, table. */
int kvt_shm_peer_open(shm_peer *s, const kvt_engine_info *peer, kvt_err *err);
void kvt_shm_peer_release(shm_peer *s);
/* Maps a peer's region table read-only (through /proc/PID/fd/N) and checks it is
 * that engine's. */
int kvt_shm_map_table(const kvt_engine_info *peer, const kvt_shared_table **out, kvt_err *err);

/* Same boot and pid namespace: pids and memory mean the same on both engines (r->why
 * says so, or which differs). */
int kvt_same_host(const kvt_engine_info *me, const kvt_engine_info *peer, kvt_reach *r);

#endif
