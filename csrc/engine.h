/* Internals shared by the engine and its transports.
 *
 * The transport contract: a transport's connect() fills in a kvt_peer (its limits per
 * job, its close(), its private state) and starts threads that pop jobs from
 * peer->queue and complete each with kvt_job_done(). Everything else (checking local
 * ranges, cutting batches into jobs, completion, errors) is common and lives in
 * engine.c and transfer.c. The transport is chosen in one place: kvt_connect(). */
#ifndef KVT_ENGINE_H
#define KVT_ENGINE_H

#include "kvt.h"
#include "region.h"
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

struct kvt_peer {
    kvt_engine *eng;
    int transport;
    kvt_queue queue;
    size_t max_pieces;  /* per job */
    uint64_t max_bytes; /* per job */
    /* jobs whose destination is CUDA memory: larger, so that one job is one or a few
       kernel launches (0: as for host memory) */
    size_t dev_max_pieces;
    uint64_t dev_max_bytes;
    /* read_blocks batches (one region to one region, cut lazily) into CUDA memory,
       where the transport writes them cheaply (0: as other jobs into CUDA memory) */
    size_t dev_lazy_max_pieces;
    uint64_t dev_lazy_max_bytes;
    void (*close)(kvt_peer *p);
    void *impl;
};

int kvt_shm_connect(kvt_peer *p, const kvt_engine_info *peer, kvt_err *err);
int kvt_tcp_connect(kvt_peer *p, const kvt_engine_info *peer, kvt_err *err);
int kvt_verbs_connect(kvt_peer *p, const kvt_engine_info *peer, kvt_err *err);

/* A tcp connection to engine `id` at host:port, hello exchanged (with `token` unless
 * NULL); returns the fd. */
int kvt_bootstrap_dial(const char *host, int port, const uint8_t id[KVT_ENGINE_ID_LEN], const uint8_t *token,
                       int timeout_ms, kvt_err *err);

/* The target side of tcp reads and of verbs queue-pair setup (verbs may be NULL). */
int kvt_tcp_server_start(kvt_region_table *table, kvt_verbs *verbs, const char *host, int port,
                         int io_timeout_ms, kvt_tcp_server **out, int *bound_port, kvt_err *err);
void kvt_tcp_server_stop(kvt_tcp_server *s);

#endif
