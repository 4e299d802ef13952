#define _GNU_SOURCE
#include "engine.h"
#include "cuda_copy.h"
#include "transport_map.h"
#include "transport_shm.h"
#include "transport_tcp.h"
#include "transport_verbs.h"
#include "verbs.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

static void read_boot_id(char *out, size_t cap)
{
    out[0] = 0;
    FILE *f = fopen("/proc/sys/kernel/random/boot_id", "r");
    if (!f)
        return;
    if (fgets(out, (int)cap, f))
        out[strcspn(out, "\n")] = 0;
    fclose(f);
}

int kvt_engine_create(const kvt_engine_opts *opts, kvt_engine **out, kvt_err *err)
{
    kvt_engine *e = calloc(1, sizeof *e);
    if (!e)
        return kvt_syserr(err, ENOMEM, "calloc", "engine");
    e->opts = *opts;
    snprintf(e->listen_host, sizeof e->listen_host, "%s", opts->listen_host ? opts->listen_host : "127.0.0.1");
    e->opts.listen_host = e->listen_host;
    /* 0 means "the default"; anything else out of range is the caller's mistake */
    if (opts->io_timeout_ms < 0 || opts->tcp_conns < 0 || opts->tcp_conns > KVT_MAX_THREADS ||
        opts->shm_threads < 0 || opts->shm_threads > KVT_MAX_THREADS) {
        free(e);
        return kvt_error(err, EINVAL, "engine", "io_timeout_ms=%d must be >= 0, tcp_conns=%d and shm_threads=%d in [0, %d]",
                         opts->io_timeout_ms, opts->tcp_conns, opts->shm_threads, KVT_MAX_THREADS);
    }
    if (e->opts.io_timeout_ms == 0)
        e->opts.io_timeout_ms = 10000;
    if (e->opts.tcp_conns == 0)
        e->opts.tcp_conns = 4;
    if (e->opts.shm_threads == 0)
        e->opts.shm_threads = 2;
    if (e->opts.verbs_qps < 0 || e->opts.verbs_qps > KVT_VERBS_MAX_QPS) {
        free(e);
        return kvt_error(err, EINVAL, "engine", "verbs_qps=%d must be in [0, %d]", opts->verbs_qps, KVT_VERBS_MAX_QPS);
    }
    if (e->opts.verbs_qps == 0)
        e->opts.verbs_qps = 2;
    pthread_mutex_init(&e->reg_lock, NULL);

    kvt_engine_info *in = &e->info;
    if (getrandom(in->id, sizeof in->id, 0) != (ssize_t)sizeof in->id) {
        int rc = kvt_syserr(err, errno, "getrandom", "%zu", sizeof in->id);
        free(e);
        return rc;
    }
    in->pid = getpid();
    struct stat st;
    in->pidns = stat("/proc/self/ns/pid", &st) == 0 ? (uint64_t)st.st_ino : 0;
    read_boot_id(in->boot_id, sizeof in->boot_id);

    int rc = kvt_table_init(&e->table, in->id, err);
    if (rc < 0) {
        free(e);
        return rc;
    }
    in->table_fd = e->table.fd;
    in->table_addr = (uint64_t)(uintptr_t)e->table.shared;

    /* An RDMA device is optional: without one the engine serves shm and tcp, and
     * says why verbs is unavailable. */
    if (opts->use_verbs) {
        kvt_err why;
        if (kvt_verbs_open(&e->verbs, in, &why) < 0)
            snprintf(in->verbs_why, sizeof in->verbs_why, "%s", why.msg);
    } else {
        snprintf(in->verbs_why, sizeof in->verbs_why, "verbs not requested");
    }

    int port = 0;
    rc = kvt_tcp_server_start(&e->table, e->verbs, e->listen_host, opts->listen_port, e->opts.io_timeout_ms,
                              &e->server, &port, err);
    if (rc < 0) {
        kvt_verbs_close(e->verbs);
        kvt_table_destroy(&e->table);
        free(e);
        return rc;
    }
    snprintf(in->tcp_host, sizeof in->tcp_host, "%s", e->listen_host);
    in->tcp_port = port;
    *out = e;
    return 0;
}

void kvt_engine_destroy(kvt_engine *e)
{
    if (!e)
        return;
    kvt_tcp_server_stop(e->server);
    for (int i = 0; i < KVT_MAX_REGIONS; i++)
        kvt_verbs_dereg(e->mrs[i]);
    kvt_verbs_close(e->verbs);
    kvt_table_destroy(&e->table);
    pthread_mutex_destroy(&e->reg_lock);
    free(e);
}

void kvt_engine_info_get(const kvt_engine *e, kvt_engine_info *info) { *info = e->info; }

int kvt_register(kvt_engine *e, uint64_t addr, uint64_t len, int mem_kind, int device,
                 uint64_t *region_id, uint64_t *key, const char **verbs_path, kvt_err *err)
{
    kvt_cuda_alloc cuda;
    kvt_map_src map = {.fd = -1};
    if (mem_kind == KVT_MEM_HOST)
        kvt_map_export(addr, len, &map); /* memory in a shareable file: same-host readers map it */
    if (mem_kind == KVT_MEM_CUDA) {
        int ordinal = -1;
        int rc = kvt_cuda_pointer_device(addr, &ordinal, err);
        if (rc < 0)
            return rc;
        if (device >= 0 && ordinal != device)
            return kvt_error(err, EINVAL, "register", "0x%lx is on cuda:%d, not cuda:%d",
                             (unsigned long)addr, ordinal, device);
        device = ordinal;
        /* the allocation and its IPC handle, found once, for every same-host reader */
        rc = kvt_cuda_export(addr, len, device, &cuda, err);
        if (rc < 0)
            return rc;
        /* Build the gather kernel for this device now (NVRTC takes a few hundred ms),
         * not inside the first read into it. A failure here is remembered and reported
         * by the reads that need the kernel; registration itself does not depend on it. */
        kvt_err ignored;
        kvt_copy_prepare(device, NULL, &ignored);
    } else if (mem_kind != KVT_MEM_HOST) {
        return kvt_error(err, EINVAL, "register", "unknown memory kind %d", mem_kind);
    }
    pthread_mutex_lock(&e->reg_lock);
    void *mr = NULL;
    uint32_t lkey = 0, rkey = 0;
    const char *path = "";
    int rc = 0;
    if (e->verbs)
        rc = kvt_verbs_reg(e->verbs, addr, len, mem_kind, &mr, &lkey, &rkey, &path, err);
    if (rc == 0)
        rc = kvt_table_add(&e->table, addr, len, mem_kind, device, lkey, rkey,
                           mem_kind == KVT_MEM_CUDA ? &cuda : NULL, &map, region_id, key, err);
    if (rc == 0) {
        e->mrs[kvt_region_slot(*region_id)] = mr;
        if (verbs_path)
            *verbs_path = path;
    } else {
        kvt_verbs_dereg(mr);
    }
    pthread_mutex_unlock(&e->reg_lock);
    return rc;
}

int kvt_region_cuda(kvt_engine *e, uint64_t region_id, kvt_cuda_alloc *out, kvt_err *err)
{
    kvt_shared_slot s;
    int rc = kvt_table_snapshot(&e->table, region_id, &s, err);
    if (rc < 0)
        return rc;
    if (s.mem_kind != KVT_MEM_CUDA)
        return kvt_error(err, EINVAL, "region", "region 0x%lx is host memory", (unsigned long)region_id);
    *out = s.cuda;
    return 0;
}

int kvt_deregister(kvt_engine *e, uint64_t region_id, kvt_err *err)
{
    /* The table refuses tcp and shm reads first (and waits for those in progress);
     * deregistering the MR then makes the NIC refuse verbs reads. */
    pthread_mutex_lock(&e->reg_lock);
    int rc = kvt_table_remove(&e->table, region_id, err);
    if (rc == 0) {
        uint32_t slot = kvt_region_slot(region_id);
        kvt_verbs_dereg(e->mrs[slot]);
        e->mrs[slot] = NULL;
    }
    pthread_mutex_unlock(&e->reg_lock);
    return rc;
}

/* The transport table, in the order connect prefers them: the one place a
 * transport is chosen. */
static const kvt_transport_ops *const transports[] = {&kvt_verbs_ops, &kvt_map_ops, &kvt_shm_ops, &kvt_tcp_ops};
#define N_TRANSPORTS (sizeof transports / sizeof transports[0])
_Static_assert(N_TRANSPORTS <= KVT_MAX_TRANSPORTS, "KVT_MAX_TRANSPORTS");

size_t kvt_transport_count(void) { return N_TRANSPORTS; }

const char *kvt_transport_name(size_t i) { return i < N_TRANSPORTS ? transports[i]->name : NULL; }

int kvt_transport_facts(const kvt_engine *e, size_t i, kvt_fact *facts, size_t *n, char *why, size_t cap)
{
    *n = 0;
    why[0] = 0;
    return i < N_TRANSPORTS ? transports[i]->facts(e, facts, n, why, cap) : 0;
}

static const char *names_list(char *buf, size_t cap)
{
    size_t used = 0;
    buf[0] = 0;
    for (size_t i = 0; i < N_TRANSPORTS; i++)
        used += (size_t)snprintf(buf + used, used < cap ? cap - used : 0, "%s%s", i ? ", " : "", transports[i]->name);
    return buf;
}

int kvt_plan(const kvt_engine *e, const kvt_engine_info *peer, const char *forced, kvt_reach out[KVT_MAX_TRANSPORTS],
             kvt_err *err)
{
    int n = 0;
    for (size_t i = 0; i < N_TRANSPORTS; i++) {
        if (forced && strcmp(forced, transports[i]->name) != 0)
            continue;
        kvt_reach *r = &out[n++];
        memset(r, 0, sizeof *r);
        r->name = transports[i]->name;
        r->ok = transports[i]->reach(e, peer, forced != NULL, r);
        if (forced && !r->ok)
            return kvt_error(err, r->code ? r->code : EHOSTUNREACH, "connect", "forced transport %s is unavailable: %s",
                             r->name, r->why);
    }
    if (forced && n == 0) {
        char names[128];
        return kvt_error(err, EINVAL, "transport", "unknown transport '%s'; choose one of %s", forced,
                         names_list(names, sizeof names));
    }
    return n;
}

static const kvt_transport_ops *ops_named(const char *name)
{
    for (size_t i = 0; i < N_TRANSPORTS; i++)
        if (strcmp(transports[i]->name, name) == 0)
            return transports[i];
    return NULL;
}

static int connect_one(kvt_engine *e, const kvt_engine_info *peer, const kvt_transport_ops *ops, kvt_peer **out,
                       kvt_err *err)
{
    kvt_peer *p = calloc(1, sizeof *p);
    if (!p)
        return kvt_syserr(err, ENOMEM, "calloc", "peer");
    p->eng = e;
    p->ops = ops;
    kvt_queue_init(&p->queue);
    int rc = ops->connect(p, peer, err);
    if (rc < 0) {
        kvt_queue_destroy(&p->queue);
        free(p);
        return rc;
    }
    *out = p;
    return 0;
}

int kvt_connect(kvt_engine *e, const kvt_engine_info *peer, const char *forced, kvt_peer **out,
                kvt_reach tried[KVT_MAX_TRANSPORTS], size_t *ntried, kvt_err *err)
{
    kvt_reach plan[KVT_MAX_TRANSPORTS], scratch[KVT_MAX_TRANSPORTS];
    if (!tried)
        tried = scratch;
    size_t nt = 0;
    if (ntried)
        *ntried = 0;
    int n = kvt_plan(e, peer, forced, plan, err);
    if (n < 0)
        return n;
    char id[2 * KVT_ENGINE_ID_LEN + 1];
    for (int i = 0; i < KVT_ENGINE_ID_LEN; i++)
        snprintf(id + 2 * i, 3, "%02x", peer->id[i]);
    char failures[1024] = "";
    size_t used = 0;
    for (int i = 0; i < n; i++) {
        if (!plan[i].ok) {
            used += (size_t)snprintf(failures + used, used < sizeof failures ? sizeof failures - used : 0, "%s%s: %s",
                                     used ? "; " : "", plan[i].name, plan[i].why);
            continue;
        }
        kvt_err why;
        int rc = connect_one(e, peer, ops_named(plan[i].name), out, &why);
        if (rc == 0) {
            if (ntried)
                *ntried = nt;
            return 0;
        }
        if (forced)
            return kvt_error(err, -why.code, why.op, "forced transport %s cannot reach engine %s: %s", plan[i].name,
                             id, why.msg);
        tried[nt] = plan[i];
        tried[nt].ok = 0;
        tried[nt].code = -why.code;
        snprintf(tried[nt].why, sizeof tried[nt].why, "%s", why.msg);
        used += (size_t)snprintf(failures + used, used < sizeof failures ? sizeof failures - used : 0, "%s%s: %s",
                                 used ? "; " : "", plan[i].name, why.msg);
        nt++;
    }
    if (ntried)
        *ntried = nt;
    return kvt_error(err, EHOSTUNREACH, "connect", "no transport reaches engine %s: %s", id, failures);
}

const char *kvt_peer_transport(const kvt_peer *p) { return p->ops->name; }

void kvt_peer_close(kvt_peer *p)
{
    if (!p)
        return;
    kvt_queue_close(&p->queue);
    p->ops->close(p);
    kvt_queue_cancel(&p->queue);
    kvt_queue_destroy(&p->queue);
    free(p);
}

void kvt_peer_limits(const kvt_peer *p, kvt_job_limits lim[3])
{
    lim[0] = (kvt_job_limits){p->max_pieces, p->max_bytes};
    lim[1] = (kvt_job_limits){p->dev_max_pieces ? p->dev_max_pieces : p->max_pieces,
                              p->dev_max_bytes ? p->dev_max_bytes : p->max_bytes};
    lim[2] = lim[1];
}

int kvt_submit_jobs(kvt_peer *p, const kvt_read_cols *cols, enum kvt_batch_kind kind, kvt_transfer **out,
                    kvt_err *err)
{
    kvt_job_limits lim[3];
    kvt_peer_limits(p, lim);
    const kvt_job_sink sink = {.q = &p->queue};
    return kvt_transfer_start(&p->eng->table, cols, kind, lim, &sink, out, err);
}

int kvt_peer_read_cols(kvt_peer *p, const kvt_read_cols *cols, kvt_transfer **out, kvt_err *err)
{
    return p->ops->submit(p, cols, KVT_BATCH_ENTRIES, out, err);
}

int kvt_peer_read_paged(kvt_peer *p, const kvt_paged_batch *b, kvt_transfer **out, kvt_err *err)
{
    kvt_read_cols c = {.n = b->n,
                       .local_region = {&b->local_region, 0},
                       .local_off = b->local_off,
                       .remote_region = {&b->remote_region, 0},
                       .remote_key = {&b->remote_key, 0},
                       .remote_addr = {&b->remote_addr, 0},
                       .remote_off = b->remote_off,
                       .len = b->len};
    return p->ops->submit(p, &c, KVT_BATCH_PAGED, out, err);
}

int kvt_peer_read(kvt_peer *p, const kvt_read_req *reqs, size_t n, kvt_transfer **out, kvt_err *err)
{
    const size_t st = sizeof(kvt_read_req) / sizeof(uint64_t);
    const uint64_t *b = (const uint64_t *)reqs;
    kvt_read_cols c = {.n = n,
                       .local_region = {b + 0, st},
                       .local_off = {b + 1, st},
                       .remote_region = {b + 2, st},
                       .remote_key = {b + 3, st},
                       .remote_addr = {b + 4, st},
                       .remote_off = {b + 5, st},
                       .len = {b + 6, st}};
    return p->ops->submit(p, &c, KVT_BATCH_ENTRIES, out, err);
}
