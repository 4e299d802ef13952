/* verbs transport, reader side: RDMA READs on RC queue pairs.
 *
 * One C thread per peer posts and completes. A job becomes a chain of RDMA READ work
 * requests (one SGE each), posted with one doorbell, only the last one signaled; jobs
 * are spread over the peer's queue pairs and never overfill a send queue (the NIC
 * itself keeps at most max_rd_atomic READs in flight per queue pair). The thread
 * sleeps in poll() on the completion channel, the queue's eventfd and the bootstrap
 * socket: a target that exits closes that socket and fails the reads at once; a
 * target that stops answering fails them after the io timeout. An error completion
 * fails its job with ibv_wc_status_str's text; the queue pairs, then in error, are
 * torn down once in-flight work has drained and rebuilt for the next job. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "transport_verbs.h"
#include "sock.h"
#include "verbs.h"

#define VERBS_MAX_PIECES 64
#define VERBS_MAX_BYTES (4u << 20)

typedef struct vslot {
    kvt_job *job; /* NULL when free */
    uint32_t gen;
    uint16_t qp;
    uint16_t nwr;
} vslot;

typedef struct verbs_peer {
    kvt_queue *queue;
    kvt_verbs *v;
    char host[64];
    int port;
    uint8_t id[KVT_ENGINE_ID_LEN];
    int has_token;
    uint8_t token[KVT_TOKEN_LEN];
    int timeout_ms;
    int nqp;
    int wake_fd;
    _Atomic int closing;
    pthread_t thread;
    /* connection state, owned by the thread */
    int boot_fd;
    kvt_qpset *qs;
    int broken;
    int posted[KVT_VERBS_MAX_QPS]; /* work requests in each send queue */
    int rr;
    kvt_job *pending; /* popped, waiting for send-queue room */
    vslot *slots;
    uint32_t nslots, inflight, *free_stack, nfree, gen;
    struct timespec last_progress;
    struct ibv_send_wr wr[VERBS_MAX_PIECES];
    struct ibv_sge sge[VERBS_MAX_PIECES];
} verbs_peer;

static int64_t ms_since(const struct timespec *t)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - t->tv_sec) * 1000 + (now.tv_nsec - t->tv_nsec) / 1000000;
}

static void progress(verbs_peer *vp) { clock_gettime(CLOCK_MONOTONIC, &vp->last_progress); }

static int wc_errno(enum ibv_wc_status st)
{
    switch (st) {
    case IBV_WC_REM_ACCESS_ERR: return EACCES; /* bad rkey, out of bounds, deregistered: the NIC says no */
    case IBV_WC_LOC_PROT_ERR:
    case IBV_WC_LOC_ACCESS_ERR: return EFAULT;
    case IBV_WC_RETRY_EXC_ERR:
    case IBV_WC_RNR_RETRY_EXC_ERR: return EHOSTUNREACH;
    case IBV_WC_WR_FLUSH_ERR: return ECANCELED;
    default: return EIO;
    }
}

static void finish_slot(verbs_peer *vp, uint32_t idx, int rc, const kvt_err *err, int64_t entry)
{
    vslot *s = &vp->slots[idx];
    kvt_job *job = s->job;
    s->job = NULL;
    vp->posted[s->qp] -= s->nwr;
    vp->inflight--;
    vp->free_stack[vp->nfree++] = idx;
    kvt_job_done(job, rc, err, entry);
}

static void fail_inflight(verbs_peer *vp, int rc, const kvt_err *err)
{
    for (uint32_t i = 0; i < vp->nslots; i++)
        if (vp->slots[i].job)
            finish_slot(vp, i, rc, err, (int64_t)vp->slots[i].job->pieces[0].entry);
}

/* Destroys the queue pairs (the NIC stops writing) and closes the bootstrap. */
static void teardown(verbs_peer *vp)
{
    kvt_qpset_destroy(vp->qs);
    vp->qs = NULL;
    if (vp->boot_fd >= 0)
        close(vp->boot_fd);
    vp->boot_fd = -1;
    vp->broken = 0;
    memset(vp->posted, 0, sizeof vp->posted);
}

static void abort_all(verbs_peer *vp, int errnum, const char *why)
{
    kvt_err e;
    kvt_error(&e, errnum, "read", "verbs peer %s:%d: %s", vp->host, vp->port, why);
    teardown(vp);
    fail_inflight(vp, -errnum, &e);
}

static int establish(verbs_peer *vp, kvt_err *err)
{
    int fd = kvt_bootstrap_dial(vp->host, vp->port, vp->id, vp->has_token ? vp->token : NULL, vp->timeout_ms, err);
    if (fd < 0)
        return fd;
    kvt_qpset *qs = NULL;
    int rc = kvt_qpset_create(vp->v, vp->nqp, 1, &qs, err);
    kvt_wire_hdr h = {.magic = KVT_VERBS_MAGIC, .n = (uint32_t)vp->nqp};
    kvt_wire_verbs mine, theirs;
    if (rc == 0) {
        kvt_qpset_local(qs, &mine);
        struct iovec v[2] = {{&h, sizeof h}, {&mine, sizeof mine}};
        rc = kvt_send_iov(fd, v, 2, "verbs connect", err);
    }
    if (rc == 0) {
        struct iovec v[2] = {{&h, sizeof h}, {&theirs, sizeof theirs}};
        rc = kvt_recv_iov(fd, v, 2, "verbs connect reply", err);
    }
    if (rc == 0 && (h.magic != KVT_VERBS_MAGIC || theirs.status != 0))
        rc = kvt_error(err, h.magic != KVT_VERBS_MAGIC ? EPROTO : -theirs.status, "connect",
                       "%s:%d refused RDMA queue pairs: %s", vp->host, vp->port,
                       h.magic != KVT_VERBS_MAGIC ? "bad reply" : strerror(-theirs.status));
    if (rc == 0)
        rc = kvt_qpset_connect(qs, &theirs, err);
    if (rc < 0) {
        kvt_qpset_destroy(qs);
        close(fd);
        return rc;
    }
    vp->qs = qs;
    vp->boot_fd = fd;
    progress(vp);
    return 0;
}

/* 1 posted, 0 no send-queue room now, <0 failed (job not taken). */
static int post_job(verbs_peer *vp, kvt_job *job, kvt_err *err)
{
    kvt_qpset *qs = vp->qs;
    int q = -1;
    for (int k = 0; k < qs->n && q < 0; k++) {
        int c = (vp->rr + k) % qs->n;
        if (vp->posted[c] + (int)job->n <= qs->sq_depth)
            q = c;
    }
    if (q < 0 || vp->nfree == 0)
        return 0;
    vp->rr = (q + 1) % qs->n;
    uint32_t idx = vp->free_stack[--vp->nfree];
    uint32_t gen = ++vp->gen & 0xffffff;
    for (size_t i = 0; i < job->n; i++) {
        const kvt_piece *p = &job->pieces[i];
        vp->sge[i] = (struct ibv_sge){.addr = p->local_addr, .length = (uint32_t)p->len, .lkey = p->lkey};
        vp->wr[i] = (struct ibv_send_wr){
            /* wr_id: generation (24 bits), index in the job (8), slot (32) */
            .wr_id = ((uint64_t)gen << 40) | ((uint64_t)i << 32) | idx,
            .next = i + 1 < job->n ? &vp->wr[i + 1] : NULL,
            .sg_list = &vp->sge[i],
            .num_sge = 1,
            .opcode = IBV_WR_RDMA_READ,
            .send_flags = i + 1 == job->n ? IBV_SEND_SIGNALED : 0,
            .wr.rdma = {.remote_addr = p->remote_addr, .rkey = (uint32_t)p->remote_key},
        };
    }
    struct ibv_send_wr *bad = NULL;
    int e = ibv_post_send(qs->qp[q], vp->wr, &bad);
    if (e != 0) {
        vp->free_stack[vp->nfree++] = idx;
        return kvt_syserr(err, e, "ibv_post_send", "qpn=%u, %zu RDMA READs", qs->qp[q]->qp_num, job->n);
    }
    vp->slots[idx] = (vslot){.job = job, .gen = gen, .qp = (uint16_t)q, .nwr = (uint16_t)job->n};
    vp->posted[q] += (int)job->n;
    if (vp->inflight++ == 0)
        progress(vp);
    return 1;
}

/* Polls the completion queue dry; returns how many completions it saw. */
static int drain(verbs_peer *vp)
{
    int seen = 0;
    struct ibv_wc wc[32];
    int n;
    while (vp->qs && (n = ibv_poll_cq(vp->qs->cq, 32, wc)) > 0) {
        seen += n;
        for (int i = 0; i < n; i++) {
            uint32_t idx = (uint32_t)wc[i].wr_id, gen = (uint32_t)(wc[i].wr_id >> 40);
            uint32_t wi = (uint32_t)(wc[i].wr_id >> 32) & 0xff;
            if (idx >= vp->nslots || !vp->slots[idx].job || vp->slots[idx].gen != gen)
                continue; /* a flushed request of a job that already failed */
            kvt_job *job = vp->slots[idx].job;
            if (wc[i].status == IBV_WC_SUCCESS) {
                finish_slot(vp, idx, 0, NULL, -1);
                continue;
            }
            kvt_err e;
            const kvt_piece *p = &job->pieces[wi < job->n ? wi : 0];
            int en = wc_errno(wc[i].status);
            kvt_error(&e, en, "RDMA READ", "%s (wc status %d, vendor_err 0x%x) reading 0x%lx+%lu with rkey 0x%x, qpn %u",
                      ibv_wc_status_str(wc[i].status), wc[i].status, wc[i].vendor_err, (unsigned long)p->remote_addr,
                      (unsigned long)p->len, (uint32_t)p->remote_key, wc[i].qp_num);
            finish_slot(vp, idx, -en, &e, (int64_t)p->entry);
            vp->broken = 1; /* the queue pair is in error now: drain, then rebuild */
        }
    }
    if (seen)
        progress(vp);
    return seen;
}

static void post_pending(verbs_peer *vp)
{
    kvt_err err;
    while (!vp->broken) {
        if (!vp->pending && !(vp->pending = kvt_queue_pop(vp->queue, 0)))
            return;
        if (kvt_job_skip_if_failed(vp->pending)) {
            vp->pending = NULL;
            continue;
        }
        kvt_job_materialize(vp->pending); /* no-op once written: a job may be posted in parts */
        int rc = vp->qs ? 0 : establish(vp, &err);
        if (rc == 0)
            rc = post_job(vp, vp->pending, &err);
        if (rc == 0)
            return; /* no room: wait for completions */
        if (rc < 0) {
            kvt_job_done(vp->pending, rc, &err, (int64_t)vp->pending->pieces[0].entry);
            if (vp->qs)
                vp->broken = 1;
        }
        vp->pending = NULL;
    }
}

static void *verbs_main(void *arg)
{
    verbs_peer *vp = arg;
    for (;;) {
        if (atomic_load(&vp->closing)) {
            abort_all(vp, ECANCELED, "peer closed during the read");
            break;
        }
        drain(vp);
        if (vp->broken && vp->inflight == 0)
            teardown(vp); /* rebuilt on the next job */
        post_pending(vp);
        if (!vp->pending && vp->inflight == 0 && kvt_queue_is_closed(vp->queue))
            break;
        /* Sleep until a completion, a new job, or the target going away. Arm the
         * completion channel, then look once more to close the race with the NIC. */
        struct pollfd pf[3] = {{.fd = vp->wake_fd, .events = POLLIN}, {.fd = -1}, {.fd = -1}};
        if (vp->qs) {
            ibv_req_notify_cq(vp->qs->cq, 0);
            if (drain(vp))
                continue;
            pf[1] = (struct pollfd){.fd = vp->qs->channel->fd, .events = POLLIN};
            pf[2] = (struct pollfd){.fd = vp->boot_fd, .events = POLLIN};
        }
        int wait_ms = -1;
        if (vp->inflight) {
            int64_t left = vp->timeout_ms - ms_since(&vp->last_progress);
            wait_ms = left > 0 ? (int)left : 0;
        }
        int r = poll(pf, 3, wait_ms);
        if (r < 0 && errno != EINTR)
            break;
        if (r == 0 && vp->inflight && ms_since(&vp->last_progress) >= vp->timeout_ms) {
            char why[96];
            snprintf(why, sizeof why, "no completion for %d ms (target hung or unreachable)", vp->timeout_ms);
            abort_all(vp, ETIMEDOUT, why);
            continue;
        }
        if (pf[0].revents) {
            uint64_t v;
            ssize_t n = read(vp->wake_fd, &v, sizeof v);
            (void)n;
        }
        if (pf[1].revents) {
            struct ibv_cq *cq;
            void *ctx;
            if (ibv_get_cq_event(vp->qs->channel, &cq, &ctx) == 0)
                ibv_ack_cq_events(cq, 1);
        }
        if (pf[2].revents) {
            char c;
            ssize_t n = recv(vp->boot_fd, &c, 1, MSG_DONTWAIT | MSG_PEEK);
            if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
                drain(vp); /* keep what did complete */
                abort_all(vp, ECONNRESET, "the target closed its bootstrap connection (exited?)");
            }
        }
    }
    if (vp->pending) {
        kvt_job_cancel(vp->pending);
        vp->pending = NULL;
    }
    teardown(vp);
    return NULL;
}

static void verbs_close(kvt_peer *p)
{
    verbs_peer *vp = p->impl;
    atomic_store(&vp->closing, 1);
    uint64_t one = 1;
    ssize_t w = write(vp->wake_fd, &one, sizeof one);
    (void)w;
    pthread_join(vp->thread, NULL);
    p->queue.wake_fd = -1;
    close(vp->wake_fd);
    free(vp->slots);
    free(vp->free_stack);
    free(vp);
}

static void gid_str(const uint8_t gid[16], char *out, size_t cap)
{
    if (!inet_ntop(AF_INET6, gid, out, (socklen_t)cap))
        snprintf(out, cap, "?");
}

static int verbs_reach(const kvt_engine *e, const kvt_engine_info *peer, int forced, kvt_reach *r)
{
    r->code = ENODEV;
    if (!e->verbs) {
        snprintf(r->why, sizeof r->why, "this engine has no verbs: %s", e->info.verbs_why);
        return 0;
    }
    if (!peer->verbs) {
        snprintf(r->why, sizeof r->why, "the peer engine has no RDMA device");
        return 0;
    }
    r->code = 0;
    char mine[64], theirs[64];
    gid_str(e->info.gid, mine, sizeof mine);
    gid_str(peer->gid, theirs, sizeof theirs);
    snprintf(r->why, sizeof r->why, "both engines have RDMA ports (%s %s -> %s %s): RDMA READ", e->info.ib_device,
             mine, peer->ib_device, theirs);
    return 1;
}

static int verbs_facts(const kvt_engine *e, kvt_fact *f, size_t *n, char *why, size_t cap)
{
    if (!e->verbs) {
        snprintf(why, cap, "%s", e->info.verbs_why);
        return 0;
    }
    f[0] = (kvt_fact){.key = "device"};
    snprintf(f[0].s, sizeof f[0].s, "%s", e->info.ib_device);
    f[1] = (kvt_fact){.key = "port", .is_int = 1, .i = e->info.ib_port};
    f[2] = (kvt_fact){.key = "gid_index", .is_int = 1, .i = e->info.gid_index};
    f[3] = (kvt_fact){.key = "gid"};
    gid_str(e->info.gid, f[3].s, sizeof f[3].s);
    *n = 4;
    return 1;
}

static int verbs_connect(kvt_peer *p, const kvt_engine_info *peer, kvt_err *err)
{
    kvt_verbs *v = p->eng->verbs;
    if (!v)
        return kvt_error(err, ENODEV, "connect", "this engine has no RDMA device: %s", p->eng->info.verbs_why);
    if (!peer->verbs)
        return kvt_error(err, ENODEV, "connect", "the peer engine has no RDMA device");
    verbs_peer *vp = calloc(1, sizeof *vp);
    if (!vp)
        return kvt_syserr(err, ENOMEM, "calloc", "verbs peer");
    vp->queue = &p->queue;
    vp->v = v;
    snprintf(vp->host, sizeof vp->host, "%s", peer->tcp_host);
    vp->port = peer->tcp_port;
    memcpy(vp->id, peer->id, sizeof vp->id);
    vp->has_token = peer->has_token;
    memcpy(vp->token, peer->token, sizeof vp->token);
    vp->timeout_ms = p->eng->opts.io_timeout_ms;
    vp->nqp = p->eng->opts.verbs_qps;
    vp->boot_fd = -1;
    vp->wake_fd = -1;
    /* Connect now, so an unreachable GID or a QP that will not reach RTS fails
     * connect() (and automatic selection falls back), not the first read. */
    int rc = establish(vp, err);
    if (rc == 0) {
        vp->nslots = (uint32_t)(vp->qs->sq_depth * vp->nqp);
        vp->slots = calloc(vp->nslots, sizeof *vp->slots);
        vp->free_stack = calloc(vp->nslots, sizeof *vp->free_stack);
        vp->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (!vp->slots || !vp->free_stack || vp->wake_fd < 0)
            rc = kvt_syserr(err, ENOMEM, "verbs connect", "slots / eventfd");
        for (uint32_t i = 0; rc == 0 && i < vp->nslots; i++)
            vp->free_stack[vp->nfree++] = vp->nslots - 1 - i;
    }
    if (rc == 0) {
        p->queue.wake_fd = vp->wake_fd;
        p->impl = vp;
        /* a job is one chain: it must fit an empty send queue */
        p->max_pieces = vp->qs->sq_depth < VERBS_MAX_PIECES ? (size_t)vp->qs->sq_depth : VERBS_MAX_PIECES;
        p->max_bytes = VERBS_MAX_BYTES;
        int e = pthread_create(&vp->thread, NULL, verbs_main, vp);
        if (e != 0) {
            p->queue.wake_fd = -1;
            rc = kvt_syserr(err, e, "pthread_create", "verbs peer");
        } else {
            return 0;
        }
    }
    teardown(vp);
    if (vp->wake_fd >= 0)
        close(vp->wake_fd);
    free(vp->slots);
    free(vp->free_stack);
    free(vp);
    return rc;
}

const kvt_transport_ops kvt_verbs_ops = {
    .name = "verbs",
    .reach = verbs_reach,
    .connect = verbs_connect,
    .submit = kvt_submit_jobs,
    .close = verbs_close,
    .facts = verbs_facts,
};
