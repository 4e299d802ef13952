/* verbs: memory registration. Whole pools are registered once, at Engine.register. */
#define _GNU_SOURCE
#include <errno.h>
#include <unistd.h>

#include "verbs.h"

#define ACCESS (IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ)

int kvt_verbs_reg(kvt_verbs *v, uint64_t addr, uint64_t len, int mem_kind, void **out, uint32_t *lkey,
                  uint32_t *rkey, const char **path, kvt_err *err)
{
    struct ibv_mr *mr = NULL;
    if (mem_kind == KVT_MEM_CUDA) {
        /* GPUDirect: a dma-buf of the allocation first (upstream kernels, no extra
         * module); nvidia-peermem's plain ibv_reg_mr on a device pointer otherwise. */
        int fd = -1;
        uint64_t off = 0;
        kvt_err why;
        if (kvt_cuda_dmabuf(addr, len, &fd, &off, &why) == 0) {
            mr = ibv_reg_dmabuf_mr(v->pd, off, len, addr, fd, ACCESS);
            int en = errno;
            close(fd);
            if (mr)
                *path = "dmabuf";
            else
                kvt_syserr(&why, en, "ibv_reg_dmabuf_mr", "len=%lu, iova=0x%lx", (unsigned long)len,
                           (unsigned long)addr);
        }
        if (!mr) {
            mr = ibv_reg_mr(v->pd, (void *)(uintptr_t)addr, len, ACCESS);
            if (!mr)
                return kvt_error(err, errno, "ibv_reg_mr",
                                 "CUDA memory 0x%lx, len=%lu: errno %d (no nvidia-peermem?); dma-buf path: %s",
                                 (unsigned long)addr, (unsigned long)len, errno, why.msg);
            *path = "peermem";
        }
    } else {
        mr = ibv_reg_mr(v->pd, (void *)(uintptr_t)addr, len, ACCESS);
        if (!mr)
            return kvt_syserr(err, errno, "ibv_reg_mr", "addr=0x%lx, len=%lu, access=LOCAL_WRITE|REMOTE_READ",
                              (unsigned long)addr, (unsigned long)len);
        *path = "host";
    }
    *out = mr;
    *lkey = mr->lkey;
    *rkey = mr->rkey;
    return 0;
}

void kvt_verbs_dereg(void *mr)
{
    if (mr)
        ibv_dereg_mr(mr);
}
