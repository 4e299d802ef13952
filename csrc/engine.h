/* Internals shared by the engine and its transports: the engine, a peer, and the
 * transport table (struct kvt_transport_ops). engine.c walks the table in preference
 * order; it is the one place a transport is chosen (csrc/README.md). */
#ifndef KVT_ENGINE_H
#define KVT_ENGINE_H

#include "kvt.h"
#include "region.h"
#include "cut.h"
#include "queue.h"
#include "transfer.h"

typedef struct kvt_tcp_server kvt_tcp_server;
typedef struct kvt_verbs kvt_verbs;

struct kvt_engine {
    kvt_engine_opts opts;
    char listen_host[64];
    kvt_engine_info info;
    kvt_region_table table;
    kvt_tcp_server *server;
    kvt_verbs *verbs;              /* NULL without an RDMA device (info.verbs_why says why) */
    pthread_mutex_t reg_lock;      /* register/deregister: table slot and its MR together */
    void *mrs[KVT_MAX_REGIONS];    /* verbs memory registration per table slot */
};

/* One transport. A transport file defines one of these; transports[] in engine.c
 * lists them in preference order. */
typedef struct kvt_transport_ops {
    const char *name;
    /* Can this engine reach peer this way? 1, or 0 with r->code and r->why set; on
       success r->why says how (doctor prints it). forced: the caller named this
       transport (a transport may then reach peers it would not be chosen for). */
    int (*reach)(const kvt_engine *e, const kvt_engine_info *peer, int forced, kvt_reach *r);
    /* Fills p (limits per job, impl) and starts the threads that pop jobs from
       p->queue and complete each with kvt_job_done(). */
    int (*connect)(kvt_peer *p, const kvt_engine_info *peer, kvt_err *err);
    /* Starts a batch of a kind (entries, or paged). kvt_submit_jobs, the usual one,
       cuts it into jobs no larger than the peer's limits and queues them. */
    int (*submit)(kvt_peer *p, const kvt_read_cols *cols, enum kvt_batch_kind kind, kvt_transfer **out,
                  kvt_err *err);
    /* After the queue is closed: joins the threads, frees p->impl. Jobs left in the
       queue that the transport started itself are its own to finish; engine.c cancels
       the rest. */
    void (*close)(kvt_peer *p);
    /* What it offers on this engine: facts and 1, or 0 and why not. */
    int (*facts)(const kvt_engine *e, kvt_fact *f, size_t *n, char *why, size_t cap);
} kvt_transport_ops;

struct kvt_peer {
    kvt_engine *eng;
    const kvt_transport_ops *ops;
    kvt_queue queue;
    size_t max_pieces;  /* per job */
    uint64_t max_bytes; /* per job */
    /* jobs whose destination is CUDA memory: larger, so that one job is one or a few
       kernel launches (0: as for host memory) */
    size_t dev_max_pieces;
    uint64_t dev_max_bytes;
    void *impl;
};

/* The peer's job limits as kvt_transfer_start takes them (paged batches into CUDA
 * memory as other jobs into CUDA memory; a transport's own submit may differ). */
void kvt_peer_limits(const kvt_peer *p, kvt_job_limits lim[3]);
/* The usual submit: kvt_transfer_start with the peer's job limits, into p->queue. */
int kvt_submit_jobs(kvt_peer *p, const kvt_read_cols *cols, enum kvt_batch_kind kind, kvt_transfer **out,
                    kvt_err *err);

/* A tcp connection to engine `id` at host:port, hello exchanged (with `token` unless
 * NULL); returns the fd. */
int kvt_bootstrap_dial(const char *host, int port, const uint8_t id[KVT_ENGINE_ID_LEN], const uint8_t *token,
                       int timeout_ms, kvt_err *err);

/* The target side of tcp reads and of verbs queue-pair setup (verbs may be NULL). */
int kvt_tcp_server_start(kvt_region_table *table, kvt_verbs *verbs, const char *host, int port,
                         int io_timeout_ms, kvt_tcp_server **out, int *bound_port, kvt_err *err);
void kvt_tcp_server_stop(kvt_tcp_server *s);

#endif
