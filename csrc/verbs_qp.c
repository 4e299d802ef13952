/* verbs: sets of RC queue pairs and their connection (INIT -> RTR -> RTS). The
 * connection data (GID, LID, MTU, QPNs, PSNs) travels over the engine's tcp bootstrap. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "verbs.h"

#define SQ_DEPTH_MAX 1024

int kvt_qpset_create(kvt_verbs *v, int n, int events, kvt_qpset **out, kvt_err *err)
{
    if (n < 1 || n > KVT_VERBS_MAX_QPS)
        return kvt_error(err, EINVAL, "verbs", "%d queue pairs; 1 to %d allowed", n, KVT_VERBS_MAX_QPS);
    kvt_qpset *s = calloc(1, sizeof *s);
    if (!s)
        return kvt_syserr(err, ENOMEM, "calloc", "qpset");
    s->v = v;
    s->n = n;
    s->mtu = v->mtu;
    s->sq_depth = v->dev.max_qp_wr < SQ_DEPTH_MAX ? v->dev.max_qp_wr : SQ_DEPTH_MAX;
    int rc = 0;
    if (events) {
        s->channel = ibv_create_comp_channel(v->ctx);
        if (!s->channel)
            rc = kvt_syserr(err, errno, "ibv_create_comp_channel", "%s", v->name);
        else
            fcntl(s->channel->fd, F_SETFL, fcntl(s->channel->fd, F_GETFL) | O_NONBLOCK);
    }
    int cqe = s->sq_depth * n + 16;
    if (cqe > v->dev.max_cqe)
        cqe = v->dev.max_cqe;
    if (rc == 0 && !(s->cq = ibv_create_cq(v->ctx, cqe, NULL, s->channel, 0)))
        rc = kvt_syserr(err, errno, "ibv_create_cq", "%s, cqe=%d", v->name, cqe);
    for (int i = 0; i < n && rc == 0; i++) {
        struct ibv_qp_init_attr a = {
            .send_cq = s->cq,
            .recv_cq = s->cq,
            .cap = {.max_send_wr = (uint32_t)s->sq_depth, .max_recv_wr = 1, .max_send_sge = 1, .max_recv_sge = 1},
            .qp_type = IBV_QPT_RC,
            .sq_sig_all = 0, /* selective signaling: one completion per chain */
        };
        s->qp[i] = ibv_create_qp(v->pd, &a);
        if (!s->qp[i]) {
            rc = kvt_syserr(err, errno, "ibv_create_qp", "%s, RC, max_send_wr=%d", v->name, s->sq_depth);
            break;
        }
        uint32_t r = 0;
        if (getrandom(&r, sizeof r, 0) != sizeof r)
            r = (uint32_t)i * 7919u;
        s->psn[i] = r & 0xffffff;
        struct ibv_qp_attr init = {
            .qp_state = IBV_QPS_INIT,
            .pkey_index = 0,
            .port_num = (uint8_t)v->port,
            .qp_access_flags = IBV_ACCESS_REMOTE_READ | IBV_ACCESS_LOCAL_WRITE,
        };
        if (ibv_modify_qp(s->qp[i], &init, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS))
            rc = kvt_syserr(err, errno, "ibv_modify_qp", "qpn=%u, RESET->INIT, port=%d", s->qp[i]->qp_num, v->port);
    }
    if (rc < 0) {
        kvt_qpset_destroy(s);
        return rc;
    }
    *out = s;
    return 0;
}

static int clamp_depth(int d) { return d < 1 ? 1 : d > 255 ? 255 : d; }

void kvt_qpset_local(const kvt_qpset *s, kvt_wire_verbs *out)
{
    memset(out, 0, sizeof *out);
    out->rd_depth = (uint32_t)clamp_depth(s->v->dev.max_qp_rd_atom);
    out->lid = s->v->lid;
    out->mtu = (uint8_t)s->mtu;
    out->nqp = (uint8_t)s->n;
    memcpy(out->gid, s->v->gid.raw, 16);
    for (int i = 0; i < s->n; i++) {
        out->qpn[i] = s->qp[i]->qp_num;
        out->psn[i] = s->psn[i];
    }
}

int kvt_qpset_connect(kvt_qpset *s, const kvt_wire_verbs *r, kvt_err *err)
{
    kvt_verbs *v = s->v;
    if (r->nqp != s->n)
        return kvt_error(err, EPROTO, "verbs", "peer has %u queue pairs, we have %d", r->nqp, s->n);
    if (r->mtu < IBV_MTU_256 || r->mtu > IBV_MTU_4096)
        return kvt_error(err, EPROTO, "verbs", "peer advertised path MTU code %u (valid: %d..%d)", r->mtu, IBV_MTU_256,
                         IBV_MTU_4096);
    if (r->mtu < s->mtu)
        s->mtu = (enum ibv_mtu)r->mtu; /* the smaller of both ends */
    /* READs in flight per queue pair: as initiator, our device's max_qp_init_rd_atom,
     * but never more than the peer answers (its responder depth); as responder, our
     * device's max_qp_rd_atom, which kvt_qpset_local advertised. */
    int mine = clamp_depth(v->dev.max_qp_init_rd_atom);
    s->rd_atom = clamp_depth(r->rd_depth < (uint32_t)mine ? (int)r->rd_depth : mine);
    int responder = clamp_depth(v->dev.max_qp_rd_atom);
    for (int i = 0; i < s->n; i++) {
        struct ibv_qp_attr rtr = {
            .qp_state = IBV_QPS_RTR,
            .path_mtu = s->mtu,
            .dest_qp_num = r->qpn[i],
            .rq_psn = r->psn[i],
            .max_dest_rd_atomic = (uint8_t)responder,
            .min_rnr_timer = 12,
            .ah_attr = {.dlid = r->lid, .sl = 0, .src_path_bits = 0, .port_num = (uint8_t)v->port},
        };
        if (v->ethernet || r->lid == 0) {
            rtr.ah_attr.is_global = 1;
            memcpy(rtr.ah_attr.grh.dgid.raw, r->gid, 16);
            rtr.ah_attr.grh.sgid_index = (uint8_t)v->gid_index;
            rtr.ah_attr.grh.hop_limit = 64;
        }
        if (ibv_modify_qp(s->qp[i], &rtr,
                          IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                              IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER))
            return kvt_syserr(err, errno, "ibv_modify_qp",
                              "qpn=%u, INIT->RTR, dest_qpn=%u, mtu=%d, sgid_index=%d, dgid=%02x%02x..%02x%02x",
                              s->qp[i]->qp_num, r->qpn[i], 128 << s->mtu, v->gid_index, r->gid[0], r->gid[1],
                              r->gid[14], r->gid[15]);
        struct ibv_qp_attr rts = {
            .qp_state = IBV_QPS_RTS,
            .timeout = 14, /* 4.096 us * 2^14 = 67 ms per try */
            .retry_cnt = 7,
            .rnr_retry = 7,
            .sq_psn = s->psn[i],
            .max_rd_atomic = (uint8_t)s->rd_atom,
        };
        if (ibv_modify_qp(s->qp[i], &rts,
                          IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN |
                              IBV_QP_MAX_QP_RD_ATOMIC))
            return kvt_syserr(err, errno, "ibv_modify_qp", "qpn=%u, RTR->RTS, max_rd_atomic=%d", s->qp[i]->qp_num,
                              s->rd_atom);
    }
    return 0;
}

void kvt_qpset_destroy(kvt_qpset *s)
{
    if (!s)
        return;
    for (int i = 0; i < s->n; i++)
        if (s->qp[i])
            ibv_destroy_qp(s->qp[i]);
    if (s->cq)
        ibv_destroy_cq(s->cq);
    if (s->channel)
        ibv_destroy_comp_channel(s->channel);
    free(s);
}
