/* The CUDA driver API as the core uses it, loaded at run time by cuda.c: one build of
 * the extension serves machines with and without CUDA, and needs no CUDA headers.
 *
 * kvt_cu_get() returns the table of driver entry points once libcuda.so.1 is loaded and
 * cuInit succeeded (NULL with *err saying why otherwise). Optional entry points (newer
 * drivers only) are NULL when missing; every other one is there. Contexts: every
 * thread that touches device memory makes the primary context of the device current
 * first (kvt_cuda_enter; the one torch and cupy use), or pushes it around a few calls
 * (kvt_cuda_push / kvt_cuda_pop) where it must leave the caller's context alone. */
#ifndef KVT_CUDA_H
#define KVT_CUDA_H

#define KVT_CUDA_MAX_DEVICES 64 /* device ordinals the core keeps state for */

#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "kvt.h"

typedef int CUresult;
typedef int CUdevice;
typedef uint64_t CUdeviceptr;
typedef struct CUctx_st *CUcontext;
typedef struct CUstream_st *CUstream;
typedef struct CUevent_st *CUevent;
typedef struct CUmod_st *CUmodule;
typedef struct CUfunc_st *CUfunction;
typedef struct {
    char reserved[KVT_CUDA_IPC_HANDLE_BYTES];
} CUipcMemHandle;

/* cuMemcpyBatchAsync's per-copy attributes (CUDA 12.8+), as cuda.h lays them out. */
typedef struct {
    int type;
    int id;
} kvt_cu_mem_location;
typedef struct {
    int src_access_order;
    kvt_cu_mem_location src_loc_hint;
    kvt_cu_mem_location dst_loc_hint;
    unsigned int flags;
} kvt_cu_memcpy_attrs;

#define CUDA_SUCCESS 0
#define CUDA_ERROR_INVALID_VALUE 1
#define CUDA_ERROR_OUT_OF_MEMORY 2
#define CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED 704
#define CUDA_ERROR_NOT_SUPPORTED 801
#define CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT 16
#define CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR 75
#define CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR 76
#define CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS 1
#define CU_STREAM_NON_BLOCKING 1
#define CU_EVENT_DISABLE_TIMING 2
#define CU_MEMHOSTALLOC_PORTABLE 1
#define CU_MEMHOSTALLOC_DEVICEMAP 2
#define CU_MEMCPY_SRC_ACCESS_ORDER_STREAM 1
#define CU_MEM_LOCATION_TYPE_DEVICE 1

typedef struct kvt_cu {
    int driver_version; /* cuDriverGetVersion: 13000 = CUDA 13.0 */
    CUresult (*GetErrorString)(CUresult, const char **);
    CUresult (*GetErrorName)(CUresult, const char **);
    CUresult (*PointerGetAttribute)(void *, int, CUdeviceptr);
    CUresult (*MemGetAddressRange)(CUdeviceptr *, size_t *, CUdeviceptr);
    CUresult (*DeviceGet)(CUdevice *, int);
    CUresult (*DeviceGetAttribute)(int *, int, CUdevice);
    CUresult (*DeviceGetPCIBusId)(char *, int, CUdevice);
    CUresult (*DeviceGetByPCIBusId)(CUdevice *, const char *);
    CUresult (*DevicePrimaryCtxRetain)(CUcontext *, CUdevice);
    CUresult (*CtxSetCurrent)(CUcontext);
    CUresult (*CtxPushCurrent)(CUcontext);
    CUresult (*CtxPopCurrent)(CUcontext *);
    CUresult (*CtxEnablePeerAccess)(CUcontext, unsigned int);
    CUresult (*IpcGetMemHandle)(CUipcMemHandle *, CUdeviceptr);
    CUresult (*IpcOpenMemHandle)(CUdeviceptr *, CUipcMemHandle, unsigned int);
    CUresult (*IpcCloseMemHandle)(CUdeviceptr);
    CUresult (*StreamCreate)(CUstream *, unsigned int);
    CUresult (*StreamDestroy)(CUstream);
    CUresult (*StreamSynchronize)(CUstream);
    CUresult (*EventCreate)(CUevent *, unsigned int);
    CUresult (*EventRecord)(CUevent, CUstream);
    CUresult (*EventSynchronize)(CUevent);
    CUresult (*EventDestroy)(CUevent);
    CUresult (*MemAlloc)(CUdeviceptr *, size_t);
    CUresult (*MemFree)(CUdeviceptr);
    CUresult (*MemHostAlloc)(void **, size_t, unsigned int);
    CUresult (*MemFreeHost)(void *);
    CUresult (*MemHostGetDevicePointer)(CUdeviceptr *, void *, unsigned int);
    CUresult (*MemcpyHtoDAsync)(CUdeviceptr, const void *, size_t, CUstream);
    CUresult (*MemcpyDtoH)(void *, CUdeviceptr, size_t);
    CUresult (*ModuleLoadData)(CUmodule *, const void *);
    CUresult (*ModuleGetFunction)(CUfunction *, CUmodule, const char *);
    CUresult (*LaunchKernel)(CUfunction, unsigned int, unsigned int, unsigned int, unsigned int, unsigned int,
                             unsigned int, unsigned int, CUstream, void **, void **);
    /* optional */
    CUresult (*EventElapsedTime)(float *, CUevent, CUevent); /* KVTRANSFER_TRACE=1 only */
    CUresult (*MemGetHandleForAddressRange)(void *, CUdeviceptr, size_t, int, unsigned long long);
    CUresult (*OccupancyMaxActiveBlocksPerMultiprocessor)(int *, CUfunction, int, size_t);
    /* cuMemcpyBatchAsync: CUDA 13's _v2 (no failIdx), else 12.8's (failIdx before the stream) */
    CUresult (*MemcpyBatchAsync_v2)(CUdeviceptr *, CUdeviceptr *, size_t *, size_t, kvt_cu_memcpy_attrs *, size_t *,
                                    size_t, CUstream);
    CUresult (*MemcpyBatchAsync_v1)(CUdeviceptr *, CUdeviceptr *, size_t *, size_t, kvt_cu_memcpy_attrs *, size_t *,
                                    size_t, size_t *, CUstream);
} kvt_cu;

/* The loaded driver, or NULL (with *err: ENODEV no driver/device, ENOSYS too old). */
const kvt_cu *kvt_cu_get(kvt_err *err);

/* "CUDA_ERROR_INVALID_VALUE, invalid argument" for messages. */
const char *kvt_cu_str(CUresult r, char *buf, size_t cap);

/* A failed driver call: "op: args: CUresult N, CUDA_ERROR_X, text". errno from the
 * CUresult (ENOMEM, EINVAL, EOPNOTSUPP, else EIO). Returns -errno. */
int kvt_cu_fail(kvt_err *e, CUresult r, const char *op, const char *argsfmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Makes device `dev`'s primary context current in this thread (retained once per
 * process, kept until exit). */
int kvt_cuda_enter(int dev, kvt_err *err);
/* Pushes / pops the primary context of `dev`, leaving the caller's context as it was. */
int kvt_cuda_push(int dev, kvt_err *err);
void kvt_cuda_pop(void);
/* This process's ordinal of the device with PCI bus id `bus` ("0000:18:00.0"). */
int kvt_cuda_device_by_pci(const char *bus, int *dev, kvt_err *err);
/* Lets kernels on `dev` (current) read memory of device `peer` (same process). */
int kvt_cuda_enable_peer(int dev, int peer, kvt_err *err);

#endif
