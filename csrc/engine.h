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

struct kvt_engine {
    kvt_engine_opts opts;
    char listen_host[64];
    kvt_engine_info info;
    kvt_region_table table;
    kvt_tcp_server *server;
};

struct kvt_peer {
    kvt_engine *eng;
    int transport;
    kvt_queue queue;
    size_t max_pieces;  /* per job */
    uint64_t max_bytes; /* per job */
    void (*close)(kvt_peer *p);
    void *impl;
};

int kvt_shm_connect(kvt_peer *p, const kvt_engine_info *peer, kvt_err *err);
int kvt_tcp_connect(kvt_peer *p, const kvt_engine_info *peer, kvt_err *err);

int kvt_tcp_server_start(kvt_region_table *table, const char *host, int port, int io_timeout_ms,
                         kvt_tcp_server **out, int *bound_port, kvt_err *err);
void kvt_tcp_server_stop(kvt_tcp_server *s);

#endif
