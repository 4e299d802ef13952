/* tcp transport, reader side. Each peer has several connections (one stream is bound
 * by one core's copies; several carry more), each driven by its own thread that pulls jobs
 * from the peer's queue. A thread keeps two requests in flight on its connection so
 * the next request is at the server while the current response streams in, and it
 * receives the bytes straight into the destination with readv. A broken connection
 * fails the jobs on it and is re-dialed for the next job. A job into CUDA memory is
 * received through pinned staging buffers (tcp_stage.c): receiving the next chunk
 * overlaps with the host->device copy of the previous one. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "transport_tcp.h"
#include "sock.h"
#include "tcp_stage.h"
#include "wire.h"

#define TCP_MAX_PIECES KVT_WIRE_MAX_ENTRIES
#define TCP_MAX_BYTES (2u << 20)
/* Jobs into CUDA memory: KVTRANSFER_TCP_DEV_JOB_KB (64 KiB to 64 MiB), default 8 MiB:
 * fewer, longer frames amortize the staging (four buffers of 2 MiB per frame). */
static uint64_t dev_job_bytes(void)
{
    const char *e = getenv("KVTRANSFER_TCP_DEV_JOB_KB");
    long kb = e && *e ? strtol(e, NULL, 10) : 8192;
    return (uint64_t)(kb < 64 ? 64 : kb > 65536 ? 65536 : kb) << 10;
}
#define TCP_PIPELINE 2

typedef struct tcp_peer tcp_peer;

typedef struct tcp_conn {
    tcp_peer *tp;
    pthread_t thread;
    pthread_mutex_t mu; /* guards fd against close-during-shutdown */
    int fd;
    uint64_t seq;
    kvt_wire_entry ents[KVT_WIRE_MAX_ENTRIES];
    int32_t status[KVT_WIRE_MAX_ENTRIES];
    struct iovec iov[KVT_WIRE_MAX_ENTRIES];
    kvt_seg segs[KVT_WIRE_MAX_ENTRIES];
    kvt_stage *stage; /* made at the first job into CUDA memory */
} tcp_conn;

struct tcp_peer {
    kvt_queue *queue;
    char host[64];
    int port;
    uint8_t id[KVT_ENGINE_ID_LEN];
    int has_token;
    uint8_t token[KVT_TOKEN_LEN];
    int timeout_ms;
    int nconns;
    tcp_conn *conns;
};

int kvt_bootstrap_dial(const char *host, int port, const uint8_t id[KVT_ENGINE_ID_LEN], const uint8_t *token,
                       int timeout_ms, kvt_err *err)
{
    int fd = kvt_tcp_dial(host, port, timeout_ms, err);
    if (fd < 0)
        return fd;
    kvt_wire_hello hi = {.magic = KVT_HELLO_MAGIC, .version = KVT_WIRE_VERSION, .flags = token ? KVT_HELLO_TOKEN : 0};
    memcpy(hi.engine_id, id, sizeof hi.engine_id);
    struct iovec out[2] = {{&hi, sizeof hi}, {(void *)token, token ? KVT_WIRE_TOKEN_LEN : 0}};
    int rc = kvt_sock_setup(fd, timeout_ms, err);
    kvt_err send_err;
    /* a server refusing this connection may have answered and closed before our hello
     * got there: its answer says more than our send's error */
    int sent = rc == 0 ? kvt_send_iov(fd, out, token ? 2 : 1, "hello", &send_err) : rc;
    if (rc == 0 && (rc = kvt_recv_all(fd, &hi, sizeof hi, "hello", err)) < 0 && sent < 0) {
        *err = send_err;
        rc = sent;
    }
    if (rc == 0 && hi.magic == KVT_HELLO_MAGIC && hi.status == -EBUSY)
        rc = kvt_error(err, EBUSY, "connect", "%s:%d refused the connection: too many connections %s", host, port,
                       hi.reserved == KVT_REFUSED_PEER ? "from this address" : "in total");
    if (rc == 0 && hi.magic == KVT_HELLO_MAGIC && hi.status == -EACCES)
        rc = kvt_error(err, EACCES, "connect", "%s:%d refused the connection: token refused (%s)", host, port,
                       token ? "not allowed, expired or revoked" : "the server requires one");
    if (rc == 0 && (hi.magic != KVT_HELLO_MAGIC || hi.version != KVT_WIRE_VERSION || hi.status != 0))
        rc = kvt_error(err, EPROTO, "connect", "%s:%d is not a kvtransfer v%d engine (magic 0x%x, version %u, status %d)",
                       host, port, KVT_WIRE_VERSION, hi.magic, hi.version, hi.status);
    if (rc == 0 && memcmp(hi.engine_id, id, KVT_ENGINE_ID_LEN) != 0)
        rc = kvt_error(err, ESTALE, "connect", "%s:%d serves another engine than the descriptor names", host, port);
    if (rc < 0) {
        close(fd);
        return rc;
    }
    return fd;
}

static int dial(tcp_peer *tp, kvt_err *err)
{
    return kvt_bootstrap_dial(tp->host, tp->port, tp->id, tp->has_token ? tp->token : NULL, tp->timeout_ms, err);
}

static void drop_fd(tcp_conn *c)
{
    pthread_mutex_lock(&c->mu);
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    pthread_mutex_unlock(&c->mu);
}

/* Whether the server ended this connection (nothing else arrives unasked). */
static int closed_by_server(int fd)
{
    struct pollfd pf = {.fd = fd, .events = POLLIN | POLLRDHUP};
    return poll(&pf, 1, 0) > 0;
}

static int send_request(tcp_conn *c, kvt_job *job, uint64_t seq, kvt_err *err)
{
    for (size_t i = 0; i < job->n; i++) {
        const kvt_piece *p = &job->pieces[i];
        c->ents[i] = (kvt_wire_entry){p->remote_region, p->remote_key, p->remote_off, p->len};
    }
    kvt_wire_hdr h = {.magic = KVT_REQ_MAGIC, .n = (uint32_t)job->n, .seq = seq};
    struct iovec v[2] = {{&h, sizeof h}, {c->ents, job->n * sizeof(kvt_wire_entry)}};
    return kvt_send_iov(c->fd, v, 2, "read request", err);
}

static const char *refusal(int st)
{
    switch (-st) {
    case EACCES: return "wrong key";
    case ENOENT: return "region not registered (deregistered?)";
    case ERANGE: return "range outside the region";
    case EOPNOTSUPP: return "not supported by the target";
    case EMSGSIZE: return "the request asks for more bytes than the target sends per frame";
    default: return "refused";
    }
}

/* Receives one response into the job's destinations. Returns <0 when the connection
 * is unusable; a refused entry only sets st and entry. */
static int recv_response(tcp_conn *c, kvt_job *job, uint64_t seq, int *st, int64_t *entry, kvt_err *err)
{
    tcp_peer *tp = c->tp;
    kvt_wire_hdr h;
    int rc = kvt_recv_all(c->fd, &h, sizeof h, "response header", err);
    if (rc < 0)
        return rc;
    if (h.magic != KVT_RESP_MAGIC || h.n != job->n || h.seq != seq)
        return kvt_error(err, EPROTO, "read", "%s:%d sent a malformed response (magic 0x%x, n %u, seq %lu)",
                         tp->host, tp->port, h.magic, h.n, (unsigned long)h.seq);
    rc = kvt_recv_all(c->fd, c->status, job->n * sizeof(int32_t), "response status", err);
    if (rc < 0)
        return rc;
    size_t nv = 0;
    *st = 0;
    for (size_t i = 0; i < job->n; i++) {
        const kvt_piece *p = &job->pieces[i];
        int32_t s = c->status[i];
        if (s == 0) {
            c->iov[nv].iov_base = (void *)(uintptr_t)p->local_addr;
            c->iov[nv].iov_len = p->len;
            c->segs[nv] = (kvt_seg){p->local_addr, p->len, job->local_kind, job->local_dev};
            nv++;
        } else if (*st == 0) {
            *st = s < 0 ? s : -EPROTO;
            *entry = (int64_t)p->entry;
            kvt_error(err, -*st, "read", "target %s:%d refused region 0x%lx [%lu, +%lu): %s",
                      tp->host, tp->port, (unsigned long)p->remote_region, (unsigned long)p->remote_off,
                      (unsigned long)p->len, refusal(*st));
        }
    }
    kvt_err e2;
    if (job->local_kind != KVT_MEM_HOST)
        rc = kvt_stage_recv(&c->stage, c->fd, c->segs, nv, *st ? &e2 : err);
    else
        rc = kvt_recv_iov(c->fd, c->iov, nv, "response data", *st ? &e2 : err);
    if (rc < 0 && *st)
        *err = e2;
    return rc;
}

static void fail_all(kvt_job **fl, int *n, int rc, const kvt_err *err)
{
    for (int i = 0; i < *n; i++)
        kvt_job_done(fl[i], rc, err, (int64_t)fl[i]->pieces[0].entry);
    *n = 0;
}

static void *conn_main(void *arg)
{
    tcp_conn *c = arg;
    kvt_job *fl[TCP_PIPELINE]; /* requests sent, responses pending, in order */
    uint64_t fseq[TCP_PIPELINE];
    int nfl = 0;
    kvt_err err;
    for (;;) {
        kvt_job *job = nfl < TCP_PIPELINE ? kvt_queue_pop(c->tp->queue, nfl == 0) : NULL;
        if (!job && nfl == 0)
            break; /* queue closed */
        if (job && kvt_job_skip_if_failed(job))
            continue;
        if (job) {
            kvt_job_materialize(job);
            int rc = 0;
            if (c->fd >= 0 && nfl == 0 && closed_by_server(c->fd))
                drop_fd(c); /* idle too long: the server dropped it; dial a new one */
            if (c->fd < 0) {
                int fd = dial(c->tp, &err);
                if (fd < 0)
                    rc = fd;
                else {
                    pthread_mutex_lock(&c->mu);
                    c->fd = fd;
                    pthread_mutex_unlock(&c->mu);
                }
            }
            if (rc == 0)
                rc = send_request(c, job, ++c->seq, &err);
            if (rc < 0) {
                kvt_job_done(job, rc, &err, (int64_t)job->pieces[0].entry);
                fail_all(fl, &nfl, rc, &err);
                drop_fd(c);
                continue;
            }
            fseq[nfl] = c->seq;
            fl[nfl++] = job;
            if (nfl < TCP_PIPELINE)
                continue; /* try to put one more request on the wire first */
        }
        int st = 0;
        int64_t entry = -1;
        int rc = recv_response(c, fl[0], fseq[0], &st, &entry, &err);
        if (rc < 0) {
            fail_all(fl, &nfl, rc, &err);
            drop_fd(c);
            continue;
        }
        kvt_job_done(fl[0], st, st ? &err : NULL, entry);
        for (int i = 1; i < nfl; i++) {
            fl[i - 1] = fl[i];
            fseq[i - 1] = fseq[i];
        }
        nfl--;
    }
    drop_fd(c);
    kvt_stage_free(c->stage);
    c->stage = NULL;
    return NULL;
}

static void tcp_close(kvt_peer *p)
{
    tcp_peer *tp = p->impl;
    /* The queue is closed: idle threads exit; wake the ones waiting on the network. */
    for (int i = 0; i < tp->nconns; i++) {
        pthread_mutex_lock(&tp->conns[i].mu);
        if (tp->conns[i].fd >= 0)
            shutdown(tp->conns[i].fd, SHUT_RDWR);
        pthread_mutex_unlock(&tp->conns[i].mu);
    }
    for (int i = 0; i < tp->nconns; i++) {
        pthread_join(tp->conns[i].thread, NULL);
        pthread_mutex_destroy(&tp->conns[i].mu);
    }
    free(tp->conns);
    free(tp);
}

static int tcp_reach(const kvt_engine *e, const kvt_engine_info *peer, int forced, kvt_reach *r)
{
    if (peer->tcp_port <= 0 || !peer->tcp_host[0]) {
        r->code = EHOSTUNREACH;
        snprintf(r->why, sizeof r->why, "the peer engine has no tcp address");
        return 0;
    }
    snprintf(r->why, sizeof r->why, "reaches any host: the peer's tcp server at %s:%d", peer->tcp_host,
             (int)peer->tcp_port);
    return 1;
}

static int tcp_facts(const kvt_engine *e, kvt_fact *f, size_t *n, char *why, size_t cap)
{
    f[0] = (kvt_fact){.key = "listen"};
    snprintf(f[0].s, sizeof f[0].s, "%s:%d", e->info.tcp_host, (int)e->info.tcp_port);
    *n = 1;
    return 1;
}

static int tcp_connect(kvt_peer *p, const kvt_engine_info *peer, kvt_err *err)
{
    if (peer->tcp_port <= 0 || !peer->tcp_host[0])
        return kvt_error(err, EINVAL, "connect", "peer has no tcp address");
    tcp_peer *tp = calloc(1, sizeof *tp);
    int n = p->eng->opts.tcp_conns;
    if (!tp || !(tp->conns = calloc((size_t)n, sizeof(tcp_conn)))) {
        free(tp);
        return kvt_syserr(err, ENOMEM, "calloc", "%d tcp connections", n);
    }
    tp->queue = &p->queue;
    snprintf(tp->host, sizeof tp->host, "%s", peer->tcp_host);
    tp->port = peer->tcp_port;
    memcpy(tp->id, peer->id, sizeof tp->id);
    tp->has_token = peer->has_token;
    memcpy(tp->token, peer->token, sizeof tp->token);
    tp->timeout_ms = p->eng->opts.io_timeout_ms;
    int rc = 0;
    /* Dial every connection now, so a wrong address or engine fails connect(). */
    for (int i = 0; i < n; i++) {
        tcp_conn *c = &tp->conns[i];
        c->tp = tp;
        pthread_mutex_init(&c->mu, NULL);
        c->fd = rc < 0 ? -1 : dial(tp, err);
        if (c->fd < 0 && rc == 0)
            rc = c->fd;
    }
    for (int i = 0; i < n && rc == 0; i++) {
        int e = pthread_create(&tp->conns[i].thread, NULL, conn_main, &tp->conns[i]);
        if (e != 0)
            rc = kvt_syserr(err, e, "pthread_create", "tcp connection %d", i);
        else
            tp->nconns = i + 1;
    }
    p->impl = tp;
    p->max_pieces = TCP_MAX_PIECES;
    p->max_bytes = TCP_MAX_BYTES;
    p->dev_max_pieces = TCP_MAX_PIECES;
    p->dev_max_bytes = dev_job_bytes();
    if (rc < 0) {
        kvt_queue_close(&p->queue);
        for (int i = tp->nconns; i < n; i++) {
            if (tp->conns[i].fd >= 0)
                close(tp->conns[i].fd);
            pthread_mutex_destroy(&tp->conns[i].mu);
        }
        tcp_close(p);
        return rc;
    }
    return 0;
}

const kvt_transport_ops kvt_tcp_ops = {
    .name = "tcp",
    .reach = tcp_reach,
    .connect = tcp_connect,
    .submit = kvt_submit_jobs,
    .close = tcp_close,
    .facts = tcp_facts,
};
