/* The CUDA allocations of one shm peer, opened in this process through CUDA IPC.
 *
 * The target puts each CUDA region's allocation and its IPC handle (cuIpcGetMemHandle
 * of the allocation base) in its region table at registration; a reader opens each
 * (device, allocation) once, with lazy peer access so that a reader on another GPU
 * with peer access reads it over NVLink/PCIe, and closes them all when the peer
 * closes. A driver refuses to open the same handle twice in one context, so several
 * regions of one allocation share one mapping. Keyed by the handle's bytes: a new
 * allocation at a reused address has a new handle. Mappings of allocations the
 * target has freed stay until the peer closes (the driver keeps such memory alive
 * while it is open; the table's seqlock check fails reads of deregistered regions).
 *
 * A target that is this process needs no handle: its device pointers are ours. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "cuda.h"
#include "cuda_ipc.h"

typedef struct ipc_map {
    int dev;
    uint64_t remote_base;
    uint8_t handle[KVT_CUDA_IPC_HANDLE_BYTES];
    CUdeviceptr local;
} ipc_map;

struct kvt_ipc_cache {
    pthread_mutex_t mu;
    ipc_map *m;
    size_t n, cap;
};

kvt_ipc_cache *kvt_ipc_cache_create(void)
{
    kvt_ipc_cache *c = calloc(1, sizeof *c);
    if (c)
        pthread_mutex_init(&c->mu, NULL);
    return c;
}

int kvt_ipc_map(kvt_ipc_cache *c, int dev, const kvt_cuda_alloc *a, int same_process, uint64_t *base, kvt_err *err)
{
    if (same_process) {
        /* our own allocation: readable as is on its device, and from another one once
         * peer access is on (enabling it again is harmless; this runs once per region
         * and reading thread, not per block) */
        int rc = kvt_cuda_enable_peer(dev, a->device, err);
        if (rc < 0)
            return rc;
        *base = a->base;
        return 0;
    }
    if (a->ipc_status != 0) {
        char b[200];
        return kvt_error(err, EOPNOTSUPP, "read",
                         "the target could not export its CUDA allocation 0x%lx for same-host reads "
                         "(cuIpcGetMemHandle: CUresult %d, %s; memory from cuMemCreate or a stream-ordered pool?); "
                         "use transport tcp",
                         (unsigned long)a->base, a->ipc_status, kvt_cu_str(a->ipc_status, b, sizeof b));
    }
    pthread_mutex_lock(&c->mu);
    for (size_t i = 0; i < c->n; i++) {
        ipc_map *m = &c->m[i];
        if (m->dev == dev && m->remote_base == a->base && !memcmp(m->handle, a->ipc_handle, sizeof m->handle)) {
            *base = m->local;
            pthread_mutex_unlock(&c->mu);
            return 0;
        }
    }
    int rc = 0;
    if (c->n == c->cap) {
        size_t nc = c->cap ? c->cap * 2 : 8;
        ipc_map *m = realloc(c->m, nc * sizeof *m);
        if (!m)
            rc = kvt_syserr(err, ENOMEM, "realloc", "%zu IPC mappings", nc);
        else {
            c->m = m;
            c->cap = nc;
        }
    }
    if (rc == 0) {
        const kvt_cu *cu = kvt_cu_get(err);
        CUipcMemHandle h;
        memcpy(h.reserved, a->ipc_handle, sizeof h.reserved);
        CUdeviceptr p = 0;
        CUresult r = cu ? cu->IpcOpenMemHandle(&p, h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS) : -1;
        if (!cu)
            rc = -ENODEV;
        else if (r != CUDA_SUCCESS)
            rc = kvt_cu_fail(err, r, "cuIpcOpenMemHandle",
                             "allocation 0x%lx of %lu bytes on the target's %s, opened on device %d",
                             (unsigned long)a->base, (unsigned long)a->size, a->pci_bus_id, dev);
        else {
            ipc_map *m = &c->m[c->n++];
            m->dev = dev;
            m->remote_base = a->base;
            memcpy(m->handle, a->ipc_handle, sizeof m->handle);
            m->local = p;
            *base = p;
        }
    }
    pthread_mutex_unlock(&c->mu);
    return rc;
}

void kvt_ipc_cache_destroy(kvt_ipc_cache *c)
{
    if (!c)
        return;
    kvt_err ignored;
    const kvt_cu *cu = c->n ? kvt_cu_get(&ignored) : NULL;
    for (size_t i = 0; cu && i < c->n; i++) {
        if (kvt_cuda_push(c->m[i].dev, &ignored) == 0) {
            cu->IpcCloseMemHandle(c->m[i].local);
            kvt_cuda_pop();
        }
    }
    free(c->m);
    pthread_mutex_destroy(&c->mu);
    free(c);
}
