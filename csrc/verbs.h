/* The verbs transport's internals: an engine's RDMA device (verbs_device.c), memory
 * registrations (verbs_mr.c) and sets of RC queue pairs (verbs_qp.c). The reader's data
 * path is transport_verbs.c; the target side needs no thread of its own: the NIC
 * answers RDMA READs, and tcp_server.c only sets queue pairs up.
 *
 * Built when libibverbs headers are present (KVT_HAVE_VERBS); otherwise
 * verbs_unavailable.c provides the same functions, failing with the reason. */
#ifndef KVT_VERBS_H
#define KVT_VERBS_H

#include <stdint.h>

#include "kvt.h"
#include "wire.h"

typedef struct kvt_verbs kvt_verbs;
typedef struct kvt_qpset kvt_qpset;

#ifdef KVT_HAVE_VERBS
#include <infiniband/verbs.h>

struct kvt_verbs {
    struct ibv_context *ctx;
    struct ibv_pd *pd;
    struct ibv_device_attr dev;
    char name[64];
    int port;
    int gid_index;
    union ibv_gid gid;
    uint16_t lid;
    enum ibv_mtu mtu; /* the port's active MTU */
    int ethernet;     /* RoCE: addresses are GIDs, every packet has a GRH */
};

struct kvt_qpset {
    kvt_verbs *v;
    struct ibv_comp_channel *channel; /* NULL unless created with events */
    struct ibv_cq *cq;
    int n;
    struct ibv_qp *qp[KVT_VERBS_MAX_QPS];
    uint32_t psn[KVT_VERBS_MAX_QPS];
    int sq_depth;  /* send queue slots per queue pair */
    int rd_atom;   /* RDMA READs in flight per queue pair, as negotiated */
    enum ibv_mtu mtu;
};
#endif

/* Opens the device named by KVTRANSFER_IB_DEVICE (else the first with an active
 * port), port KVTRANSFER_IB_PORT (else the first active), GID KVTRANSFER_IB_GID_INDEX
 * (else on Ethernet a RoCEv2 GID, one of an IPv4 address first; on InfiniBand the
 * first), and fills info's verbs fields. */
int kvt_verbs_open(kvt_verbs **out, kvt_engine_info *info, kvt_err *err);
void kvt_verbs_close(kvt_verbs *v);

/* Registers memory for local writes and remote reads. CUDA memory goes through a
 * dma-buf (ibv_reg_dmabuf_mr), else plain ibv_reg_mr (nvidia-peermem); *path says which. */
int kvt_verbs_reg(kvt_verbs *v, uint64_t addr, uint64_t len, int mem_kind, void **mr, uint32_t *lkey,
                  uint32_t *rkey, const char **path, kvt_err *err);
void kvt_verbs_dereg(void *mr);

/* n RC queue pairs on one completion queue (with a completion channel when
 * `events`: the reader sleeps on it). */
int kvt_qpset_create(kvt_verbs *v, int n, int events, kvt_qpset **out, kvt_err *err);
void kvt_qpset_local(const kvt_qpset *s, kvt_wire_verbs *out);
/* Moves every queue pair to RTS against the remote side (same count, same order). */
int kvt_qpset_connect(kvt_qpset *s, const kvt_wire_verbs *remote, kvt_err *err);
void kvt_qpset_destroy(kvt_qpset *s);


#endif
