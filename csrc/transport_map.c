/* map transport: both engines on one host, the target's region in a memfd sealed
 * against shrinking (kvtransfer.memory.alloc_host(shared=True)). The reader maps each
 * such region read-only once (through /proc/PID/fd/N) and copies blocks with memcpy on
 * its own threads: no system call per block. Other regions are read with
 * process_vm_readv, as shm does: a target cutting a mapped file would kill the reader
 * with SIGBUS, so the target offers only sealed files and the reader checks the seal
 * again (/dev/shm files, torch's shared tensors among them, cannot be sealed).
 * A batch that touches CUDA memory on either side goes whole to an shm peer that the
 * map peer opens on first need (unless forced, map does not reach a peer without a
 * region in shared memory).
 *
 * Keys and bounds are checked in the target's region table, as for shm; after each
 * copy the source region's id is checked again (a deregistered region fails the
 * read, although its mapping is still here), and mappings of regions no longer
 * registered are dropped at the start of the next job. */
#define _GNU_SOURCE
#include "transport_map.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <unistd.h>

#include "shm_peer.h"

#define MAP_MAX_PIECES 1024 /* IOV_MAX, for the pieces that fall back to process_vm_readv */
#define MAP_MAX_BYTES (4u << 20)
#define MAP_CACHE 16 /* regions mapped per peer; the least recently mapped goes first */

/* ------------------------------------------------------------- target side */

static int shareable_path(const char *path)
{
    return strncmp(path, "/memfd:", 7) == 0 || strncmp(path, "/dev/shm/", 9) == 0;
}

int kvt_map_export(uint64_t addr, uint64_t len, kvt_map_src *out)
{
    *out = (kvt_map_src){.fd = -1};
    FILE *f = fopen("/proc/self/maps", "re");
    if (!f)
        return 0;
    char line[512];
    unsigned long long start = 0, end = 0, off = 0, ino = 0;
    unsigned maj = 0, min = 0;
    int found = 0;
    while (!found && fgets(line, sizeof line, f)) {
        char perms[8] = "", path[256] = "";
        if (sscanf(line, "%llx-%llx %7s %llx %x:%x %llu %255[^\n]", &start, &end, perms, &off, &maj, &min, &ino,
                   path) < 7)
            continue;
        found = addr >= start && addr < end;
        if (found && (addr + len > end || perms[3] != 's' || ino == 0 || !shareable_path(path)))
            ino = 0; /* not one shared mapping of a shareable file */
    }
    fclose(f);
    if (!found || ino == 0)
        return 0;
    /* The file's fd in this process, by identity: whoever made the mapping keeps it
     * open (Python's mmap keeps a dup of the memfd). Any fd number: /proc lists them. */
    DIR *d = opendir("/proc/self/fd");
    if (!d)
        return 0;
    struct dirent *de;
    while (out->fd < 0 && (de = readdir(d))) {
        char *tail, fdpath[64];
        long fd = strtol(de->d_name, &tail, 10);
        struct stat st;
        /* the device too: a memfd and a /dev/shm file live on different tmpfs instances,
         * whose inode numbers may be equal */
        if (*tail || tail == de->d_name || fd == dirfd(d) || fstat((int)fd, &st) != 0 ||
            (unsigned long long)st.st_ino != ino || major(st.st_dev) != maj || minor(st.st_dev) != min ||
            !S_ISREG(st.st_mode))
            continue;
        snprintf(fdpath, sizeof fdpath, "/proc/self/fd/%ld", fd);
        if (access(fdpath, R_OK) != 0)
            continue;
        *out = (kvt_map_src){.fd = (int32_t)fd, .off = off + (addr - start), .dev = (uint64_t)st.st_dev,
                             .ino = (uint64_t)st.st_ino};
    }
    closedir(d);
    /* Only a file that cannot shrink is offered: readers would not map another (see the
     * header), and the count map's reach and doctor give should say what maps. */
    int seals = out->fd >= 0 ? fcntl(out->fd, F_GET_SEALS) : -1;
    if (seals < 0 || !(seals & F_SEAL_SHRINK))
        *out = (kvt_map_src){.fd = -1};
    return out->fd >= 0;
}

/* ------------------------------------------------------------- reader side */

typedef struct mapping {
    uint64_t id; /* region id (0: free) */
    const uint8_t *base; /* the region's first byte here; NULL: not mappable */
    void *map;
    size_t map_len;
} mapping;

typedef struct map_peer {
    shm_peer s; /* pid, pidfd, table: as shm's */
    kvt_queue *queue;
    pthread_rwlock_t lock; /* held shared while a job copies, exclusive to unmap */
    mapping cache[MAP_CACHE];
    unsigned next; /* the slot the next new mapping takes */
    int nthreads;
    pthread_t threads[KVT_MAX_THREADS];
    kvt_engine_info info;  /* the target, for the shm peer */
    pthread_mutex_t sub_mu; /* connects sub */
    kvt_peer *sub;          /* shm, for batches that touch CUDA memory; NULL until one comes */
} map_peer;

/* Maps region id's file (snapshot: its slot, key checked) for reading; base NULL
 * when the region is not in a shareable file that cannot shrink. Under the exclusive lock. */
static void map_region(map_peer *m, const kvt_shared_slot *slot, mapping *out)
{
    *out = (mapping){.id = atomic_load(&slot->id)};
    if (slot->map.fd < 0 || slot->mem_kind != KVT_MEM_HOST)
        return;
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/fd/%d", (int)m->s.pid, (int)slot->map.fd);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    struct stat st;
    long page = sysconf(_SC_PAGESIZE);
    uint64_t start = slot->map.off & ~(uint64_t)(page - 1);
    size_t len = (size_t)(slot->map.off - start + slot->len);
    /* the fd may have been reused for another file since registration */
    void *p = MAP_FAILED;
    int seals = fcntl(fd, F_GET_SEALS);
    if (fstat(fd, &st) == 0 && (uint64_t)st.st_ino == slot->map.ino && (uint64_t)st.st_dev == slot->map.dev &&
        (uint64_t)st.st_size >= slot->map.off + slot->len && seals >= 0 && (seals & F_SEAL_SHRINK))
        p = mmap(NULL, len, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, (off_t)start);
    close(fd);
    if (p == MAP_FAILED)
        return;
    out->map = p;
    out->map_len = len;
    out->base = (const uint8_t *)p + (slot->map.off - start);
}

static void unmap(mapping *c)
{
    if (c->map)
        munmap(c->map, c->map_len);
    *c = (mapping){0};
}

/* Drops the mappings of regions deregistered since (their slot's id moved on). */
static void drop_stale(map_peer *m)
{
    int stale = 0;
    pthread_rwlock_rdlock(&m->lock);
    for (int i = 0; i < MAP_CACHE && !stale; i++)
        stale = m->cache[i].id && !kvt_shared_still_valid(m->s.table, m->cache[i].id);
    pthread_rwlock_unlock(&m->lock);
    if (!stale)
        return;
    pthread_rwlock_wrlock(&m->lock);
    for (int i = 0; i < MAP_CACHE; i++)
        if (m->cache[i].id && !kvt_shared_still_valid(m->s.table, m->cache[i].id))
            unmap(&m->cache[i]);
    pthread_rwlock_unlock(&m->lock);
}

/* The mapping of region id (made on first use). Called with the shared lock held;
 * may drop and retake it. NULL if the region cannot be read (e is set). */
static const mapping *lookup(map_peer *m, uint64_t id, uint64_t key, kvt_err *e)
{
    for (int i = 0; i < MAP_CACHE; i++)
        if (m->cache[i].id == id)
            return &m->cache[i];
    kvt_shared_slot slot;
    if (kvt_shared_snapshot(m->s.table, id, key, &slot, e) < 0)
        return NULL;
    pthread_rwlock_unlock(&m->lock);
    pthread_rwlock_wrlock(&m->lock);
    mapping *c = NULL;
    for (int i = 0; i < MAP_CACHE && !c; i++) /* another thread may have mapped it meanwhile */
        if (m->cache[i].id == id)
            c = &m->cache[i];
    if (!c) {
        c = &m->cache[m->next++ % MAP_CACHE];
        unmap(c);
        map_region(m, &slot, c);
    }
    pthread_rwlock_unlock(&m->lock);
    pthread_rwlock_rdlock(&m->lock);
    /* c stays: entries change only under the exclusive lock, and by the id they hold */
    for (int i = 0; i < MAP_CACHE; i++)
        if (m->cache[i].id == id)
            return &m->cache[i];
    return lookup(m, id, key, e);
}

/* A worker's lists for the pieces read with process_vm_readv, and each one's piece. */
typedef struct scratch {
    struct iovec liov[MAP_MAX_PIECES], riov[MAP_MAX_PIECES];
    size_t piece[MAP_MAX_PIECES];
} scratch;

/* The entry of the piece that holds byte `at` of the ones read with process_vm_readv. */
static int64_t entry_at(const kvt_job *job, const scratch *sc, size_t nv, uint64_t at)
{
    size_t k = 0;
    while (k + 1 < nv && at >= job->pieces[sc->piece[k]].len)
        at -= job->pieces[sc->piece[k++]].len;
    return (int64_t)job->pieces[sc->piece[k]].entry;
}

/* Copies a job's pieces: memcpy from mapped regions, process_vm_readv for the rest. */
static void run_job(map_peer *m, kvt_job *job, scratch *sc)
{
    kvt_err e;
    int rc = 0;
    int64_t entry = -1;
    size_t nv = 0;
    uint64_t vbytes = 0;
    /* A mapping outlives its process: copy nothing from a target that has exited. */
    if (!kvt_shm_target_alive(&m->s)) {
        kvt_error(&e, ESRCH, "read", "target process %d has exited", (int)m->s.pid);
        kvt_job_done(job, e.code, &e, (int64_t)job->pieces[0].entry);
        return;
    }
    pthread_rwlock_rdlock(&m->lock);
    const mapping *c = NULL;
    for (size_t i = 0; i < job->n && rc == 0; i++) {
        const kvt_piece *p = &job->pieces[i];
        kvt_region_view v;
        rc = kvt_shared_check(m->s.table, p->remote_region, p->remote_key, p->remote_off, p->len, &v, &e);
        if (rc == 0 && v.mem_kind != KVT_MEM_HOST)
            rc = kvt_error(&e, EOPNOTSUPP, "read", "remote region 0x%lx is CUDA memory: map copies host memory only",
                           (unsigned long)p->remote_region);
        if (rc == 0 && (!c || c->id != p->remote_region) && !(c = lookup(m, p->remote_region, p->remote_key, &e)))
            rc = e.code;
        if (rc < 0) {
            entry = (int64_t)p->entry;
            break;
        }
        if (c->base) {
            memcpy((void *)(uintptr_t)p->local_addr, c->base + p->remote_off, p->len);
            continue;
        }
        sc->liov[nv] = (struct iovec){(void *)(uintptr_t)p->local_addr, p->len};
        sc->riov[nv] = (struct iovec){(void *)(uintptr_t)v.addr, p->len};
        sc->piece[nv++] = i;
        vbytes += p->len;
    }
    pthread_rwlock_unlock(&m->lock);
    uint64_t done = 0;
    if (rc == 0 && nv > 0 && (rc = kvt_shm_readv(&m->s, sc->liov, sc->riov, nv, vbytes, &done, &e)) < 0)
        entry = entry_at(job, sc, nv, done);
    if (rc == 0)
        rc = kvt_shm_verify(&m->s, job, &e, &entry);
    kvt_job_done(job, rc, rc < 0 ? &e : NULL, entry);
}

static void *worker(void *arg)
{
    map_peer *m = arg;
    scratch *sc = malloc(sizeof *sc);
    kvt_job *job;
    while ((job = kvt_queue_pop(m->queue, 1))) {
        if (kvt_job_skip_if_failed(job))
            continue;
        kvt_err e;
        if (!sc || job->local_kind != KVT_MEM_HOST) {
            int rc = sc ? kvt_error(&e, EOPNOTSUPP, "read", "map reads into host memory only")
                         : kvt_syserr(&e, ENOMEM, "malloc", "iovecs");
            kvt_job_done(job, rc, &e, (int64_t)job->pieces[0].entry);
            continue;
        }
        kvt_job_materialize(job);
        drop_stale(m);
        run_job(m, job, sc);
    }
    free(sc);
    return NULL;
}

static void map_close(kvt_peer *p)
{
    map_peer *m = p->impl;
    for (int i = 0; i < m->nthreads; i++)
        pthread_join(m->threads[i], NULL);
    kvt_peer_close(m->sub);
    pthread_mutex_destroy(&m->sub_mu);
    for (int i = 0; i < MAP_CACHE; i++)
        unmap(&m->cache[i]);
    pthread_rwlock_destroy(&m->lock);
    kvt_shm_peer_release(&m->s);
    free(m);
}

/* 1 if a batch touches CUDA memory: a local region, or a remote one (unknown remote
 * regions stay here, where the worker names the entry and why). */
static int touches_cuda(kvt_peer *p, const map_peer *m, const kvt_read_cols *c)
{
    uint64_t lid = 0, rid = 0;
    for (size_t i = 0; i < c->n; i++) {
        uint64_t l = c->local_region.p[i * c->local_region.stride], r = c->remote_region.p[i * c->remote_region.stride];
        kvt_shared_slot slot;
        kvt_err e;
        if (l != lid && kvt_table_snapshot(&p->eng->table, l, &slot, &e) == 0 && slot.mem_kind != KVT_MEM_HOST)
            return 1;
        if (r != rid && kvt_shared_snapshot(m->s.table, r, c->remote_key.p[i * c->remote_key.stride], &slot, &e) == 0 &&
            slot.mem_kind != KVT_MEM_HOST)
            return 1;
        lid = l;
        rid = r;
        if (c->local_region.stride == 0 && c->remote_region.stride == 0)
            break; /* a paged batch: one region each side */
    }
    return 0;
}

/* The shm peer, connected on first use. */
static int shm_sub(kvt_peer *p, map_peer *m, kvt_peer **out, kvt_err *err)
{
    int rc = 0;
    pthread_mutex_lock(&m->sub_mu);
    if (!m->sub)
        rc = kvt_connect(p->eng, &m->info, "shm", &m->sub, NULL, NULL, err);
    *out = m->sub;
    pthread_mutex_unlock(&m->sub_mu);
    return rc;
}

/* Whole batches: host to host here, anything touching CUDA memory over shm. */
static int map_submit(kvt_peer *p, const kvt_read_cols *cols, enum kvt_batch_kind kind, kvt_transfer **out,
                      kvt_err *err)
{
    map_peer *m = p->impl;
    if (!touches_cuda(p, m, cols))
        return kvt_submit_jobs(p, cols, kind, out, err);
    kvt_peer *sub;
    int rc = shm_sub(p, m, &sub, err);
    return rc < 0 ? rc : sub->ops->submit(sub, cols, kind, out, err);
}

static int map_reach(const kvt_engine *e, const kvt_engine_info *peer, int forced, kvt_reach *r)
{
    if (!kvt_same_host(&e->info, peer, r))
        return 0;
    const kvt_shared_table *t;
    kvt_err err;
    if (kvt_shm_map_table(peer, &t, &err) < 0) {
        r->code = -err.code;
        snprintf(r->why, sizeof r->why, "cannot open the peer's region table: %s", err.msg);
        return 0;
    }
    uint32_t n = atomic_load(&t->mappable);
    munmap((void *)t, sizeof *t);
    if (n == 0 && !forced) { /* nothing here it would do better than shm */
        r->code = EOPNOTSUPP;
        snprintf(r->why, sizeof r->why, "the peer engine has no region in shared memory (alloc_host(shared=True))");
        return 0;
    }
    size_t len = strlen(r->why);
    snprintf(r->why + len, sizeof r->why - len, ": %u region%s in shared memory, mapped and copied with memcpy", n,
             n == 1 ? "" : "s");
    return 1;
}

static int map_facts(const kvt_engine *e, kvt_fact *f, size_t *n, char *why, size_t cap)
{
    if (!e->info.boot_id[0]) {
        snprintf(why, cap, "map needs Linux and a boot id");
        return 0;
    }
    f[0] = (kvt_fact){.key = "mappable_regions", .is_int = 1, .i = atomic_load(&e->table.shared->mappable)};
    *n = 1;
    return 1;
}

static int map_connect(kvt_peer *p, const kvt_engine_info *peer, kvt_err *err)
{
    map_peer *m = calloc(1, sizeof *m);
    if (!m)
        return kvt_syserr(err, ENOMEM, "calloc", "map peer");
    int rc = kvt_shm_peer_open(&m->s, peer, err);
    if (rc < 0) {
        free(m);
        return rc;
    }
    pthread_rwlock_init(&m->lock, NULL);
    pthread_mutex_init(&m->sub_mu, NULL);
    m->info = *peer;
    m->queue = &p->queue;
    m->nthreads = p->eng->opts.shm_threads;
    p->impl = m;
    p->max_pieces = MAP_MAX_PIECES;
    p->max_bytes = MAP_MAX_BYTES;
    return kvt_shm_start_threads(p, m->threads, &m->nthreads, worker, m, err);
}

const kvt_transport_ops kvt_map_ops = {
    .name = "map",
    .reach = map_reach,
    .connect = map_connect,
    .submit = map_submit,
    .close = map_close,
    .facts = map_facts,
};
