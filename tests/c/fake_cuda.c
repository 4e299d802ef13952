/* A stand-in libcuda.so.1 (and libnvrtc, built with -DFAKE_NVRTC) for machines with no
 * GPU: tests/test_gpu_fake.py runs the CUDA paths of the C core against it, so that
 * their plumbing (IPC handles through the region table, the mapping cache, the copy
 * descriptors, the tcp staging pipeline, errors) is tested everywhere; only the real
 * driver and kernel are left for the GPU machine (tests/test_gpu.py).
 *
 * "Device memory" is a memfd mapped twice: the address handed out is PROT_NONE, so
 * host code that touches a device pointer directly crashes, as it would with a real
 * GPU; the fake's copies go through a second, writable mapping. IPC handles carry
 * (pid, fd, size): another process opens /proc/PID/fd/FD. Streams are synchronous;
 * a "kernel launch" performs the gather copy its descriptors describe. One device,
 * ordinal 0. FAKE_CUDA_NO_IPC=1 makes cuIpcGetMemHandle fail (as for memory from
 * cuMemCreate); built with -DFAKE_NO_BATCH, it has no cuMemcpyBatchAsync (as drivers
 * before CUDA 12.8). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifdef FAKE_NVRTC

typedef struct prog {
    int ok;
} prog;
static const char IMAGE[] = "FAKECUBIN kvt_gather";
const char *nvrtcGetErrorString(int r) { return r ? "NVRTC_ERROR_COMPILATION" : "NVRTC_SUCCESS"; }
int nvrtcVersion(int *major, int *minor)
{
    *major = 13;
    *minor = 0;
    return 0;
}
int nvrtcCreateProgram(void **p, const char *src, const char *name, int nh, const char *const *h,
                       const char *const *inc)
{
    prog *g = calloc(1, sizeof *g);
    g->ok = strstr(src, "kvt_gather") != NULL && strstr(src, "__global__") != NULL;
    *p = g;
    return 0;
}
int nvrtcDestroyProgram(void **p)
{
    free(*p);
    *p = NULL;
    return 0;
}
int nvrtcCompileProgram(void *p, int n, const char *const *opts)
{
    return ((prog *)p)->ok && n >= 1 && strncmp(opts[0], "--gpu-architecture=", 19) == 0 ? 0 : 6;
}
int nvrtcGetCUBINSize(void *p, size_t *n)
{
    *n = sizeof IMAGE;
    return 0;
}
int nvrtcGetCUBIN(void *p, char *out)
{
    memcpy(out, IMAGE, sizeof IMAGE);
    return 0;
}
int nvrtcGetPTXSize(void *p, size_t *n) { return nvrtcGetCUBINSize(p, n); }
int nvrtcGetPTX(void *p, char *out) { return nvrtcGetCUBIN(p, out); }
int nvrtcGetProgramLogSize(void *p, size_t *n)
{
    *n = 1;
    return 0;
}
int nvrtcGetProgramLog(void *p, char *log)
{
    log[0] = 0;
    return 0;
}

#else

typedef uint64_t CUdeviceptr;
#define OK 0
#define INVALID_VALUE 1
#define INVALID_CONTEXT 201
#define NOT_FOUND 500
#define NOT_SUPPORTED 801
#define MAX_ALLOCS 4096

typedef struct alloc {
    uint64_t base; /* PROT_NONE: what callers see */
    char *shadow;  /* the same pages, writable: what the fake copies through */
    size_t size;
    int fd;
    int opened; /* through IPC */
} alloc;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static alloc allocs[MAX_ALLOCS];

typedef struct {
    uint32_t magic, pid;
    int32_t fd, pad;
    uint64_t size;
    char rest[40];
} handle;

static alloc *find(uint64_t p)
{
    for (int i = 0; i < MAX_ALLOCS; i++)
        if (allocs[i].base && p >= allocs[i].base && p < allocs[i].base + allocs[i].size)
            return &allocs[i];
    return NULL;
}

/* Where the fake reads or writes len bytes at p: device memory through its shadow,
 * anything else (host memory, pinned or not) as is. */
static char *at(uint64_t p, size_t len)
{
    pthread_mutex_lock(&mu);
    alloc *a = find(p);
    char *r = (char *)(uintptr_t)p;
    if (a) {
        if (p + len > a->base + a->size) {
            fprintf(stderr, "fake_cuda: access 0x%lx+%zu past allocation 0x%lx+%zu\n", (unsigned long)p, len,
                    (unsigned long)a->base, a->size);
            abort();
        }
        r = a->shadow + (p - a->base);
    }
    pthread_mutex_unlock(&mu);
    return r;
}

static int map_fd(int fd, size_t size, int opened, CUdeviceptr *out)
{
    void *base = mmap(NULL, size, PROT_NONE, MAP_SHARED, fd, 0);
    void *shadow = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED || shadow == MAP_FAILED)
        return 2;
    pthread_mutex_lock(&mu);
    for (int i = 0; i < MAX_ALLOCS; i++) {
        if (!allocs[i].base) {
            allocs[i] = (alloc){(uint64_t)(uintptr_t)base, shadow, size, fd, opened};
            pthread_mutex_unlock(&mu);
            *out = (uint64_t)(uintptr_t)base;
            return OK;
        }
    }
    pthread_mutex_unlock(&mu);
    return 2;
}

static int unmap(CUdeviceptr p, int opened)
{
    pthread_mutex_lock(&mu);
    alloc *a = find(p);
    if (!a || a->base != p || a->opened != opened) {
        pthread_mutex_unlock(&mu);
        return INVALID_VALUE;
    }
    munmap((void *)(uintptr_t)a->base, a->size);
    munmap(a->shadow, a->size);
    close(a->fd);
    memset(a, 0, sizeof *a);
    pthread_mutex_unlock(&mu);
    return OK;
}

int cuInit(unsigned f) { return OK; }
int cuDriverGetVersion(int *v)
{
    *v = 13000;
    return OK;
}
int cuGetErrorString(int r, const char **s)
{
    *s = r == OK ? "no error" : r == INVALID_VALUE ? "invalid argument" : r == NOT_SUPPORTED ? "operation not supported"
                                                                                            : "fake error";
    return OK;
}
int cuGetErrorName(int r, const char **s)
{
    *s = r == OK ? "CUDA_SUCCESS" : r == INVALID_VALUE ? "CUDA_ERROR_INVALID_VALUE"
                                   : r == NOT_SUPPORTED ? "CUDA_ERROR_NOT_SUPPORTED"
                                                        : "CUDA_ERROR_FAKE";
    return OK;
}
int cuPointerGetAttribute(void *out, int attr, CUdeviceptr p)
{
    pthread_mutex_lock(&mu);
    alloc *a = find(p);
    pthread_mutex_unlock(&mu);
    if (!a)
        return INVALID_VALUE;
    if (attr == 2)
        *(unsigned *)out = 2; /* device */
    else if (attr == 9)
        *(int *)out = 0;
    else
        return INVALID_VALUE;
    return OK;
}
int cuMemGetAddressRange_v2(CUdeviceptr *base, size_t *size, CUdeviceptr p)
{
    pthread_mutex_lock(&mu);
    alloc *a = find(p);
    if (a) {
        *base = a->base;
        *size = a->size;
    }
    pthread_mutex_unlock(&mu);
    return a ? OK : NOT_FOUND;
}
int cuMemGetHandleForAddressRange(void *h, CUdeviceptr p, size_t n, int t, unsigned long long f)
{
    return NOT_SUPPORTED;
}
int cuDeviceGet(int *d, int ord) { return ord == 0 ? (*d = 0, OK) : INVALID_VALUE; }
int cuDeviceGetCount(int *n)
{
    *n = 1;
    return OK;
}
int cuDeviceGetAttribute(int *v, int attr, int d)
{
    *v = attr == 16 ? 4 : attr == 75 ? 9 : 0;
    return OK;
}
int cuDeviceGetPCIBusId(char *b, int n, int d)
{
    snprintf(b, (size_t)n, "0000:00:1e.0");
    return OK;
}
int cuDeviceGetByPCIBusId(int *d, const char *b) { return strcmp(b, "0000:00:1e.0") ? INVALID_VALUE : (*d = 0, OK); }
static int ctx_token;
int cuDevicePrimaryCtxRetain(void **c, int d)
{
    *c = &ctx_token;
    return d == 0 ? OK : INVALID_VALUE;
}
int cuCtxSetCurrent(void *c) { return OK; }
int cuCtxPushCurrent_v2(void *c) { return OK; }
int cuCtxPopCurrent_v2(void **c)
{
    *c = &ctx_token;
    return OK;
}
int cuCtxEnablePeerAccess(void *c, unsigned f) { return 704; /* already enabled: one device */ }
int cuMemAlloc_v2(CUdeviceptr *p, size_t n)
{
    int fd = memfd_create("fake-cuda", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, (off_t)n) < 0)
        return 2;
    return map_fd(fd, n, 0, p);
}
int cuMemFree_v2(CUdeviceptr p) { return unmap(p, 0); }
int cuIpcGetMemHandle(handle *h, CUdeviceptr p)
{
    if (getenv("FAKE_CUDA_NO_IPC"))
        return NOT_SUPPORTED;
    pthread_mutex_lock(&mu);
    alloc *a = find(p);
    int ok = a && a->base == p && !a->opened;
    if (ok)
        *h = (handle){.magic = 0x4b464b45, .pid = (uint32_t)getpid(), .fd = a->fd, .size = a->size};
    pthread_mutex_unlock(&mu);
    return ok ? OK : INVALID_VALUE;
}
int cuIpcOpenMemHandle_v2(CUdeviceptr *p, handle h, unsigned flags)
{
    if (h.magic != 0x4b464b45)
        return INVALID_VALUE;
    if (h.pid == (uint32_t)getpid())
        return INVALID_CONTEXT; /* as the real driver: not in the exporting process */
    char path[64];
    snprintf(path, sizeof path, "/proc/%u/fd/%d", h.pid, h.fd);
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return INVALID_VALUE;
    return map_fd(fd, h.size, 1, p);
}
int cuIpcCloseMemHandle(CUdeviceptr p) { return unmap(p, 1); }
int cuStreamCreate(void **s, unsigned f)
{
    *s = malloc(8);
    return OK;
}
int cuStreamDestroy_v2(void *s)
{
    free(s);
    return OK;
}
int cuStreamSynchronize(void *s) { return OK; }
int cuEventCreate(void **e, unsigned f)
{
    *e = malloc(8);
    return OK;
}
int cuEventRecord(void *e, void *s) { return OK; }
/* FAKE_CUDA_SYNC_US: a wait for an event first sleeps this long (copies that take
 * time: the slots they hold stay in use meanwhile) */
int cuEventSynchronize(void *e)
{
    const char *v = getenv("FAKE_CUDA_SYNC_US");
    if (v && *v)
        usleep((useconds_t)atol(v));
    return OK;
}
int cuEventDestroy_v2(void *e)
{
    free(e);
    return OK;
}
/* pinned buffers, remembered so that launches can check where their offsets are */
#define MAX_PINNED 256
static struct {
    char *base;
    size_t size;
} pinned[MAX_PINNED];
int cuMemHostAlloc(void **p, size_t n, unsigned f)
{
    if (posix_memalign(p, 4096, n))
        return 2;
    pthread_mutex_lock(&mu);
    for (int i = 0; i < MAX_PINNED; i++)
        if (!pinned[i].base) {
            pinned[i].base = *p;
            pinned[i].size = n;
            break;
        }
    pthread_mutex_unlock(&mu);
    return OK;
}
int cuMemFreeHost(void *p)
{
    pthread_mutex_lock(&mu);
    for (int i = 0; i < MAX_PINNED; i++)
        if (pinned[i].base == p)
            pinned[i].base = NULL;
    pthread_mutex_unlock(&mu);
    free(p);
    return OK;
}
static int is_pinned(uint64_t p)
{
    int found = 0;
    pthread_mutex_lock(&mu);
    for (int i = 0; i < MAX_PINNED && !found; i++)
        found = pinned[i].base && p >= (uint64_t)(uintptr_t)pinned[i].base &&
                p < (uint64_t)(uintptr_t)pinned[i].base + pinned[i].size;
    pthread_mutex_unlock(&mu);
    return found;
}
int cuMemHostGetDevicePointer_v2(CUdeviceptr *d, void *p, unsigned f)
{
    *d = (uint64_t)(uintptr_t)p;
    return OK;
}
int cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void *s, size_t n, void *st)
{
    memcpy(at(d, n), s, n);
    return OK;
}
int cuMemcpyDtoHAsync_v2(void *d, CUdeviceptr s, size_t n, void *st)
{
    memcpy(d, at(s, n), n);
    return OK;
}
int cuMemcpyHtoD_v2(CUdeviceptr d, const void *s, size_t n) { return cuMemcpyHtoDAsync_v2(d, s, n, NULL); }
int cuMemcpyDtoH_v2(void *d, CUdeviceptr s, size_t n) { return cuMemcpyDtoHAsync_v2(d, s, n, NULL); }
int cuModuleLoadData(void **m, const void *image)
{
    /* the fake NVRTC's image, or a real CUBIN (an ELF file) from a real NVRTC */
    if (strncmp(image, "FAKECUBIN", 9) && memcmp(image, "\177ELF", 4))
        return INVALID_VALUE;
    *m = &ctx_token;
    return OK;
}
static char fn_device, fn_staged, fn_cols; /* the kernels: descriptor lists, or read_blocks' columns */
int cuModuleGetFunction(void **f, void *m, const char *name)
{
    if (strncmp(name, "kvt_gather", 10))
        return NOT_FOUND;
    *f = !strcmp(name, "kvt_gather_cols") ? &fn_cols : !strcmp(name, "kvt_gather_staged") ? &fn_staged : &fn_device;
    return OK;
}

typedef struct {
    uint64_t src, dst, len;
} desc;

static unsigned long launches, descs_copied, cols_launches;
/* the threads that made column launches since the last fake_cuda_cols_threads (the
 * first of them first) */
#define MAX_TIDS 16
static unsigned long cols_tids[MAX_TIDS];
static int cols_ntids;

static int is_device(CUdeviceptr p)
{
    pthread_mutex_lock(&mu);
    int device = find(p) != NULL;
    pthread_mutex_unlock(&mu);
    return device;
}

/* kvt_gather_cols: n blocks of len bytes, block i from src + ro[i] to dst + lo[i];
 * one CTA of 256 threads per chunk of a block; the offsets in pinned memory for blocks
 * of one chunk, else in device memory (the real kernel's CTAs would wait on each other
 * reading them from pinned memory) */
static int launch_cols(unsigned gx, unsigned bx, const uint64_t *c)
{
    const uint64_t ro = c[0], lo = c[1], src = c[2], dst = c[3], len = c[4], n = c[5], parts = c[6], chunk = c[7];
    int (*where)(uint64_t) = parts == 1 ? is_pinned : is_device;
    if (gx != n * parts || bx != 256 || parts != (len + chunk - 1) / chunk || !where(ro) || !where(lo))
        return INVALID_VALUE;
    const uint64_t *r = (const uint64_t *)at(ro, n * 8), *l = (const uint64_t *)at(lo, n * 8);
    for (uint64_t i = 0; i < n; i++)
        memmove(at(dst + l[i], len), at(src + r[i], len), len);
    __atomic_add_fetch(&launches, 1, __ATOMIC_RELAXED);
    const unsigned long tid = (unsigned long)syscall(SYS_gettid);
    pthread_mutex_lock(&mu);
    int seen = 0;
    for (int i = 0; i < cols_ntids && !seen; i++)
        seen = cols_tids[i] == tid;
    if (!seen && cols_ntids < MAX_TIDS)
        cols_tids[cols_ntids++] = tid;
    pthread_mutex_unlock(&mu);
    __atomic_add_fetch(&cols_launches, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&descs_copied, n * parts, __ATOMIC_RELAXED);
    return OK;
}

/* cuda_copy.c's two shapes of 256 threads: one CTA per descriptor (device memory),
 * or CTAs walking the list (staging), never more CTAs than descriptors */
int cuLaunchKernel(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   unsigned shm, void *st, void **params, void **extra)
{
    if (f == &fn_cols)
        return launch_cols(gx, bx, (const uint64_t *)params[0]);
    CUdeviceptr d = *(CUdeviceptr *)params[0];
    unsigned long long n = *(unsigned long long *)params[1];
    if (gx == 0 || gx > n || (f == &fn_device && gx != n) || bx != 256)
        return INVALID_VALUE;
    const desc *ds = (const desc *)at(d, n * sizeof(desc));
    for (unsigned long long i = 0; i < n; i++)
        memmove(at(ds[i].dst, ds[i].len), at(ds[i].src, ds[i].len), ds[i].len);
    __atomic_add_fetch(&launches, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&descs_copied, n, __ATOMIC_RELAXED);
    return OK;
}

#ifndef FAKE_NO_BATCH
static int batch(CUdeviceptr *dsts, CUdeviceptr *srcs, size_t *sizes, size_t count)
{
    for (size_t i = 0; i < count; i++)
        memmove(at(dsts[i], sizes[i]), at(srcs[i], sizes[i]), sizes[i]);
    __atomic_add_fetch(&launches, 1, __ATOMIC_RELAXED);
    return OK;
}
int cuMemcpyBatchAsync_v2(CUdeviceptr *dsts, CUdeviceptr *srcs, size_t *sizes, size_t count, void *attrs,
                          size_t *idx, size_t nattrs, void *st)
{
    return batch(dsts, srcs, sizes, count);
}
#endif

/* For tests: how many launches (kernel or batch calls) and descriptors this process ran. */
unsigned long fake_cuda_launches(void) { return launches; }
unsigned long fake_cuda_descs(void) { return descs_copied; }
unsigned long fake_cuda_cols_launches(void) { return cols_launches; }
/* The threads that made column launches since the last call, the first one first, into
 * out (room for MAX_TIDS); their number. */
int fake_cuda_cols_threads(unsigned long *out)
{
    pthread_mutex_lock(&mu);
    int n = cols_ntids;
    memcpy(out, cols_tids, (size_t)n * sizeof *out);
    cols_ntids = 0;
    pthread_mutex_unlock(&mu);
    return n;
}

#endif
