/* CUDA through the driver API, loaded at run time: one build of the extension serves
 * machines with and without CUDA (cuda.h says how the rest of the core uses it).
 * Here: the loader, errors, primary contexts, and what registration needs (the
 * device of a pointer, the allocation holding it, its IPC handle, its dma-buf). */
#define _GNU_SOURCE
#include "cuda.h"

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "kvt.h"

#define CU_POINTER_ATTRIBUTE_MEMORY_TYPE 2
#define CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL 9
#define CU_MEMORYTYPE_DEVICE 2
#define CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD 1

typedef CUresult (*cu_init_fn)(unsigned int);
typedef CUresult (*cu_version_fn)(int *);

static struct {
    pthread_once_t once;
    int rc; /* 0 loaded, -errno otherwise */
    char why[400];
    kvt_cu api;
    pthread_mutex_t ctx_mu;
    CUcontext primary[KVT_CUDA_MAX_DEVICES];
} cu = {.once = PTHREAD_ONCE_INIT, .ctx_mu = PTHREAD_MUTEX_INITIALIZER};

/* Entry points every CUDA path needs: a driver without one of them is too old
 * (they are all in CUDA 11.x). The versioned names are what cuda.h's macros pick. */
#define REQUIRED(field, name) {(void **)&cu.api.field, name}
static const struct {
    void **slot;
    const char *name;
} required[] = {
    REQUIRED(GetErrorString, "cuGetErrorString"),
    REQUIRED(GetErrorName, "cuGetErrorName"),
    REQUIRED(PointerGetAttribute, "cuPointerGetAttribute"),
    REQUIRED(MemGetAddressRange, "cuMemGetAddressRange_v2"),
    REQUIRED(DeviceGet, "cuDeviceGet"),
    REQUIRED(DeviceGetAttribute, "cuDeviceGetAttribute"),
    REQUIRED(DeviceGetPCIBusId, "cuDeviceGetPCIBusId"),
    REQUIRED(DeviceGetByPCIBusId, "cuDeviceGetByPCIBusId"),
    REQUIRED(DevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain"),
    REQUIRED(CtxSetCurrent, "cuCtxSetCurrent"),
    REQUIRED(CtxPushCurrent, "cuCtxPushCurrent_v2"),
    REQUIRED(CtxPopCurrent, "cuCtxPopCurrent_v2"),
    REQUIRED(CtxEnablePeerAccess, "cuCtxEnablePeerAccess"),
    REQUIRED(IpcGetMemHandle, "cuIpcGetMemHandle"),
    REQUIRED(IpcOpenMemHandle, "cuIpcOpenMemHandle_v2"),
    REQUIRED(IpcCloseMemHandle, "cuIpcCloseMemHandle"),
    REQUIRED(StreamCreate, "cuStreamCreate"),
    REQUIRED(StreamDestroy, "cuStreamDestroy_v2"),
    REQUIRED(StreamSynchronize, "cuStreamSynchronize"),
    REQUIRED(EventCreate, "cuEventCreate"),
    REQUIRED(EventRecord, "cuEventRecord"),
    REQUIRED(EventSynchronize, "cuEventSynchronize"),
    REQUIRED(EventDestroy, "cuEventDestroy_v2"),
    REQUIRED(MemAlloc, "cuMemAlloc_v2"),
    REQUIRED(MemFree, "cuMemFree_v2"),
    REQUIRED(MemHostAlloc, "cuMemHostAlloc"),
    REQUIRED(MemFreeHost, "cuMemFreeHost"),
    REQUIRED(MemHostGetDevicePointer, "cuMemHostGetDevicePointer_v2"),
    REQUIRED(MemcpyHtoDAsync, "cuMemcpyHtoDAsync_v2"),
    REQUIRED(MemcpyDtoH, "cuMemcpyDtoH_v2"),
    REQUIRED(ModuleLoadData, "cuModuleLoadData"),
    REQUIRED(ModuleGetFunction, "cuModuleGetFunction"),
    REQUIRED(LaunchKernel, "cuLaunchKernel"),
};

static void load(void)
{
    void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        cu.rc = -ENODEV;
        snprintf(cu.why, sizeof cu.why, "dlopen(\"libcuda.so.1\"): %s", dlerror());
        return;
    }
    cu_init_fn init = (cu_init_fn)dlsym(h, "cuInit");
    cu_version_fn version = (cu_version_fn)dlsym(h, "cuDriverGetVersion");
    if (!init) {
        cu.rc = -ENOSYS;
        snprintf(cu.why, sizeof cu.why, "libcuda.so.1 lacks cuInit");
        return;
    }
    for (size_t i = 0; i < sizeof required / sizeof required[0]; i++) {
        *required[i].slot = dlsym(h, required[i].name);
        if (!*required[i].slot) {
            cu.rc = -ENOSYS;
            snprintf(cu.why, sizeof cu.why, "libcuda.so.1 lacks %s (driver older than CUDA 11?)", required[i].name);
            return;
        }
    }
    *(void **)&cu.api.MemGetHandleForAddressRange = dlsym(h, "cuMemGetHandleForAddressRange");
    *(void **)&cu.api.EventElapsedTime = dlsym(h, "cuEventElapsedTime");
    *(void **)&cu.api.OccupancyMaxActiveBlocksPerMultiprocessor = dlsym(h, "cuOccupancyMaxActiveBlocksPerMultiprocessor");
    *(void **)&cu.api.MemcpyBatchAsync_v2 = dlsym(h, "cuMemcpyBatchAsync_v2");
    if (!cu.api.MemcpyBatchAsync_v2)
        *(void **)&cu.api.MemcpyBatchAsync_v1 = dlsym(h, "cuMemcpyBatchAsync");
    CUresult r = init(0);
    if (r != CUDA_SUCCESS) {
        char b[160];
        cu.rc = -ENODEV;
        snprintf(cu.why, sizeof cu.why, "cuInit(0): CUresult %d, %s", r, kvt_cu_str(r, b, sizeof b));
        return;
    }
    if (version)
        version(&cu.api.driver_version);
    cu.rc = 0;
}

const kvt_cu *kvt_cu_get(kvt_err *err)
{
    pthread_once(&cu.once, load);
    if (cu.rc < 0) {
        kvt_error(err, -cu.rc, "cuda", "CUDA driver unavailable: %s", cu.why);
        return NULL;
    }
    return &cu.api;
}

const char *kvt_cu_str(CUresult r, char *buf, size_t cap)
{
    const char *name = NULL, *text = NULL;
    if (cu.api.GetErrorName)
        cu.api.GetErrorName(r, &name);
    if (cu.api.GetErrorString)
        cu.api.GetErrorString(r, &text);
    snprintf(buf, cap, "%s, %s", name ? name : "CUDA_ERROR_UNKNOWN", text ? text : "unknown error");
    return buf;
}

static int cu_errno(CUresult r)
{
    switch (r) {
    case CUDA_ERROR_OUT_OF_MEMORY: return ENOMEM;
    case CUDA_ERROR_INVALID_VALUE: return EINVAL;
    case CUDA_ERROR_NOT_SUPPORTED: return EOPNOTSUPP;
    default: return EIO;
    }
}

int kvt_cu_fail(kvt_err *e, CUresult r, const char *op, const char *argsfmt, ...)
{
    int en = cu_errno(r);
    if (!e)
        return -en;
    char args[200], b[200];
    va_list ap;
    va_start(ap, argsfmt);
    vsnprintf(args, sizeof args, argsfmt, ap);
    va_end(ap);
    kvt_error(e, en, op, "%s: CUresult %d, %s", args, r, kvt_cu_str(r, b, sizeof b));
    return -en;
}

int kvt_cuda_available(kvt_err *err) { return kvt_cu_get(err) ? 0 : -ENODEV; }

static int primary(int dev, CUcontext *ctx, kvt_err *err)
{
    const kvt_cu *c = kvt_cu_get(err);
    if (!c)
        return -ENODEV;
    if (dev < 0 || dev >= KVT_CUDA_MAX_DEVICES)
        return kvt_error(err, EINVAL, "cuda", "device ordinal %d out of range", dev);
    pthread_mutex_lock(&cu.ctx_mu);
    CUresult r = CUDA_SUCCESS;
    const char *what = "cuDeviceGet";
    if (!cu.primary[dev]) {
        CUdevice d;
        r = c->DeviceGet(&d, dev);
        if (r == CUDA_SUCCESS) {
            what = "cuDevicePrimaryCtxRetain";
            r = c->DevicePrimaryCtxRetain(&cu.primary[dev], d);
        }
    }
    *ctx = cu.primary[dev];
    pthread_mutex_unlock(&cu.ctx_mu);
    if (r != CUDA_SUCCESS)
        return kvt_cu_fail(err, r, what, "device %d", dev);
    return 0;
}

int kvt_cuda_enter(int dev, kvt_err *err)
{
    CUcontext ctx;
    int rc = primary(dev, &ctx, err);
    if (rc < 0)
        return rc;
    CUresult r = cu.api.CtxSetCurrent(ctx);
    return r == CUDA_SUCCESS ? 0 : kvt_cu_fail(err, r, "cuCtxSetCurrent", "primary context of device %d", dev);
}

int kvt_cuda_push(int dev, kvt_err *err)
{
    CUcontext ctx;
    int rc = primary(dev, &ctx, err);
    if (rc < 0)
        return rc;
    CUresult r = cu.api.CtxPushCurrent(ctx);
    return r == CUDA_SUCCESS ? 0 : kvt_cu_fail(err, r, "cuCtxPushCurrent", "primary context of device %d", dev);
}

void kvt_cuda_pop(void)
{
    CUcontext ignored;
    cu.api.CtxPopCurrent(&ignored);
}

int kvt_cuda_device_by_pci(const char *bus, int *dev, kvt_err *err)
{
    const kvt_cu *c = kvt_cu_get(err);
    if (!c)
        return -ENODEV;
    CUdevice d = -1;
    CUresult r = c->DeviceGetByPCIBusId(&d, bus);
    if (r != CUDA_SUCCESS)
        return kvt_cu_fail(err, r, "cuDeviceGetByPCIBusId", "\"%s\" (is that GPU visible to this process?)", bus);
    *dev = d;
    return 0;
}

int kvt_cuda_enable_peer(int dev, int peer, kvt_err *err)
{
    if (dev == peer)
        return 0;
    CUcontext pctx;
    int rc = primary(peer, &pctx, err);
    if (rc < 0)
        return rc;
    CUresult r = cu.api.CtxEnablePeerAccess(pctx, 0);
    if (r != CUDA_SUCCESS && r != CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED)
        return kvt_cu_fail(err, r, "cuCtxEnablePeerAccess", "device %d reading device %d", dev, peer);
    return 0;
}

int kvt_cuda_pointer_device(uint64_t ptr, int *ordinal, kvt_err *err)
{
    const kvt_cu *c = kvt_cu_get(err);
    if (!c)
        return -ENODEV;
    unsigned int mtype = 0;
    CUresult r = c->PointerGetAttribute(&mtype, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, ptr);
    if (r != CUDA_SUCCESS || mtype != CU_MEMORYTYPE_DEVICE) {
        char b[200];
        return kvt_error(err, EINVAL, "cuPointerGetAttribute", "0x%lx is not CUDA device memory (CUresult %d, %s)",
                         (unsigned long)ptr, r, r ? kvt_cu_str(r, b, sizeof b) : "not device memory");
    }
    int dev = -1;
    r = c->PointerGetAttribute(&dev, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, ptr);
    if (r != CUDA_SUCCESS)
        return kvt_cu_fail(err, r, "cuPointerGetAttribute", "DEVICE_ORDINAL of 0x%lx", (unsigned long)ptr);
    *ordinal = dev;
    return 0;
}

/* The allocation holding [addr, addr+len); the range must not cross its end. */
static int alloc_range(const kvt_cu *c, uint64_t addr, uint64_t len, CUdeviceptr *base, size_t *size, kvt_err *err)
{
    CUresult r = c->MemGetAddressRange(base, size, addr);
    if (r != CUDA_SUCCESS)
        return kvt_cu_fail(err, r, "cuMemGetAddressRange", "0x%lx", (unsigned long)addr);
    if (addr + len > *base + *size)
        return kvt_error(err, EINVAL, "register",
                         "range 0x%lx+%lu crosses the end of its CUDA allocation (0x%lx+%lu): register within one "
                         "allocation",
                         (unsigned long)addr, (unsigned long)len, (unsigned long)*base, (unsigned long)*size);
    return 0;
}

int kvt_cuda_export(uint64_t addr, uint64_t len, int device, kvt_cuda_alloc *out, kvt_err *err)
{
    const kvt_cu *c = kvt_cu_get(err);
    if (!c)
        return -ENODEV;
    int rc = kvt_cuda_push(device, err);
    if (rc < 0)
        return rc;
    memset(out, 0, sizeof *out);
    out->device = device;
    CUdeviceptr base = 0;
    size_t size = 0;
    rc = alloc_range(c, addr, len, &base, &size, err);
    if (rc == 0) {
        out->base = base;
        out->size = size;
        CUdevice d;
        CUresult r = c->DeviceGet(&d, device);
        const char *what = "cuDeviceGet";
        if (r == CUDA_SUCCESS) {
            what = "cuDeviceGetPCIBusId";
            r = c->DeviceGetPCIBusId(out->pci_bus_id, (int)sizeof out->pci_bus_id, d);
        }
        if (r != CUDA_SUCCESS)
            rc = kvt_cu_fail(err, r, what, "device %d", device);
    }
    if (rc == 0) {
        /* Not every allocation has a legacy IPC handle (cuMemCreate, pools): then
         * same-host readers are told why, and tcp (or verbs) still serves it. */
        CUipcMemHandle h;
        CUresult r = c->IpcGetMemHandle(&h, base);
        out->ipc_status = r;
        if (r == CUDA_SUCCESS)
            memcpy(out->ipc_handle, h.reserved, sizeof out->ipc_handle);
    }
    kvt_cuda_pop();
    return rc;
}

/* A dma-buf of the whole allocation holding [addr, addr+len): exporting the
 * allocation (page-aligned by construction) rather than the range avoids alignment
 * rules, and offset says where addr lies in it. */
int kvt_cuda_dmabuf(uint64_t addr, uint64_t len, int *fd, uint64_t *offset, kvt_err *err)
{
    const kvt_cu *c = kvt_cu_get(err);
    if (!c)
        return -ENODEV;
    if (!c->MemGetHandleForAddressRange)
        return kvt_error(err, ENOSYS, "cuMemGetHandleForAddressRange", "not in this libcuda (driver too old for dma-buf)");
    CUdeviceptr base = 0;
    size_t size = 0;
    int rc = alloc_range(c, addr, len, &base, &size, err);
    if (rc < 0)
        return rc;
    int f = -1;
    CUresult r = c->MemGetHandleForAddressRange(&f, base, size, CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD, 0);
    if (r != CUDA_SUCCESS) {
        char b[200];
        return kvt_error(err, EOPNOTSUPP, "cuMemGetHandleForAddressRange", "base=0x%llx, size=%zu: CUresult %d, %s",
                         (unsigned long long)base, size, r, kvt_cu_str(r, b, sizeof b));
    }
    *fd = f;
    *offset = addr - base;
    return 0;
}
