/* CUDA through the driver API, loaded at run time: one build of the extension serves
 * machines with and without CUDA. Only what registration needs lives here. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>

#include "kvt.h"

typedef int (*cu_init_fn)(unsigned int);
typedef int (*cu_ptr_attr_fn)(void *, int, unsigned long long);
typedef int (*cu_err_str_fn)(int, const char **);
typedef int (*cu_addr_range_fn)(unsigned long long *, size_t *, unsigned long long);
typedef int (*cu_handle_range_fn)(void *, unsigned long long, size_t, int, unsigned long long);

#define CU_POINTER_ATTRIBUTE_MEMORY_TYPE 2
#define CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL 9
#define CU_MEMORYTYPE_DEVICE 2
#define CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD 1

static struct {
    pthread_once_t once;
    int rc; /* 0 loaded, -errno otherwise */
    char why[400];
    cu_ptr_attr_fn ptr_attr;
    cu_err_str_fn err_str;
    cu_addr_range_fn addr_range;     /* cuMemGetAddressRange_v2 */
    cu_handle_range_fn handle_range; /* cuMemGetHandleForAddressRange (CUDA 11.7+) */
} cu = {.once = PTHREAD_ONCE_INIT};

static void load(void)
{
    void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        cu.rc = -ENODEV;
        snprintf(cu.why, sizeof cu.why, "dlopen(\"libcuda.so.1\"): %s", dlerror());
        return;
    }
    cu_init_fn init = (cu_init_fn)dlsym(h, "cuInit");
    cu.ptr_attr = (cu_ptr_attr_fn)dlsym(h, "cuPointerGetAttribute");
    cu.err_str = (cu_err_str_fn)dlsym(h, "cuGetErrorString");
    cu.addr_range = (cu_addr_range_fn)dlsym(h, "cuMemGetAddressRange_v2");
    cu.handle_range = (cu_handle_range_fn)dlsym(h, "cuMemGetHandleForAddressRange");
    if (!init || !cu.ptr_attr) {
        cu.rc = -ENOSYS;
        snprintf(cu.why, sizeof cu.why, "libcuda.so.1 lacks cuInit/cuPointerGetAttribute");
        return;
    }
    int r = init(0);
    if (r != 0) {
        const char *s = "unknown";
        if (cu.err_str)
            cu.err_str(r, &s);
        cu.rc = -ENODEV;
        snprintf(cu.why, sizeof cu.why, "cuInit(0): CUresult %d, %s", r, s);
        return;
    }
    cu.rc = 0;
}

int kvt_cuda_available(kvt_err *err)
{
    pthread_once(&cu.once, load);
    if (cu.rc < 0)
        return kvt_error(err, -cu.rc, "cuda", "CUDA driver unavailable: %s", cu.why);
    return 0;
}

int kvt_cuda_pointer_device(uint64_t ptr, int *ordinal, kvt_err *err)
{
    int rc = kvt_cuda_available(err);
    if (rc < 0)
        return rc;
    unsigned int mtype = 0;
    int r = cu.ptr_attr(&mtype, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, ptr);
    if (r != 0 || mtype != CU_MEMORYTYPE_DEVICE) {
        const char *s = "not device memory";
        if (r != 0 && cu.err_str)
            cu.err_str(r, &s);
        return kvt_error(err, EINVAL, "cuPointerGetAttribute",
                         "0x%lx is not CUDA device memory (CUresult %d, %s)", (unsigned long)ptr, r, s);
    }
    int dev = -1;
    r = cu.ptr_attr(&dev, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, ptr);
    if (r != 0)
        return kvt_error(err, EIO, "cuPointerGetAttribute", "DEVICE_ORDINAL of 0x%lx: CUresult %d",
                         (unsigned long)ptr, r);
    *ordinal = dev;
    return 0;
}

static const char *cu_str(int r)
{
    const char *s = "unknown";
    if (cu.err_str)
        cu.err_str(r, &s);
    return s;
}

/* A dma-buf of the whole allocation holding [addr, addr+len): exporting the
 * allocation (page-aligned by construction) rather than the range avoids alignment
 * rules, and offset says where addr lies in it. */
int kvt_cuda_dmabuf(uint64_t addr, uint64_t len, int *fd, uint64_t *offset, kvt_err *err)
{
    int rc = kvt_cuda_available(err);
    if (rc < 0)
        return rc;
    if (!cu.addr_range || !cu.handle_range)
        return kvt_error(err, ENOSYS, "cuMemGetHandleForAddressRange", "not in this libcuda (driver too old for dma-buf)");
    unsigned long long base = 0;
    size_t size = 0;
    int r = cu.addr_range(&base, &size, addr);
    if (r != 0)
        return kvt_error(err, EINVAL, "cuMemGetAddressRange", "0x%lx: CUresult %d, %s", (unsigned long)addr, r, cu_str(r));
    if (addr + len > base + size)
        return kvt_error(err, EINVAL, "register", "range 0x%lx+%lu crosses the end of its CUDA allocation",
                         (unsigned long)addr, (unsigned long)len);
    int f = -1;
    r = cu.handle_range(&f, base, size, CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD, 0);
    if (r != 0)
        return kvt_error(err, EOPNOTSUPP, "cuMemGetHandleForAddressRange", "base=0x%llx, size=%zu: CUresult %d, %s",
                         base, size, r, cu_str(r));
    *fd = f;
    *offset = addr - base;
    return 0;
}
