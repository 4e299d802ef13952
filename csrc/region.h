/* The region table: which ranges of this process may be read, with which key.
 *
 * It lives in a memfd so that same-host readers (shm transport) can map it read-only
 * and check key and bounds themselves before process_vm_readv; the tcp server checks
 * it in-process. A region id is (generation << 32 | slot + 1), so a stale descriptor
 * of a reused slot never matches. Readers validate seqlock-style: id before and id
 * after the copy; a deregistration in between fails the read (never silent reuse). */
#ifndef KVT_REGION_H
#define KVT_REGION_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "err.h"
#include "kvt.h"

#define KVT_TABLE_MAGIC 0x6b767472656769ULL /* "kvtregi" */
#define KVT_TABLE_VERSION 3 /* 2: CUDA regions carry their allocation and IPC handle; 3: shareable files */
#define KVT_MAX_REGIONS 4096

/* Where a host region's bytes live in a file a same-host reader can map (a memfd
 * sealed against shrinking): the file's fd in the registering process (the reader opens
 * /proc/PID/fd/N), the region's first byte's offset in it, and the file's identity,
 * which the reader checks after opening, with the seal.
 * fd -1: not shareable. */
typedef struct kvt_map_src {
    int32_t fd;
    uint32_t pad;
    uint64_t off;
    uint64_t dev, ino;
} kvt_map_src;

typedef struct kvt_shared_slot {
    _Atomic uint64_t id; /* 0 = free; written last on register, first on deregister */
    uint64_t key;
    uint64_t addr;
    uint64_t len;
    uint32_t mem_kind;
    uint32_t device;
    uint32_t lkey; /* verbs keys of the region's memory registration, 0 without one */
    uint32_t rkey;
    kvt_cuda_alloc cuda; /* CUDA regions: allocation, device, IPC handle (all 0 for host) */
    kvt_map_src map;     /* host regions in a shareable file (map.fd -1 otherwise) */
} kvt_shared_slot;

typedef struct kvt_shared_table {
    uint64_t magic;
    uint8_t engine_id[16];
    uint32_t version;
    uint32_t nslots;
    _Atomic uint32_t mappable; /* registered regions with map.fd >= 0 (map's reach) */
    kvt_shared_slot slots[KVT_MAX_REGIONS];
} kvt_shared_table;

typedef struct kvt_region_table {
    int fd;
    kvt_shared_table *shared;
    _Atomic int32_t refs[KVT_MAX_REGIONS]; /* reads in progress, per slot (this process) */
    uint32_t gen[KVT_MAX_REGIONS];
    pthread_mutex_t lock; /* serializes register/deregister */
} kvt_region_table;

/* A checked view of one range of a region. */
typedef struct kvt_region_view {
    uint64_t addr; /* absolute address of the range's first byte */
    uint64_t region_len; /* the whole region's length */
    uint32_t mem_kind;
    uint32_t device;
    uint32_t lkey;
} kvt_region_view;

int kvt_table_init(kvt_region_table *t, const uint8_t engine_id[16], kvt_err *err);
void kvt_table_destroy(kvt_region_table *t);
/* With a verbs registration (rkey != 0), the key's low 32 bits are its rkey and the
 * high 32 random; otherwise all 64 bits are random. */
int kvt_table_add(kvt_region_table *t, uint64_t addr, uint64_t len, int mem_kind, int device,
                  uint32_t lkey, uint32_t rkey, const kvt_cuda_alloc *cuda, const kvt_map_src *map, uint64_t *id,
                  uint64_t *key, kvt_err *err);
static inline uint32_t kvt_region_slot(uint64_t id) { return (uint32_t)(id & 0xffffffffu) - 1; }
int kvt_table_remove(kvt_region_table *t, uint64_t id, kvt_err *err);

/* Takes a reference on the region if id is registered, key matches (unless check_key
 * is 0) and [off, off+len) lies inside it. Release with kvt_table_release(). */
int kvt_table_acquire(kvt_region_table *t, uint64_t id, uint64_t key, int check_key,
                      uint64_t off, uint64_t len, kvt_region_view *view, kvt_err *err);
void kvt_table_release(kvt_region_table *t, uint64_t id);

/* For a table mapped from another process: the same checks without a reference. */
int kvt_shared_check(const kvt_shared_table *s, uint64_t id, uint64_t key, uint64_t off,
                     uint64_t len, kvt_region_view *view, kvt_err *err);
/* A consistent copy of the slot of region id (key checked), for readers that need its
 * CUDA facts; same seqlock rule as kvt_shared_check. */
int kvt_shared_snapshot(const kvt_shared_table *s, uint64_t id, uint64_t key, kvt_shared_slot *out, kvt_err *err);
/* The slot of a region of this process's own table (no key check), for its owner. */
int kvt_table_snapshot(kvt_region_table *t, uint64_t id, kvt_shared_slot *out, kvt_err *err);
static inline int kvt_shared_still_valid(const kvt_shared_table *s, uint64_t id)
{
    uint32_t slot = (uint32_t)(id & 0xffffffffu) - 1;
    return slot < KVT_MAX_REGIONS && atomic_load(&s->slots[slot].id) == id;
}

#endif
