/* verbs: device, port and GID discovery, and the protection domain. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "verbs.h"

static int env_int(const char *name, int dflt)
{
    const char *s = getenv(name);
    return s && *s ? atoi(s) : dflt;
}

/* "RoCE v2" from sysfs for this GID index, so the default works on RoCE fabrics. */
static int gid_is_rocev2(const char *dev, int port, int index)
{
    char path[256], buf[32] = {0};
    snprintf(path, sizeof path, "/sys/class/infiniband/%s/ports/%d/gid_attrs/types/%d", dev, port, index);
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    int ok = fgets(buf, sizeof buf, f) && strncmp(buf, "RoCE v2", 7) == 0;
    fclose(f);
    return ok;
}

static int gid_nonzero(const union ibv_gid *g)
{
    for (int i = 0; i < 16; i++)
        if (g->raw[i])
            return 1;
    return 0;
}

static int pick_gid(kvt_verbs *v, const struct ibv_port_attr *pa, kvt_err *err)
{
    int forced = env_int("KVTRANSFER_IB_GID_INDEX", -1);
    if (forced >= 0) {
        if (ibv_query_gid(v->ctx, v->port, forced, &v->gid) != 0 || !gid_nonzero(&v->gid))
            return kvt_error(err, EINVAL, "ibv_query_gid", "%s port %d has no GID at KVTRANSFER_IB_GID_INDEX=%d",
                             v->name, v->port, forced);
        v->gid_index = forced;
        return 0;
    }
    /* On RoCE, prefer a RoCEv2 GID of an IPv4 address (routable, what perftest and
     * NCCL pick), then any RoCEv2 GID (e.g. link-local IPv6), then anything. */
    int fallback = -1, v2 = -1;
    for (int i = 0; i < pa->gid_tbl_len; i++) {
        union ibv_gid g;
        if (ibv_query_gid(v->ctx, v->port, i, &g) != 0 || !gid_nonzero(&g))
            continue;
        static const uint8_t v4_prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
        int rocev2 = v->ethernet && gid_is_rocev2(v->name, v->port, i);
        if (!v->ethernet || (rocev2 && memcmp(g.raw, v4_prefix, 12) == 0)) {
            v->gid_index = i;
            v->gid = g;
            return 0;
        }
        if (rocev2 && v2 < 0)
            v2 = i;
        if (fallback < 0)
            fallback = i;
    }
    if (v2 >= 0)
        fallback = v2;
    if (fallback < 0)
        return kvt_error(err, ENODEV, "ibv_query_gid", "%s port %d has no usable GID (no IP address on its netdev?)",
                         v->name, v->port);
    v->gid_index = fallback;
    return ibv_query_gid(v->ctx, v->port, fallback, &v->gid) == 0 ? 0
               : kvt_syserr(err, errno, "ibv_query_gid", "%s, port %d, index %d", v->name, v->port, fallback);
}

/* Finds the port to use on an open device: forced, or the first active one. */
static int pick_port(kvt_verbs *v, struct ibv_port_attr *pa, kvt_err *err)
{
    int forced = env_int("KVTRANSFER_IB_PORT", 0);
    for (int p = 1; p <= v->dev.phys_port_cnt; p++) {
        if (forced && p != forced)
            continue;
        if (ibv_query_port(v->ctx, (uint8_t)p, pa) != 0)
            return kvt_syserr(err, errno, "ibv_query_port", "%s, port %d", v->name, p);
        if (pa->state == IBV_PORT_ACTIVE) {
            v->port = p;
            return 0;
        }
        if (forced)
            return kvt_error(err, ENETDOWN, "ibv_query_port", "%s port %d is %s, not active", v->name, p,
                             ibv_port_state_str(pa->state));
    }
    return kvt_error(err, ENETDOWN, "ibv_query_port", "%s has no active port%s", v->name,
                     forced ? " matching KVTRANSFER_IB_PORT" : "");
}

static int no_devices(kvt_err *err)
{
    int en = errno ? errno : ENODEV;
    if (en == ENOSYS)
        return kvt_error(err, ENODEV, "ibv_get_device_list", "no RDMA support in this kernel (errno 38 from libibverbs)");
    return kvt_syserr(err, en, "ibv_get_device_list", "%s", "");
}

int kvt_verbs_open(kvt_verbs **out, kvt_engine_info *info, kvt_err *err)
{
    int n = 0;
    struct ibv_device **list = ibv_get_device_list(&n);
    if (!list)
        return no_devices(err);
    const char *want = getenv("KVTRANSFER_IB_DEVICE");
    if (want && !*want)
        want = NULL;
    kvt_verbs *v = calloc(1, sizeof *v);
    int rc = n == 0 ? kvt_error(err, ENODEV, "ibv_get_device_list", "no RDMA devices") : -ENODEV;
    for (int i = 0; i < n && !v->ctx; i++) {
        const char *name = ibv_get_device_name(list[i]);
        if (want && strcmp(name, want) != 0)
            continue;
        snprintf(v->name, sizeof v->name, "%s", name);
        v->ctx = ibv_open_device(list[i]);
        if (!v->ctx) {
            rc = kvt_syserr(err, errno, "ibv_open_device", "%s", name);
            continue;
        }
        struct ibv_port_attr pa;
        if (ibv_query_device(v->ctx, &v->dev) != 0)
            rc = kvt_syserr(err, errno, "ibv_query_device", "%s", name);
        else if ((rc = pick_port(v, &pa, err)) == 0) {
            v->ethernet = pa.link_layer == IBV_LINK_LAYER_ETHERNET;
            v->lid = pa.lid;
            v->mtu = pa.active_mtu;
            rc = pick_gid(v, &pa, err);
        }
        if (rc < 0) {
            ibv_close_device(v->ctx);
            v->ctx = NULL;
        }
    }
    ibv_free_device_list(list);
    if (!v->ctx) {
        if (want && rc == -ENODEV && n > 0)
            rc = kvt_error(err, ENODEV, "ibv_open_device", "no RDMA device named %s (KVTRANSFER_IB_DEVICE)", want);
        free(v);
        return rc;
    }
    v->pd = ibv_alloc_pd(v->ctx);
    if (!v->pd) {
        rc = kvt_syserr(err, errno, "ibv_alloc_pd", "%s", v->name);
        ibv_close_device(v->ctx);
        free(v);
        return rc;
    }
    info->verbs = 1;
    snprintf(info->ib_device, sizeof info->ib_device, "%s", v->name);
    info->ib_port = v->port;
    info->gid_index = v->gid_index;
    memcpy(info->gid, v->gid.raw, 16);
    *out = v;
    return 0;
}

void kvt_verbs_close(kvt_verbs *v)
{
    if (!v)
        return;
    ibv_dealloc_pd(v->pd);
    ibv_close_device(v->ctx);
    free(v);
}

static const char *link_layer_str(uint8_t ll)
{
    return ll == IBV_LINK_LAYER_ETHERNET ? "Ethernet" : ll == IBV_LINK_LAYER_INFINIBAND ? "InfiniBand" : "unknown";
}

int kvt_rdma_devices(kvt_rdma_device *out, int cap, kvt_err *err)
{
    int n = 0;
    struct ibv_device **list = ibv_get_device_list(&n);
    if (!list)
        return no_devices(err);
    int got = 0;
    for (int i = 0; i < n && got < cap; i++) {
        kvt_rdma_device *d = &out[got++];
        memset(d, 0, sizeof *d);
        snprintf(d->name, sizeof d->name, "%s", ibv_get_device_name(list[i]));
        struct ibv_context *ctx = ibv_open_device(list[i]);
        struct ibv_device_attr da;
        if (!ctx || ibv_query_device(ctx, &da) != 0) {
            snprintf(d->error, sizeof d->error, "cannot open: %s", strerror(errno));
            if (ctx)
                ibv_close_device(ctx);
            continue;
        }
        snprintf(d->fw, sizeof d->fw, "%s", da.fw_ver);
        d->max_qp_wr = da.max_qp_wr;
        d->max_sge = da.max_sge;
        d->max_qp_rd_atom = da.max_qp_rd_atom;
        d->max_mr_size = (unsigned long long)da.max_mr_size;
        for (int p = 1; p <= da.phys_port_cnt && d->nports < KVT_RDMA_MAX_PORTS; p++) {
            struct ibv_port_attr pa;
            if (ibv_query_port(ctx, (uint8_t)p, &pa) != 0)
                continue;
            kvt_rdma_port *po = &d->ports[d->nports++];
            po->port = p;
            snprintf(po->state, sizeof po->state, "%s", ibv_port_state_str(pa.state));
            snprintf(po->link_layer, sizeof po->link_layer, "%s", link_layer_str(pa.link_layer));
            po->active_mtu = 128 << pa.active_mtu;
            po->lid = pa.lid;
            po->width_code = pa.active_width;
            po->speed_code = pa.active_speed;
            for (int g = 0; g < pa.gid_tbl_len && po->ngids < KVT_RDMA_MAX_GIDS; g++) {
                union ibv_gid gid;
                if (ibv_query_gid(ctx, (uint8_t)p, g, &gid) != 0 || !gid_nonzero(&gid))
                    continue;
                kvt_rdma_gid *o = &po->gids[po->ngids++];
                o->index = g;
                memcpy(o->raw, gid.raw, 16);
                o->rocev2 = pa.link_layer == IBV_LINK_LAYER_ETHERNET && gid_is_rocev2(d->name, p, g);
            }
        }
        ibv_close_device(ctx);
    }
    ibv_free_device_list(list);
    return got;
}
