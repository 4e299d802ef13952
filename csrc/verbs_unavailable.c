/* Built instead of the verbs_*.c files when libibverbs headers were missing at build
 * time: the engine then serves shm and tcp and reports verbs as unavailable. */
#include <errno.h>
#include <stdio.h>

#include "transport_verbs.h"
#include "verbs.h"

#define WHY "kvtransfer was built without libibverbs headers (install libibverbs-dev and rebuild)"

int kvt_verbs_open(kvt_verbs **out, kvt_engine_info *info, kvt_err *err)
{
    return kvt_error(err, ENOSYS, "verbs", WHY);
}
void kvt_verbs_close(kvt_verbs *v) {}
int kvt_verbs_reg(kvt_verbs *v, uint64_t addr, uint64_t len, int mem_kind, void **mr, uint32_t *lkey,
                  uint32_t *rkey, const char **path, kvt_err *err)
{
    return kvt_error(err, ENOSYS, "verbs", WHY);
}
void kvt_verbs_dereg(void *mr) {}
int kvt_qpset_create(kvt_verbs *v, int n, int events, kvt_qpset **out, kvt_err *err)
{
    return kvt_error(err, ENOSYS, "verbs", WHY);
}
void kvt_qpset_local(const kvt_qpset *s, kvt_wire_verbs *out) {}
int kvt_qpset_connect(kvt_qpset *s, const kvt_wire_verbs *remote, kvt_err *err)
{
    return kvt_error(err, ENOSYS, "verbs", WHY);
}
void kvt_qpset_destroy(kvt_qpset *s) {}
int kvt_rdma_devices(kvt_rdma_device *out, int cap, kvt_err *err) { return kvt_error(err, ENOSYS, "verbs", WHY); }

/* The verbs entry of the transport table: it never reaches a peer, and says why. */
static int verbs_reach(const kvt_engine *e, const kvt_engine_info *peer, int forced, kvt_reach *r)
{
    r->code = ENODEV;
    snprintf(r->why, sizeof r->why, "this engine has no verbs: %s", e->info.verbs_why);
    return 0;
}
static int verbs_connect(kvt_peer *p, const kvt_engine_info *peer, kvt_err *err)
{
    return kvt_error(err, ENOSYS, "connect", WHY);
}
static void verbs_close(kvt_peer *p) {}
static int verbs_facts(const kvt_engine *e, kvt_fact *f, size_t *n, char *why, size_t cap)
{
    snprintf(why, cap, "%s", e->info.verbs_why);
    return 0;
}
const kvt_transport_ops kvt_verbs_ops = {
    .name = "verbs",
    .reach = verbs_reach,
    .connect = verbs_connect,
    .submit = kvt_submit_jobs,
    .close = verbs_close,
    .facts = verbs_facts,
};
