/* CUDA IPC mappings of a peer's allocations, opened once each (cuda_ipc.c). */
#ifndef KVT_CUDA_IPC_H
#define KVT_CUDA_IPC_H

#include "kvt.h"

typedef struct kvt_ipc_cache kvt_ipc_cache;

/* The peer's IPC mappings (cuda_ipc.c). map: the address in this process, on device
 * dev (its context current), of the allocation a region slot describes, opened once
 * per (device, allocation) and kept until the peer closes. */
kvt_ipc_cache *kvt_ipc_cache_create(void);
int kvt_ipc_map(kvt_ipc_cache *c, int dev, const kvt_cuda_alloc *a, int same_process, uint64_t *base,
                kvt_err *err);
void kvt_ipc_cache_destroy(kvt_ipc_cache *c);

#endif
