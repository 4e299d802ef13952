/* kvtransfer C core: the public API. No Python in it; pymodule.c binds it and a C
 * program can drive it directly.
 *
 * Model (see DESIGN.md): an engine registers memory regions and serves one-sided
 * reads of them to peers; a peer handle reads batches of (local, remote) ranges into
 * local regions. Every function that can fail returns 0 or a positive result, or
 * -errno with *err filled in. */
#ifndef KVT_H
#define KVT_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

#define KVT_ENGINE_ID_LEN 16
#define KVT_MAX_THREADS 64 /* per peer, for tcp_conns and shm_threads */
#define KVT_VERBS_MAX_QPS 8 /* per verbs peer (the wire's limit too: wire.h) */
#define KVT_CUDA_IPC_HANDLE_BYTES 64
#define KVT_TOKEN_LEN 32 /* a tcp server's access token (kvt_engine_allow_token) */

enum kvt_mem_kind { KVT_MEM_HOST = 0, KVT_MEM_CUDA = 1 };
#define KVT_MAX_TRANSPORTS 8
#define KVT_MAX_FACTS 8

typedef struct kvt_engine kvt_engine;
typedef struct kvt_peer kvt_peer;
typedef struct kvt_transfer kvt_transfer;

typedef struct kvt_engine_opts {
    const char *listen_host; /* where the tcp server binds; NULL = "127.0.0.1" */
    int listen_port;         /* 0 = any free port */
    int io_timeout_ms;       /* no progress on a socket for this long fails the read; 0 = 10 s */
    int tcp_conns;           /* connections (and client threads) per tcp peer; 0 = 4 */
    int shm_threads;         /* process_vm_readv threads per shm peer; 0 = 2 */
    int verbs_qps;           /* RC queue pairs per verbs peer; 0 = 2 */
    int use_verbs;           /* 1: open an RDMA device if there is one; 0: do not */
} kvt_engine_opts;

/* What a peer needs to reach this engine; Python serializes it as EngineDescriptor. */
typedef struct kvt_engine_info {
    uint8_t id[KVT_ENGINE_ID_LEN];
    int32_t pid;
    uint64_t pidns;      /* inode of /proc/self/ns/pid: same boot id + same pidns = pids mean the same */
    char boot_id[40];
    int32_t table_fd;    /* memfd holding the region table (shm readers open /proc/pid/fd/N) */
    uint64_t table_addr; /* where that table is mapped in this process */
    char tcp_host[64];
    int32_t tcp_port;
    /* RDMA: set when the engine opened a device (queue pairs are set up over tcp) */
    int32_t verbs;
    char ib_device[64];
    int32_t ib_port;
    int32_t gid_index;
    uint8_t gid[16];
    char verbs_why[512]; /* why verbs is unavailable, when it is */
    /* kvt_connect: the token this reader presents in its tcp hellos (tcp and verbs) */
    int32_t has_token;
    uint8_t token[KVT_TOKEN_LEN];
} kvt_engine_info;

/* One READ: len bytes at remote region+remote_off land at local region+local_off.
 * remote_key and remote_addr come from the remote region's descriptor: tcp and shm
 * check the whole key at the target; verbs uses remote_addr and the key's low 32
 * bits (the rkey), and the NIC checks them. */
typedef struct kvt_read_req {
    uint64_t local_region;
    uint64_t local_off;
    uint64_t remote_region;
    uint64_t remote_key;
    uint64_t remote_addr; /* base address of the remote region */
    uint64_t remote_off;
    uint64_t len;
} kvt_read_req;

/* The same batch as columns: entry i's field is col.p[i * col.stride] (stride in
 * uint64 units; 0 repeats p[0] for every entry). kvt_read_req arrays are the case
 * stride = 7; numpy columns and broadcast scalars need no packing. */
typedef struct kvt_col {
    const uint64_t *p;
    size_t stride;
} kvt_col;

/* The two shapes a batch comes in, each submitted by its own call:
 * - a list of entries (kvt_read_req[], or kvt_read_cols): any ranges of any regions;
 * - a paged batch (kvt_paged_batch): blocks from one remote region into one local
 *   region, offset columns and one block length (read_blocks). Its jobs are cut
 *   without writing pieces (the transport threads write them, or need none). */
typedef struct kvt_read_cols {
    size_t n;
    kvt_col local_region, local_off, remote_region, remote_key, remote_addr, remote_off, len;
} kvt_read_cols;

typedef struct kvt_paged_batch {
    size_t n;
    uint64_t local_region, remote_region, remote_key, remote_addr;
    kvt_col local_off, remote_off; /* block offsets, bytes */
    kvt_col len;                   /* block lengths: usually one for every block (stride 0) */
} kvt_paged_batch;

/* What registration found out about a CUDA region: the allocation holding it (whole
 * allocations are exported once; cuMemGetAddressRange), its device, and the CUDA IPC
 * handle of the allocation that same-host readers open (ipc_status 0), or why there
 * is none (the CUresult of cuIpcGetMemHandle, e.g. memory from cuMemCreate or a
 * stream-ordered pool). It lives in the region table, where shm readers find it. */
typedef struct kvt_cuda_alloc {
    uint64_t base;
    uint64_t size;
    int32_t device;     /* ordinal in the registering process */
    int32_t ipc_status; /* 0: ipc_handle is valid; else a CUresult */
    char pci_bus_id[32]; /* "0000:18:00.0": names the device across processes */
    uint8_t ipc_handle[KVT_CUDA_IPC_HANDLE_BYTES];
} kvt_cuda_alloc;

int kvt_engine_create(const kvt_engine_opts *opts, kvt_engine **out, kvt_err *err);
void kvt_engine_destroy(kvt_engine *eng); /* close peers first */
void kvt_engine_info_get(const kvt_engine *eng, kvt_engine_info *info);

/* Registers [addr, addr+len) for remote reads; returns a region id and a random key.
 * With an RDMA device, *verbs_path (if not NULL) says how the NIC got the memory:
 * "host" (ibv_reg_mr), "dmabuf" (ibv_reg_dmabuf_mr) or "peermem" (ibv_reg_mr on a
 * CUDA pointer, nvidia-peermem); "" without verbs. */
int kvt_register(kvt_engine *eng, uint64_t addr, uint64_t len, int mem_kind, int device,
                 uint64_t *region_id, uint64_t *key, const char **verbs_path, kvt_err *err);
/* Refuses new reads at once, then waits for reads being served from it to finish. */
int kvt_deregister(kvt_engine *eng, uint64_t region_id, kvt_err *err);
/* The CUDA facts of a registered CUDA region (EINVAL for host memory). */
int kvt_region_cuda(kvt_engine *eng, uint64_t region_id, kvt_cuda_alloc *out, kvt_err *err);

/* Whether one transport can reach a peer: ok, or the errno and words for why not
 * (why holds the reason either way: "same host (boot id ...)"). */
typedef struct kvt_reach {
    const char *name; /* "verbs", "shm", "tcp" */
    int ok;
    int code; /* errno when !ok: ENODEV (no device), EHOSTUNREACH (another host) */
    char why[600];
} kvt_reach;

/* One fact a transport reports about this engine (for `kvtransfer doctor`): a string
 * or an integer value. */
typedef struct kvt_fact {
    const char *key;
    int is_int;
    long long i;
    char s[128];
} kvt_fact;

/* The transports this build knows, in the order connect prefers them. */
size_t kvt_transport_count(void);
const char *kvt_transport_name(size_t i);
/* What transport i offers on this engine: 1 and up to KVT_MAX_FACTS facts, or 0 and
 * why it offers nothing (*why). */
int kvt_transport_facts(const kvt_engine *eng, size_t i, kvt_fact *facts, size_t *n, char *why, size_t cap);
/* The transports connect would try for peer, in order: every one, reachable or not,
 * or (forced != NULL) that one alone. -EINVAL for an unknown name; for a forced one
 * that cannot reach the peer, its errno with why in *err. Returns the count. */
int kvt_plan(const kvt_engine *eng, const kvt_engine_info *peer, const char *forced,
             kvt_reach out[KVT_MAX_TRANSPORTS], kvt_err *err);

/* Connects over the first transport of kvt_plan that reaches peer and connects
 * (forced: that one or an error). tried[0..*ntried) (may be NULL) names the ones
 * that reached but failed to connect, with their errors. */
int kvt_connect(kvt_engine *eng, const kvt_engine_info *peer, const char *forced, kvt_peer **out,
                kvt_reach tried[KVT_MAX_TRANSPORTS], size_t *ntried, kvt_err *err);
void kvt_peer_close(kvt_peer *peer); /* fails its queued reads with ECANCELED */
const char *kvt_peer_transport(const kvt_peer *peer);

/* Starts a batch of reads. Local ranges are checked here (errors name the entry);
 * remote ranges are checked by the target side, and fail the returned transfer. */
int kvt_peer_read(kvt_peer *peer, const kvt_read_req *reqs, size_t n, kvt_transfer **out,
                  kvt_err *err);
int kvt_peer_read_cols(kvt_peer *peer, const kvt_read_cols *cols, kvt_transfer **out, kvt_err *err);
int kvt_peer_read_paged(kvt_peer *peer, const kvt_paged_batch *batch, kvt_transfer **out, kvt_err *err);

/* 0 when finished (succeeded or failed), -ETIMEDOUT if still running at the deadline.
 * timeout_ms < 0 waits without a deadline (callers pass one). */
int kvt_transfer_wait(kvt_transfer *t, int64_t timeout_ms);
/* 1 still running, 0 succeeded, -errno failed (*err and *entry say which entry and why). */
int kvt_transfer_status(kvt_transfer *t, kvt_err *err, int64_t *entry);
/* Writes an 8-byte 1 to fd (an eventfd) when the transfer finishes, or at once if it
 * has; fd < 0 cancels a previous request. */
void kvt_transfer_set_notify_fd(kvt_transfer *t, int fd);
void kvt_transfer_release(kvt_transfer *t);

/* RDMA devices as libibverbs lists them (for `kvtransfer doctor`). */
#define KVT_RDMA_MAX_DEVICES 16
#define KVT_RDMA_MAX_PORTS 4
#define KVT_RDMA_MAX_GIDS 16
typedef struct kvt_rdma_gid {
    int index;
    uint8_t raw[16];
    int rocev2; /* sysfs says RoCE v2 (Ethernet ports) */
} kvt_rdma_gid;
typedef struct kvt_rdma_port {
    int port;
    char state[32];      /* ibv_port_state_str() */
    char link_layer[16]; /* "Ethernet", "InfiniBand", "unknown" */
    int active_mtu;      /* bytes */
    unsigned lid, width_code, speed_code; /* ibv_port_attr's codes, decoded in Python */
    int ngids;
    kvt_rdma_gid gids[KVT_RDMA_MAX_GIDS]; /* the non-zero ones */
} kvt_rdma_port;
typedef struct kvt_rdma_device {
    char name[64];
    char error[128]; /* set when the device cannot be opened; nothing else is then */
    char fw[64];
    int max_qp_wr, max_sge, max_qp_rd_atom;
    unsigned long long max_mr_size;
    int nports;
    kvt_rdma_port ports[KVT_RDMA_MAX_PORTS];
} kvt_rdma_device;
/* Fills up to cap devices; returns how many, or -errno (no RDMA, no libibverbs). */
int kvt_rdma_devices(kvt_rdma_device *out, int cap, kvt_err *err);

/* CUDA through the driver API loaded at run time (cuda.c). */
int kvt_cuda_available(kvt_err *err);
int kvt_cuda_pointer_device(uint64_t ptr, int *ordinal, kvt_err *err);
/* A dma-buf fd for the CUDA allocation holding [addr, addr+len), and addr's offset in
 * it (what ibv_reg_dmabuf_mr takes). The caller closes fd. */
int kvt_cuda_dmabuf(uint64_t addr, uint64_t len, int *fd, uint64_t *offset, kvt_err *err);
/* Fills *out for the allocation holding [addr, addr+len) on device `device`. */
int kvt_cuda_export(uint64_t addr, uint64_t len, int device, kvt_cuda_alloc *out, kvt_err *err);
/* How batched device copies run in this process ("kernel (NVRTC 13.0 ...)",
 * "cuMemcpyBatchAsync", ...): 0 and a description, or -errno and why none can. */
int kvt_cuda_copy_info(char *buf, size_t cap, kvt_err *err);

/* The tcp server's limits (tcp_server.c); a field left 0 keeps its current value.
 * Defaults: idle 60 s, 1024 connections, 256 per peer address, 64 MiB per frame. */
typedef struct kvt_tcp_limits {
    int idle_timeout_ms;     /* a connection with no request for this long is dropped */
    int max_conns;           /* connections (one thread each) in total */
    int max_conns_per_peer;  /* connections from one peer address */
    uint64_t max_frame_bytes; /* bytes one request may ask for (a connection's bytes in flight) */
} kvt_tcp_limits;

typedef struct kvt_tcp_stats {
    uint64_t conns;             /* open now */
    uint64_t threads;           /* server threads now: the acceptor and one per connection */
    uint64_t accepted;          /* connections taken, since start */
    uint64_t refused_busy;      /* refused at the total or per-address cap (-EBUSY) */
    uint64_t refused_token;     /* refused for a missing, unknown or expired token (-EACCES) */
    uint64_t dropped_idle;      /* no request within the idle timeout */
    uint64_t dropped_deadline;  /* a hello or frame not done within the io timeout */
    uint64_t dropped_revoked;   /* their token was revoked or expired */
    uint64_t refused_frames;    /* requests over the bytes-per-frame limit (-EMSGSIZE) */
    uint64_t accept_backoffs;   /* accept4 out of descriptors or memory: paused */
} kvt_tcp_stats;

int kvt_engine_set_tcp_limits(kvt_engine *eng, const kvt_tcp_limits *lim, kvt_err *err);
void kvt_engine_tcp_limits(kvt_engine *eng, kvt_tcp_limits *lim);
void kvt_engine_tcp_stats(kvt_engine *eng, kvt_tcp_stats *out);

/* Tokens (for the control plane, which hands one to each authenticated session).
 * From require_tokens on, the tcp server (and so verbs setup) accepts a connection
 * only if its hello carries an allowed, unexpired token; others get -EACCES. Allowing
 * a token again sets its expiry anew (ttl_ms < 0: none). Revoking (or expiry) also
 * drops the connections that presented it; revoke returns how many. */
void kvt_engine_require_tokens(kvt_engine *eng);
int kvt_engine_allow_token(kvt_engine *eng, const uint8_t token[KVT_TOKEN_LEN], int64_t ttl_ms, kvt_err *err);
int kvt_engine_revoke_token(kvt_engine *eng, const uint8_t token[KVT_TOKEN_LEN]);

/* One device copy: len bytes from src to dst (device or pinned host addresses). */
typedef struct kvt_copy_desc {
    uint64_t src;
    uint64_t dst;
    uint64_t len;
} kvt_copy_desc;
/* Benchmarks and tests: runs n descriptors on device dev (kernel or batch, as copies
 * run here) and waits for them. variant: -1 as device copies run, else a kernel shape
 * (cuda_copy.c: 0 device, 1 staged; ignored in batch mode). */
int kvt_cuda_gather_sync(int dev, const kvt_copy_desc *h, size_t n, int variant, kvt_err *err);

#endif
