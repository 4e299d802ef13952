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

#define CU_POINTER_ATTRIBUTE_MEMORY_TYPE 2
#define CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL 9
#define CU_MEMORYTYPE_DEVICE 2

static struct {
    pthread_once_t once;
    int rc; /* 0 loaded, -errno otherwise */
    char why[400];
    cu_ptr_attr_fn ptr_attr;
    cu_err_str_fn err_str;
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
