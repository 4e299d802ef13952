#define _GNU_SOURCE
#include "region.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

int kvt_table_init(kvt_region_table *t, const uint8_t engine_id[16], kvt_err *err)
{
    memset(t, 0, sizeof *t);
    t->fd = memfd_create("kvtransfer-regions", MFD_CLOEXEC);
    if (t->fd < 0)
        return kvt_syserr(err, errno, "memfd_create", "\"kvtransfer-regions\"");
    if (ftruncate(t->fd, sizeof(kvt_shared_table)) < 0) {
        int e = errno;
        close(t->fd);
        return kvt_syserr(err, e, "ftruncate", "memfd, %zu", sizeof(kvt_shared_table));
    }
    void *p = mmap(NULL, sizeof(kvt_shared_table), PROT_READ | PROT_WRITE, MAP_SHARED, t->fd, 0);
    if (p == MAP_FAILED) {
        int e = errno;
        close(t->fd);
        return kvt_syserr(err, e, "mmap", "region table, %zu bytes", sizeof(kvt_shared_table));
    }
    t->shared = p;
    memcpy(t->shared->engine_id, engine_id, 16);
    t->shared->version = KVT_TABLE_VERSION;
    t->shared->nslots = KVT_MAX_REGIONS;
    atomic_store((_Atomic uint64_t *)&t->shared->magic, KVT_TABLE_MAGIC);
    pthread_mutex_init(&t->lock, NULL);
    return 0;
}

void kvt_table_destroy(kvt_region_table *t)
{
    if (!t->shared)
        return;
    for (uint32_t i = 0; i < KVT_MAX_REGIONS; i++)
        atomic_store(&t->shared->slots[i].id, 0);
    munmap(t->shared, sizeof(kvt_shared_table));
    close(t->fd);
    t->shared = NULL;
    pthread_mutex_destroy(&t->lock);
}

int kvt_table_add(kvt_region_table *t, uint64_t addr, uint64_t len, int mem_kind, int device,
                  uint32_t lkey, uint32_t rkey, const kvt_cuda_alloc *cuda, const kvt_map_src *map, uint64_t *id,
                  uint64_t *key, kvt_err *err)
{
    if (len == 0 || addr == 0 || addr + len < addr)
        return kvt_error(err, EINVAL, "register", "bad range addr=0x%lx len=%lu",
                         (unsigned long)addr, (unsigned long)len);
    uint64_t k;
    do {
        if (getrandom(&k, sizeof k, 0) != sizeof k)
            return kvt_syserr(err, errno, "getrandom", "8");
        if (rkey)
            k = (k & ~0xffffffffULL) | rkey;
    } while (k == 0 || (rkey && k >> 32 == 0));
    pthread_mutex_lock(&t->lock);
    uint32_t slot = KVT_MAX_REGIONS;
    for (uint32_t i = 0; i < KVT_MAX_REGIONS; i++) {
        /* a free slot whose last readers are gone */
        if (atomic_load(&t->shared->slots[i].id) == 0 && atomic_load(&t->refs[i]) == 0) {
            slot = i;
            break;
        }
    }
    if (slot == KVT_MAX_REGIONS) {
        pthread_mutex_unlock(&t->lock);
        return kvt_error(err, ENOSPC, "register", "all %d region slots in use; register whole pools, not blocks",
                         KVT_MAX_REGIONS);
    }
    kvt_shared_slot *s = &t->shared->slots[slot];
    s->key = k;
    s->addr = addr;
    s->len = len;
    s->mem_kind = (uint32_t)mem_kind;
    s->device = (uint32_t)device;
    s->lkey = lkey;
    s->rkey = rkey;
    if (cuda)
        s->cuda = *cuda;
    else
        memset(&s->cuda, 0, sizeof s->cuda);
    s->map = map ? *map : (kvt_map_src){.fd = -1};
    if (s->map.fd >= 0)
        atomic_fetch_add(&t->shared->mappable, 1);
    uint64_t rid = ((uint64_t)++t->gen[slot] << 32) | (slot + 1);
    atomic_store(&s->id, rid); /* publishes the fields above */
    pthread_mutex_unlock(&t->lock);
    *id = rid;
    *key = k;
    return 0;
}

static int slot_of(uint64_t id, uint32_t *slot)
{
    uint32_t lo = (uint32_t)(id & 0xffffffffu);
    if (lo == 0 || lo > KVT_MAX_REGIONS)
        return 0;
    *slot = lo - 1;
    return 1;
}

int kvt_table_remove(kvt_region_table *t, uint64_t id, kvt_err *err)
{
    uint32_t slot;
    pthread_mutex_lock(&t->lock);
    if (!slot_of(id, &slot) || atomic_load(&t->shared->slots[slot].id) != id) {
        pthread_mutex_unlock(&t->lock);
        return kvt_error(err, ENOENT, "deregister", "region 0x%lx is not registered", (unsigned long)id);
    }
    atomic_store(&t->shared->slots[slot].id, 0);
    if (t->shared->slots[slot].map.fd >= 0)
        atomic_fetch_sub(&t->shared->mappable, 1);
    pthread_mutex_unlock(&t->lock);
    /* New reads are refused from here on; wait for the ones being served. Each is
     * bounded by the engine's io timeout, so this ends. */
    struct timespec nap = {0, 100 * 1000};
    while (atomic_load(&t->refs[slot]) != 0)
        nanosleep(&nap, NULL);
    return 0;
}

static int check_slot(const kvt_shared_slot *s, uint64_t id, uint64_t key, int check_key,
                      uint64_t off, uint64_t len, kvt_region_view *view, kvt_err *err)
{
    if (atomic_load(&s->id) != id)
        return kvt_error(err, ENOENT, "read", "region 0x%lx is not registered (deregistered?)",
                         (unsigned long)id);
    uint64_t rlen = s->len, raddr = s->addr;
    uint32_t kind = s->mem_kind, dev = s->device, lkey = s->lkey;
    int key_ok = !check_key || s->key == key;
    /* The fields belong to id only if id is still there after reading them. */
    if (atomic_load(&s->id) != id)
        return kvt_error(err, ENOENT, "read", "region 0x%lx was deregistered", (unsigned long)id);
    if (!key_ok)
        return kvt_error(err, EACCES, "read", "wrong key for region 0x%lx", (unsigned long)id);
    if (off > rlen || len > rlen - off)
        return kvt_error(err, ERANGE, "read",
                         "range [%lu, %lu) is outside region 0x%lx of %lu bytes",
                         (unsigned long)off, (unsigned long)(off + len), (unsigned long)id,
                         (unsigned long)rlen);
    view->addr = raddr + off;
    view->region_len = rlen;
    view->mem_kind = kind;
    view->device = dev;
    view->lkey = lkey;
    return 0;
}

int kvt_table_acquire(kvt_region_table *t, uint64_t id, uint64_t key, int check_key,
                      uint64_t off, uint64_t len, kvt_region_view *view, kvt_err *err)
{
    uint32_t slot;
    if (!slot_of(id, &slot))
        return kvt_error(err, ENOENT, "read", "region 0x%lx is not registered", (unsigned long)id);
    /* Reference first, check second: a deregistration that starts after our check
     * sees the reference and waits for us. */
    atomic_fetch_add(&t->refs[slot], 1);
    int rc = check_slot(&t->shared->slots[slot], id, key, check_key, off, len, view, err);
    if (rc < 0)
        atomic_fetch_sub(&t->refs[slot], 1);
    return rc;
}

void kvt_table_release(kvt_region_table *t, uint64_t id)
{
    uint32_t slot;
    if (slot_of(id, &slot))
        atomic_fetch_sub(&t->refs[slot], 1);
}

int kvt_shared_check(const kvt_shared_table *s, uint64_t id, uint64_t key, uint64_t off,
                     uint64_t len, kvt_region_view *view, kvt_err *err)
{
    uint32_t slot;
    if (!slot_of(id, &slot))
        return kvt_error(err, ENOENT, "read", "region 0x%lx is not registered", (unsigned long)id);
    return check_slot(&s->slots[slot], id, key, 1, off, len, view, err);
}

static int snapshot(const kvt_shared_slot *s, uint64_t id, uint64_t key, int check_key, kvt_shared_slot *out,
                    kvt_err *err)
{
    if (atomic_load(&s->id) != id)
        return kvt_error(err, ENOENT, "read", "region 0x%lx is not registered (deregistered?)", (unsigned long)id);
    memcpy((char *)out + sizeof out->id, (const char *)s + sizeof s->id, sizeof *out - sizeof out->id);
    if (atomic_load(&s->id) != id)
        return kvt_error(err, ENOENT, "read", "region 0x%lx was deregistered", (unsigned long)id);
    atomic_store(&out->id, id);
    if (check_key && out->key != key)
        return kvt_error(err, EACCES, "read", "wrong key for region 0x%lx", (unsigned long)id);
    return 0;
}

int kvt_shared_snapshot(const kvt_shared_table *s, uint64_t id, uint64_t key, kvt_shared_slot *out, kvt_err *err)
{
    uint32_t slot;
    if (!slot_of(id, &slot))
        return kvt_error(err, ENOENT, "read", "region 0x%lx is not registered", (unsigned long)id);
    return snapshot(&s->slots[slot], id, key, 1, out, err);
}

int kvt_table_snapshot(kvt_region_table *t, uint64_t id, kvt_shared_slot *out, kvt_err *err)
{
    uint32_t slot;
    if (!slot_of(id, &slot))
        return kvt_error(err, ENOENT, "region", "region 0x%lx is not registered", (unsigned long)id);
    return snapshot(&t->shared->slots[slot], id, 0, 0, out, err);
}
