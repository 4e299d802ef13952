/* The tcp transport's target side: a C thread accepts connections and one thread per
 * connection answers read requests straight from registered memory (no Python, no
 * GIL). Every entry is checked against the region table (id, key, bounds) and holds a
 * reference on its region while its bytes are sent, so a deregistration waits for it.
 * CUDA regions are served through pinned staging buffers (tcp_stage.c): device->host
 * copies of the next chunk overlap with sending the previous one.
 *
 * Limits (kvt_tcp_limits): connections in total and per peer address, refused with a
 * hello the client reads (-EBUSY); a deadline per hello and per frame (the io
 * timeout, however the bytes trickle) and an idle timeout between frames, both kept
 * by the acceptor, which shuts a late connection down; bytes per frame. A frame's
 * deadline also bounds how long a deregistration waits for a slow reader.
 *
 * Tokens: once required, a hello must carry one the control plane allowed (and has
 * not revoked, nor let expire); revoking one drops the connections that used it. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "engine.h"
#include "sock.h"
#include "cuda_copy.h"
#include "tcp_stage.h"
#include "verbs.h"
#include "wire.h"

#define WATCH_MS 100    /* how often the acceptor checks deadlines */
#define BACKOFF_MS 100  /* pause after accept4 ran out of descriptors or memory */
#define NO_DEADLINE INT64_MAX
#define MAX_TOKENS 65536 /* a session's worth each: bounds the table's memory */

_Static_assert(KVT_TOKEN_LEN == KVT_WIRE_TOKEN_LEN, "one token length");

typedef struct token {
    uint8_t bytes[KVT_TOKEN_LEN];
    int64_t expires; /* monotonic ms, or NO_DEADLINE */
} token;

typedef struct srv_conn {
    struct srv_conn *next;
    struct kvt_tcp_server *srv;
    int fd;
    struct sockaddr_storage peer;
    pthread_t thread;
    _Atomic int finished;
    _Atomic int64_t deadline; /* monotonic ms; the acceptor drops the connection after it */
    _Atomic int idle;         /* the deadline is the idle timeout, not a frame's */
    int dropped;              /* the acceptor shut it down (holds mu) */
    int has_token;            /* the token its hello carried (set under mu) */
    uint8_t token[KVT_TOKEN_LEN];
} srv_conn;

struct kvt_tcp_server {
    int lfd;
    int wake[2];
    pthread_t acceptor;
    kvt_region_table *table;
    kvt_verbs *verbs;
    int io_timeout_ms;
    pthread_mutex_t mu;
    srv_conn *conns;
    int nconns;
    kvt_tcp_limits lim; /* holds mu to change; read without it */
    kvt_tcp_stats st;   /* holds mu */
    int require_tokens; /* the rest hold mu */
    token *tokens;
    size_t ntokens, cap_tokens;
};

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void set_deadline(srv_conn *c, int64_t ms_from_now, int idle)
{
    atomic_store(&c->idle, idle);
    atomic_store(&c->deadline, ms_from_now == NO_DEADLINE ? NO_DEADLINE : now_ms() + ms_from_now);
}

static void count(struct kvt_tcp_server *s, uint64_t *field)
{
    pthread_mutex_lock(&s->mu);
    (*field)++;
    pthread_mutex_unlock(&s->mu);
}

/* Per-connection scratch, sized for the largest frame. */
typedef struct frame {
    kvt_wire_entry ents[KVT_WIRE_MAX_ENTRIES];
    int32_t status[KVT_WIRE_MAX_ENTRIES];
    struct iovec data[KVT_WIRE_MAX_ENTRIES + 1];
    kvt_seg segs[KVT_WIRE_MAX_ENTRIES];
} frame;

/* Whether this process can stage memory of CUDA device dev (its context and the copy
 * kernel), asked before a response's header goes out: a device that cannot be staged
 * fails its entries, with the reason on stderr, instead of the connection being cut
 * mid-response. *memo caches the last device's answer for one frame. */
static int stageable(int dev, int memo[2])
{
    if (memo[0] == dev)
        return memo[1];
    kvt_err why;
    int rc = kvt_copy_prepare(dev, NULL, &why);
    if (rc < 0)
        fprintf(stderr, "kvtransfer tcp server: cannot stage memory of cuda:%d: %s\n", dev, why.msg);
    memo[0] = dev;
    memo[1] = rc;
    return rc;
}

static int serve_frame(srv_conn *c, const kvt_wire_hdr *h, frame *f, kvt_stage **stage, kvt_err *err)
{
    int fd = c->fd;
    int rc = kvt_recv_all(fd, f->ents, h->n * sizeof(kvt_wire_entry), "request entries", err);
    if (rc < 0)
        return rc;
    size_t nd = 0;
    int cuda = 0, memo[2] = {-1, 0};
    int too_big = kvt_wire_check_entries(f->ents, h->n, c->srv->lim.max_frame_bytes);
    if (too_big < 0)
        count(c->srv, &c->srv->st.refused_frames);
    for (uint32_t i = 0; i < h->n; i++) {
        if (too_big < 0) {
            f->status[i] = too_big;
            continue;
        }
        const kvt_wire_entry *e = &f->ents[i];
        kvt_region_view v;
        kvt_err ignored;
        int st = kvt_table_acquire(c->srv->table, e->region, e->key, 1, e->offset, e->length, &v, &ignored);
        if (st == 0 && v.mem_kind != KVT_MEM_HOST && (st = stageable((int)v.device, memo)) < 0)
            kvt_table_release(c->srv->table, e->region);
        f->status[i] = st;
        if (st == 0) {
            f->data[nd].iov_base = (void *)(uintptr_t)v.addr;
            f->data[nd].iov_len = e->length;
            f->segs[nd] = (kvt_seg){v.addr, e->length, (int)v.mem_kind, (int)v.device};
            cuda |= v.mem_kind != KVT_MEM_HOST;
            nd++;
        }
    }
    kvt_wire_hdr rh = {.magic = KVT_RESP_MAGIC, .n = h->n, .seq = h->seq};
    struct iovec head[2] = {{&rh, sizeof rh}, {f->status, h->n * sizeof(int32_t)}};
    rc = kvt_send_iov(fd, head, 2, "response header", err);
    if (rc == 0 && cuda) {
        rc = kvt_stage_send(stage, fd, f->segs, nd, err);
        if (rc < 0) /* the reader sees the connection end; the reason is here */
            fprintf(stderr, "kvtransfer tcp server: dropping a connection while staging device memory: %s\n",
                    err->msg);
    } else if (rc == 0) {
        rc = kvt_send_iov(fd, f->data, nd, "response data", err);
    }
    for (uint32_t i = 0; i < h->n; i++)
        if (f->status[i] == 0)
            kvt_table_release(c->srv->table, f->ents[i].region);
    return rc;
}

/* Sets up this connection's RDMA queue pairs against the client's; they live as long
 * as the connection, so a reader that goes away takes them with it. A refusal is an
 * answer (status < 0), not a reason to drop the connection. */
static int serve_verbs(srv_conn *c, const kvt_wire_hdr *h, kvt_qpset **qs, kvt_err *err)
{
    kvt_wire_verbs theirs, mine = {0};
    int rc = kvt_recv_all(c->fd, &theirs, sizeof theirs, "verbs connect", err);
    if (rc < 0)
        return rc;
    int st = 0;
    kvt_err why;
    if (!c->srv->verbs)
        st = -ENODEV;
    else if (*qs)
        st = -EALREADY;
    else if (h->n != theirs.nqp || h->n < 1 || h->n > KVT_VERBS_MAX_QPS)
        st = -EINVAL;
    else if ((st = kvt_qpset_create(c->srv->verbs, (int)h->n, 0, qs, &why)) == 0 &&
             (st = kvt_qpset_connect(*qs, &theirs, &why)) < 0) {
        kvt_qpset_destroy(*qs);
        *qs = NULL;
    }
    if (st == 0)
        kvt_qpset_local(*qs, &mine);
    mine.status = st;
    kvt_wire_hdr rh = {.magic = KVT_VERBS_MAGIC, .n = h->n, .seq = h->seq};
    struct iovec v[2] = {{&rh, sizeof rh}, {&mine, sizeof mine}};
    return kvt_send_iov(c->fd, v, 2, "verbs connect reply", err);
}

/* Compares in time independent of where they differ: no oracle for guessing. */
static int same_token(const uint8_t *a, const uint8_t *b)
{
    uint8_t d = 0;
    for (int i = 0; i < KVT_TOKEN_LEN; i++)
        d |= a[i] ^ b[i];
    return d == 0;
}

/* The token's index, or -1. Holds mu. */
static long find_token(struct kvt_tcp_server *s, const uint8_t *t)
{
    for (size_t i = 0; i < s->ntokens; i++)
        if (same_token(s->tokens[i].bytes, t))
            return (long)i;
    return -1;
}

/* Drops the token at i and every connection that presented it; returns how many. Holds mu. */
static int remove_token(struct kvt_tcp_server *s, size_t i)
{
    int n = 0;
    for (srv_conn *c = s->conns; c; c = c->next) {
        if (!c->has_token || c->dropped || !same_token(c->token, s->tokens[i].bytes))
            continue;
        c->dropped = 1;
        shutdown(c->fd, SHUT_RDWR);
        n++;
    }
    s->st.dropped_revoked += (uint64_t)n;
    s->tokens[i] = s->tokens[--s->ntokens];
    return n;
}

/* Whether a hello with this token (NULL: none) may go on; remembers it on c. */
static int admit(srv_conn *c, const uint8_t *t)
{
    struct kvt_tcp_server *s = c->srv;
    pthread_mutex_lock(&s->mu);
    long i = t ? find_token(s, t) : -1;
    int ok = !s->require_tokens || (i >= 0 && now_ms() < s->tokens[i].expires);
    if (ok && t) {
        c->has_token = 1;
        memcpy(c->token, t, KVT_TOKEN_LEN);
    }
    s->st.refused_token += !ok;
    pthread_mutex_unlock(&s->mu);
    return ok;
}

static void *conn_main(void *arg)
{
    srv_conn *c = arg;
    kvt_err err;
    kvt_qpset *qs = NULL;
    kvt_stage *stage = NULL; /* made when this connection first serves CUDA memory */
    frame *f = malloc(sizeof *f);
    kvt_wire_hello hi;
    int token_follows = 0;
    if (!f || kvt_sock_setup(c->fd, c->srv->io_timeout_ms, &err) < 0 ||
        kvt_recv_all(c->fd, &hi, sizeof hi, "hello", &err) < 0)
        goto out;
    int st = kvt_wire_check_hello(&hi, &token_follows);
    uint8_t tok[KVT_TOKEN_LEN];
    if (st == 0 && token_follows && kvt_recv_all(c->fd, tok, sizeof tok, "hello token", &err) < 0)
        goto out;
    if (st == 0 && !admit(c, token_follows ? tok : NULL))
        st = -EACCES;
    kvt_wire_hello reply = {.magic = KVT_HELLO_MAGIC, .version = KVT_WIRE_VERSION, .status = st};
    memcpy(reply.engine_id, c->srv->table->shared->engine_id, sizeof reply.engine_id);
    if (kvt_send_all(c->fd, &reply, sizeof reply, "hello", &err) < 0 || st < 0)
        goto out;
    for (;;) {
        /* Between frames the idle timeout holds (none while queue pairs live on this
         * connection: their traffic does not pass here); a frame has the io timeout
         * from its first byte to its last. The acceptor enforces both with shutdown(2),
         * which also wakes this at server stop. */
        set_deadline(c, qs ? NO_DEADLINE : c->srv->lim.idle_timeout_ms, 1);
        struct pollfd pf = {.fd = c->fd, .events = POLLIN};
        if (poll(&pf, 1, -1) < 0 && errno != EINTR)
            break;
        set_deadline(c, c->srv->io_timeout_ms, 0);
        kvt_wire_hdr h;
        if (kvt_recv_all(c->fd, &h, sizeof h, "request header", &err) < 0)
            break;
        int kind = kvt_wire_check_header(&h);
        if (kind == KVT_FRAME_VERBS) {
            if (serve_verbs(c, &h, &qs, &err) < 0)
                break;
            continue;
        }
        if (kind < 0)
            break; /* malformed: drop this connection, keep serving the others */
        if (serve_frame(c, &h, f, &stage, &err) < 0)
            break;
    }
out:
    kvt_qpset_destroy(qs);
    kvt_stage_free(stage);
    free(f);
    /* The peer sees the end now; the fd itself is closed by the reaper, after the
     * join, so its number cannot be reused under a concurrent shutdown(). */
    shutdown(c->fd, SHUT_RDWR);
    atomic_store(&c->finished, 1);
    return NULL;
}

/* Joins connection threads that have ended (all of them when `all`). Holds mu. */
static void reap(struct kvt_tcp_server *s, int all)
{
    srv_conn **pp = &s->conns;
    while (*pp) {
        srv_conn *c = *pp;
        if (all || atomic_load(&c->finished)) {
            if (all)
                shutdown(c->fd, SHUT_RDWR);
            pthread_join(c->thread, NULL);
            close(c->fd);
            *pp = c->next;
            s->nconns--;
            free(c);
        } else {
            pp = &c->next;
        }
    }
}

/* Shuts down connections past their deadline (their threads see the end and finish).
 * Holds mu. */
static void enforce_deadlines(struct kvt_tcp_server *s)
{
    int64_t now = now_ms();
    for (srv_conn *c = s->conns; c; c = c->next) {
        if (c->dropped || atomic_load(&c->finished) || now < atomic_load(&c->deadline))
            continue;
        c->dropped = 1;
        /* read before the shutdown: the woken thread starts a new deadline */
        if (atomic_load(&c->idle))
            s->st.dropped_idle++;
        else
            s->st.dropped_deadline++;
        shutdown(c->fd, SHUT_RDWR);
    }
}

/* Tokens past their expiry go, with their connections. Holds mu. */
static void expire_tokens(struct kvt_tcp_server *s)
{
    int64_t now = now_ms();
    for (size_t i = 0; i < s->ntokens;)
        if (now >= s->tokens[i].expires)
            remove_token(s, i); /* moves the last token to i */
        else
            i++;
}

static int same_address(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
    if (a->ss_family != b->ss_family)
        return 0;
    if (a->ss_family == AF_INET)
        return ((const struct sockaddr_in *)a)->sin_addr.s_addr == ((const struct sockaddr_in *)b)->sin_addr.s_addr;
    if (a->ss_family == AF_INET6)
        return memcmp(&((const struct sockaddr_in6 *)a)->sin6_addr, &((const struct sockaddr_in6 *)b)->sin6_addr,
                      sizeof(struct in6_addr)) == 0;
    return 1;
}

/* 0, or which cap a new connection from `peer` would pass (KVT_REFUSED_*). Holds mu. */
static int over_cap(struct kvt_tcp_server *s, const struct sockaddr_storage *peer)
{
    if (s->nconns >= s->lim.max_conns)
        return KVT_REFUSED_TOTAL;
    int same = 0;
    for (srv_conn *c = s->conns; c; c = c->next)
        same += same_address(&c->peer, peer);
    return same >= s->lim.max_conns_per_peer ? KVT_REFUSED_PEER : 0;
}

/* Answers a connection over a cap with a hello saying so, without a thread: the reply
 * fits any socket buffer. The client's own hello may be unread: drain what came. */
static void refuse(int fd, int why, const uint8_t *engine_id)
{
    kvt_wire_hello r = {.magic = KVT_HELLO_MAGIC, .version = KVT_WIRE_VERSION, .status = -EBUSY,
                        .reserved = (uint32_t)why};
    memcpy(r.engine_id, engine_id, sizeof r.engine_id);
    ssize_t w = send(fd, &r, sizeof r, MSG_DONTWAIT | MSG_NOSIGNAL);
    (void)w;
    shutdown(fd, SHUT_WR);
    char junk[256];
    while (recv(fd, junk, sizeof junk, MSG_DONTWAIT) > 0) {
    }
    close(fd);
}

static void *acceptor_main(void *arg)
{
    struct kvt_tcp_server *s = arg;
    for (;;) {
        struct pollfd pf[2] = {{.fd = s->lfd, .events = POLLIN}, {.fd = s->wake[0], .events = POLLIN}};
        if (poll(pf, 2, WATCH_MS) < 0 && errno != EINTR)
            break;
        if (pf[1].revents)
            break;
        pthread_mutex_lock(&s->mu);
        reap(s, 0);
        enforce_deadlines(s);
        expire_tokens(s);
        pthread_mutex_unlock(&s->mu);
        if (!(pf[0].revents & POLLIN))
            continue;
        struct sockaddr_storage peer;
        socklen_t pl = sizeof peer;
        int fd = accept4(s->lfd, (struct sockaddr *)&peer, &pl, SOCK_CLOEXEC);
        if (fd < 0) {
            /* Out of descriptors or memory: the connection stays queued, and polling
             * again at once would spin. Pause (a server stop still wakes us). */
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                count(s, &s->st.accept_backoffs);
                struct pollfd w = {.fd = s->wake[0], .events = POLLIN};
                if (poll(&w, 1, BACKOFF_MS) > 0)
                    break;
            }
            continue;
        }
        pthread_mutex_lock(&s->mu);
        int why = over_cap(s, &peer);
        srv_conn *c = why ? NULL : calloc(1, sizeof *c);
        if (!c) {
            s->st.refused_busy += why != 0;
            pthread_mutex_unlock(&s->mu);
            refuse(fd, why ? why : KVT_REFUSED_TOTAL, s->table->shared->engine_id);
            continue;
        }
        c->srv = s;
        c->fd = fd;
        c->peer = peer;
        set_deadline(c, s->io_timeout_ms, 0); /* for the hello */
        if (pthread_create(&c->thread, NULL, conn_main, c) != 0) {
            pthread_mutex_unlock(&s->mu);
            close(fd);
            free(c);
            continue;
        }
        c->next = s->conns;
        s->conns = c;
        s->nconns++;
        s->st.accepted++;
        pthread_mutex_unlock(&s->mu);
    }
    return NULL;
}

int kvt_tcp_server_start(kvt_region_table *table, kvt_verbs *verbs, const char *host, int port,
                         int io_timeout_ms, kvt_tcp_server **out, int *bound_port, kvt_err *err)
{
    char ports[16];
    snprintf(ports, sizeof ports, "%d", port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE},
                    *res = NULL;
    int g = getaddrinfo(host, ports, &hints, &res);
    if (g != 0)
        return kvt_error(err, EADDRNOTAVAIL, "getaddrinfo", "%s:%d: %s", host, port, gai_strerror(g));
    int fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    if (fd < 0) {
        freeaddrinfo(res);
        return kvt_syserr(err, errno, "socket", "family=%d", hints.ai_family);
    }
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, res->ai_addr, res->ai_addrlen) < 0 || listen(fd, 128) < 0) {
        int rc = kvt_syserr(err, errno, "bind/listen", "%s:%d", host, port);
        freeaddrinfo(res);
        close(fd);
        return rc;
    }
    freeaddrinfo(res);
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    getsockname(fd, (struct sockaddr *)&ss, &sl);
    *bound_port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                 : ((struct sockaddr_in *)&ss)->sin_port);

    struct kvt_tcp_server *s = calloc(1, sizeof *s);
    if (!s || pipe2(s->wake, O_CLOEXEC) < 0) {
        int rc = kvt_syserr(err, s ? errno : ENOMEM, s ? "pipe2" : "calloc", "tcp server");
        free(s);
        close(fd);
        return rc;
    }
    s->lfd = fd;
    s->table = table;
    s->verbs = verbs;
    s->io_timeout_ms = io_timeout_ms;
    s->lim = (kvt_tcp_limits){.idle_timeout_ms = 60000, .max_conns = 1024, .max_conns_per_peer = 256,
                              .max_frame_bytes = 64u << 20};
    pthread_mutex_init(&s->mu, NULL);
    int e = pthread_create(&s->acceptor, NULL, acceptor_main, s);
    if (e != 0) {
        close(s->wake[0]);
        close(s->wake[1]);
        close(fd);
        free(s);
        return kvt_syserr(err, e, "pthread_create", "tcp acceptor");
    }
    *out = s;
    return 0;
}

void kvt_tcp_server_stop(kvt_tcp_server *s)
{
    if (!s)
        return;
    char b = 1;
    ssize_t w = write(s->wake[1], &b, 1);
    (void)w;
    pthread_join(s->acceptor, NULL);
    pthread_mutex_lock(&s->mu);
    reap(s, 1);
    pthread_mutex_unlock(&s->mu);
    close(s->lfd);
    close(s->wake[0]);
    close(s->wake[1]);
    pthread_mutex_destroy(&s->mu);
    free(s->tokens);
    free(s);
}

int kvt_engine_set_tcp_limits(kvt_engine *e, const kvt_tcp_limits *l, kvt_err *err)
{
    if (l->idle_timeout_ms < 0 || l->max_conns < 0 || l->max_conns_per_peer < 0)
        return kvt_error(err, EINVAL, "tcp limits",
                         "idle_timeout_ms=%d, max_conns=%d, max_conns_per_peer=%d must be >= 0", l->idle_timeout_ms,
                         l->max_conns, l->max_conns_per_peer);
    struct kvt_tcp_server *s = e->server;
    pthread_mutex_lock(&s->mu);
    if (l->idle_timeout_ms)
        s->lim.idle_timeout_ms = l->idle_timeout_ms;
    if (l->max_conns)
        s->lim.max_conns = l->max_conns;
    if (l->max_conns_per_peer)
        s->lim.max_conns_per_peer = l->max_conns_per_peer;
    if (l->max_frame_bytes)
        s->lim.max_frame_bytes = l->max_frame_bytes;
    pthread_mutex_unlock(&s->mu);
    return 0;
}

void kvt_engine_tcp_limits(kvt_engine *e, kvt_tcp_limits *l)
{
    pthread_mutex_lock(&e->server->mu);
    *l = e->server->lim;
    pthread_mutex_unlock(&e->server->mu);
}

void kvt_engine_tcp_stats(kvt_engine *e, kvt_tcp_stats *out)
{
    struct kvt_tcp_server *s = e->server;
    pthread_mutex_lock(&s->mu);
    *out = s->st;
    out->conns = (uint64_t)s->nconns;
    out->threads = 1 + (uint64_t)s->nconns;
    pthread_mutex_unlock(&s->mu);
}

void kvt_engine_require_tokens(kvt_engine *e)
{
    pthread_mutex_lock(&e->server->mu);
    e->server->require_tokens = 1;
    pthread_mutex_unlock(&e->server->mu);
}

int kvt_engine_allow_token(kvt_engine *e, const uint8_t t[KVT_TOKEN_LEN], int64_t ttl_ms, kvt_err *err)
{
    struct kvt_tcp_server *s = e->server;
    int64_t expires = ttl_ms < 0 ? NO_DEADLINE : now_ms() + ttl_ms;
    int rc = 0;
    pthread_mutex_lock(&s->mu);
    long i = find_token(s, t);
    if (i < 0 && s->ntokens == s->cap_tokens) {
        size_t cap = s->cap_tokens ? 2 * s->cap_tokens : 64;
        token *grown = cap <= MAX_TOKENS ? realloc(s->tokens, cap * sizeof *grown) : NULL;
        if (!grown)
            rc = cap <= MAX_TOKENS ? kvt_syserr(err, ENOMEM, "realloc", "%zu tokens", cap)
                                   : kvt_error(err, ENOSPC, "allow_token", "%d tokens allowed already; revoke some",
                                               MAX_TOKENS);
        else {
            s->tokens = grown;
            s->cap_tokens = cap;
        }
    }
    if (rc == 0) {
        if (i < 0) {
            i = (long)s->ntokens++;
            memcpy(s->tokens[i].bytes, t, KVT_TOKEN_LEN);
        }
        s->tokens[i].expires = expires;
    }
    pthread_mutex_unlock(&s->mu);
    return rc;
}

int kvt_engine_revoke_token(kvt_engine *e, const uint8_t t[KVT_TOKEN_LEN])
{
    struct kvt_tcp_server *s = e->server;
    pthread_mutex_lock(&s->mu);
    long i = find_token(s, t);
    int n = i < 0 ? 0 : remove_token(s, (size_t)i);
    pthread_mutex_unlock(&s->mu);
    return n;
}
