/* Batched GPU copies: the gather kernel (its CUDA C source below, compiled with NVRTC
 * loaded at run time) or cuMemcpyBatchAsync. cuda_copy.h says what and why. */
#define _GNU_SOURCE
#include "cuda_copy.h"

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BATCH_CALL_MAX 8192 /* descriptors per cuMemcpyBatchAsync call */

/* The gather kernel: a CTA copies a descriptor with 16-byte vectors where source and
 * destination agree modulo 16 (U independent loads per thread before their stores),
 * bytes otherwise. Two shapes, each the one measured best where it runs
 * (bench/README.md):
 *   0 "device"  device to device memory (shm, also over peer access): one CTA of 256
 *               threads per descriptor, which reads it from pinned memory itself;
 *               kvt_gather_cols is this shape reading offset columns instead.
 *   1 "staged"  to or from pinned host memory (tcp staging): as many CTAs as fit,
 *               each walking the descriptors and loading the next while it copies.
 * KVTRANSFER_GATHER_VARIANT=0|1 forces one shape on every descriptor list. */
#define N_VARIANTS 2 /* descriptor kernels, which KVTRANSFER_GATHER_VARIANT picks from */
#define VARIANT_DEVICE 0
#define VARIANT_STAGED 1
#define KERNEL_COLS 2 /* the device shape reading read_blocks' offset columns (kvt_copy_launch_cols) */
#define N_KERNELS 3
static const struct {
    const char *name;
    int threads;
    int per_desc; /* one CTA per descriptor; else as many CTAs as fit, each walking the list */
} SHAPE[N_KERNELS] = {{"kvt_gather_device", 256, 1}, {"kvt_gather_staged", 256, 0}, {"kvt_gather_cols", 256, 1}};
static const char KERNEL_SRC[] =
    "struct kvt_copy { unsigned long long src, dst, len; };\n"
    "template <int U, class I>\n"
    "__device__ __forceinline__ void copy_vectors(const uint4 *__restrict__ vs, uint4 *vt, const I nv)\n"
    "{\n"
    "    const I B = blockDim.x;\n"
    "    I j = threadIdx.x;\n"
    "    for (; j + (U - 1) * B < nv; j += U * B) {\n"
    "        uint4 v[U];\n"
    "#pragma unroll\n"
    "        for (int u = 0; u < U; u++) v[u] = __ldg(vs + j + u * B);\n"
    "#pragma unroll\n"
    "        for (int u = 0; u < U; u++) vt[j + u * B] = v[u];\n"
    "    }\n"
    "    for (; j < nv; j += B) vt[j] = __ldg(vs + j);\n"
    "}\n"
    "template <int U, bool narrow = true>\n"
    "__device__ __forceinline__ void copy_one(kvt_copy c)\n"
    "{\n"
    "    const unsigned long long B = blockDim.x, s0 = c.src, t0 = c.dst, len = c.len;\n"
    "    const unsigned char *s = (const unsigned char *)s0;\n"
    "    unsigned char *t = (unsigned char *)t0;\n"
    "    unsigned long long head = len, nv = 0;\n"
    "    if (((s0 ^ t0) & 15) == 0) {\n"
    "        head = (16 - (s0 & 15)) & 15;\n"
    "        if (head > len) head = len;\n"
    "        nv = (len - head) >> 4;\n"
    "    }\n"
    "    for (unsigned long long j = threadIdx.x; j < head; j += B) t[j] = s[j];\n"
    "    const uint4 *vs = (const uint4 *)(s + head);\n"
    "    uint4 *vt = (uint4 *)(t + head);\n"
    "    /* 32-bit indices where they reach (every descriptor the transports cut): fewer\n"
    "       registers, so the U loads of a thread stay in flight together (the staged\n"
    "       shape keeps one loop: its CTAs are as many as registers allow) */\n"
    "    if (narrow && nv < (1ull << 31)) copy_vectors<U, unsigned>(vs, vt, (unsigned)nv);\n"
    "    else copy_vectors<U, unsigned long long>(vs, vt, nv);\n"
    "    for (unsigned long long k = head + (nv << 4) + threadIdx.x; k < len; k += B) t[k] = s[k];\n"
    "}\n"
    "template <int U>\n"
    "__device__ __forceinline__ void gather(const kvt_copy *__restrict__ d, unsigned long long n)\n"
    "{\n"
    "    unsigned long long i = blockIdx.x;\n"
    "    if (i >= n) return;\n"
    "    kvt_copy c = d[i];\n"
    "    for (; i < n; i += gridDim.x) {\n"
    "        const unsigned long long next = i + gridDim.x;\n"
    "        kvt_copy c2 = c;\n"
    "        if (next < n) c2 = d[next];\n"
    "        copy_one<U, false>(c);\n"
    "        c = c2;\n"
    "    }\n"
    "}\n"
    "struct kvt_cols { unsigned long long ro, lo, src, dst, len, n, parts, chunk; };\n"
    "struct kvt_cols_src {\n"
    "    kvt_cols c;\n"
    "    __device__ kvt_copy at(unsigned long long v) const\n"
    "    {\n"
    "        unsigned long long e = v, off = 0;\n"
    "        if (c.parts > 1) { e = v / c.parts; off = (v - e * c.parts) * c.chunk; }\n"
    "        kvt_copy k;\n"
    "        k.src = c.src + ((const unsigned long long *)c.ro)[e] + off;\n"
    "        k.dst = c.dst + ((const unsigned long long *)c.lo)[e] + off;\n"
    "        k.len = c.len - off < c.chunk ? c.len - off : c.chunk;\n"
    "        return k;\n"
    "    }\n"
    "};\n"
    "extern \"C\" __global__ void __launch_bounds__(256, 8)\n"
    "kvt_gather_device(const kvt_copy *__restrict__ d, unsigned long long n)\n"
    "{ if (blockIdx.x < n) copy_one<8>(d[blockIdx.x]); }\n"
    "extern \"C\" __global__ void __launch_bounds__(256)\n"
    "kvt_gather_staged(const kvt_copy *__restrict__ d, unsigned long long n) { gather<8>(d, n); }\n"
    "extern \"C\" __global__ void __launch_bounds__(256, 8)\n"
    "kvt_gather_cols(kvt_cols c)\n"
    "{ kvt_cols_src s = {c}; if (blockIdx.x < c.n * c.parts) copy_one<8>(s.at(blockIdx.x)); }\n";

static int gather_variant(void)
{
    const char *v = getenv("KVTRANSFER_GATHER_VARIANT");
    return v && v[0] >= '0' && v[0] < '0' + N_VARIANTS && !v[1] ? v[0] - '0' : -1;
}

typedef int nvrtcResult;
typedef struct _nvrtcProgram *nvrtcProgram;

static struct {
    pthread_once_t once;
    int ok;
    char why[900];  /* why NVRTC is not there */
    char path[300]; /* where it came from */
    int major, minor;
    const char *(*GetErrorString)(nvrtcResult);
    nvrtcResult (*Version)(int *, int *);
    nvrtcResult (*CreateProgram)(nvrtcProgram *, const char *, const char *, int, const char *const *,
                                 const char *const *);
    nvrtcResult (*DestroyProgram)(nvrtcProgram *);
    nvrtcResult (*CompileProgram)(nvrtcProgram, int, const char *const *);
    nvrtcResult (*GetPTXSize)(nvrtcProgram, size_t *);
    nvrtcResult (*GetPTX)(nvrtcProgram, char *);
    nvrtcResult (*GetCUBINSize)(nvrtcProgram, size_t *);
    nvrtcResult (*GetCUBIN)(nvrtcProgram, char *);
    nvrtcResult (*GetProgramLogSize)(nvrtcProgram, size_t *);
    nvrtcResult (*GetProgramLog)(nvrtcProgram, char *);
} nv = {.once = PTHREAD_ONCE_INIT};

static void *try_open(const char *name, char *tried, size_t cap)
{
    void *h = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (h)
        snprintf(nv.path, sizeof nv.path, "%s", name);
    else {
        size_t used = strlen(tried);
        snprintf(tried + used, cap - used, "%s%s", used ? "; " : "", name);
    }
    return h;
}

static void load_nvrtc(void)
{
    static const char *names[] = {"libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so.11.2", "libnvrtc.so",
                                  "/usr/local/cuda/lib64/libnvrtc.so.13", "/usr/local/cuda/lib64/libnvrtc.so.12",
                                  "/usr/local/cuda/lib64/libnvrtc.so"};
    char tried[600] = "";
    void *h = NULL;
    const char *env = getenv("KVTRANSFER_NVRTC");
    if (env && !strcmp(env, "none")) {
        snprintf(nv.why, sizeof nv.why, "NVRTC disabled (KVTRANSFER_NVRTC=none)");
        return;
    }
    if (env && *env)
        h = try_open(env, tried, sizeof tried);
    for (size_t i = 0; !h && i < sizeof names / sizeof names[0]; i++)
        h = try_open(names[i], tried, sizeof tried);
    if (!h) {
        snprintf(nv.why, sizeof nv.why, "libnvrtc not found (tried %s; set KVTRANSFER_NVRTC to its path)", tried);
        return;
    }
    struct {
        void **slot;
        const char *name;
    } syms[] = {
        {(void **)&nv.GetErrorString, "nvrtcGetErrorString"},
        {(void **)&nv.Version, "nvrtcVersion"},
        {(void **)&nv.CreateProgram, "nvrtcCreateProgram"},
        {(void **)&nv.DestroyProgram, "nvrtcDestroyProgram"},
        {(void **)&nv.CompileProgram, "nvrtcCompileProgram"},
        {(void **)&nv.GetPTXSize, "nvrtcGetPTXSize"},
        {(void **)&nv.GetPTX, "nvrtcGetPTX"},
        {(void **)&nv.GetProgramLogSize, "nvrtcGetProgramLogSize"},
        {(void **)&nv.GetProgramLog, "nvrtcGetProgramLog"},
    };
    for (size_t i = 0; i < sizeof syms / sizeof syms[0]; i++) {
        *syms[i].slot = dlsym(h, syms[i].name);
        if (!*syms[i].slot) {
            snprintf(nv.why, sizeof nv.why, "%s lacks %s", nv.path, syms[i].name);
            return;
        }
    }
    *(void **)&nv.GetCUBINSize = dlsym(h, "nvrtcGetCUBINSize"); /* NVRTC 11.1+ */
    *(void **)&nv.GetCUBIN = dlsym(h, "nvrtcGetCUBIN");
    nv.Version(&nv.major, &nv.minor);
    nv.ok = 1;
}

/* Per device: how it copies, and the kernel when that is how. */
static struct {
    pthread_mutex_t mu;
    struct dev_state {
        _Atomic int ready; /* 1 decided; -errno failed (why holds the message); set last */
        int mode;  /* 1 kernel, 2 batch */
        CUfunction fn[N_KERNELS];
        int grid[N_KERNELS]; /* SMs x resident CTAs per SM, per kernel (the staged shape's grid) */
        int pick;             /* KVTRANSFER_GATHER_VARIANT, else -1 (each copy's own shape) */
        kvt_err why;
    } dev[KVT_CUDA_MAX_DEVICES];
} st = {.mu = PTHREAD_MUTEX_INITIALIZER};

enum { MODE_KERNEL = 1, MODE_BATCH = 2 };

/* Compiles the kernel for the device's architecture (a CUBIN; PTX when this NVRTC
 * cannot target the architecture directly) and loads it into the current context
 * (the device's primary context: kvt_copy_prepare makes it current). */
static int build_kernel(const kvt_cu *c, int dev, struct dev_state *ds, kvt_err *err)
{
    pthread_once(&nv.once, load_nvrtc);
    if (!nv.ok)
        return kvt_error(err, EOPNOTSUPP, "nvrtc", "%s", nv.why);
    CUdevice d;
    int major = 0, minor = 0, sms = 0;
    CUresult r = c->DeviceGet(&d, dev);
    if (r != CUDA_SUCCESS)
        return kvt_cu_fail(err, r, "cuDeviceGet", "device %d", dev);
    r = c->DeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, d);
    if (r == CUDA_SUCCESS)
        r = c->DeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, d);
    if (r == CUDA_SUCCESS)
        r = c->DeviceGetAttribute(&sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, d);
    if (r != CUDA_SUCCESS)
        return kvt_cu_fail(err, r, "cuDeviceGetAttribute", "device %d", dev);
    char *image = NULL;
    char log[400] = "";
    int rc = -EOPNOTSUPP;
    for (int attempt = 0; attempt < 2 && !image; attempt++) {
        int cubin = attempt == 0 && nv.GetCUBINSize && nv.GetCUBIN;
        if (attempt == 0 && !cubin)
            continue;
        char arch[64];
        snprintf(arch, sizeof arch, "--gpu-architecture=%s_%d%d", cubin ? "sm" : "compute", major, minor);
        const char *opts[] = {arch};
        nvrtcProgram prog = NULL;
        nvrtcResult nr = nv.CreateProgram(&prog, KERNEL_SRC, "kvt_gather.cu", 0, NULL, NULL);
        if (nr == 0)
            nr = nv.CompileProgram(prog, 1, opts);
        if (nr != 0) {
            size_t ls = 0;
            if (prog && nv.GetProgramLogSize(prog, &ls) == 0 && ls > 1) {
                char *l = malloc(ls);
                if (l && nv.GetProgramLog(prog, l) == 0)
                    snprintf(log, sizeof log, "%s", l);
                free(l);
            }
            rc = kvt_error(err, EOPNOTSUPP, "nvrtcCompileProgram", "%s (NVRTC %d.%d, %s): %s; %s", arch, nv.major,
                           nv.minor, nv.path, nv.GetErrorString(nr), log);
        } else {
            size_t size = 0;
            nr = cubin ? nv.GetCUBINSize(prog, &size) : nv.GetPTXSize(prog, &size);
            image = nr == 0 ? malloc(size) : NULL;
            if (image && (cubin ? nv.GetCUBIN(prog, image) : nv.GetPTX(prog, image)) != 0) {
                free(image);
                image = NULL;
            }
            if (!image)
                rc = kvt_error(err, EOPNOTSUPP, "nvrtc", "no %s for %s from NVRTC %d.%d", cubin ? "CUBIN" : "PTX",
                               arch, nv.major, nv.minor);
        }
        if (prog)
            nv.DestroyProgram(&prog);
    }
    if (!image)
        return rc;
    CUmodule mod;
    r = c->ModuleLoadData(&mod, image);
    free(image);
    const char *what = "cuModuleLoadData";
    for (int k = 0; k < N_KERNELS && r == CUDA_SUCCESS; k++) {
        what = "cuModuleGetFunction";
        r = c->ModuleGetFunction(&ds->fn[k], mod, SHAPE[k].name);
        int per_sm = 2048 / SHAPE[k].threads; /* without the occupancy call: threads alone */
        if (r == CUDA_SUCCESS && c->OccupancyMaxActiveBlocksPerMultiprocessor &&
            c->OccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, ds->fn[k], SHAPE[k].threads, 0) != CUDA_SUCCESS)
            per_sm = 2048 / SHAPE[k].threads;
        ds->grid[k] = (sms > 0 ? sms : 1) * (per_sm > 0 ? per_sm : 1);
    }
    if (r != CUDA_SUCCESS)
        return kvt_cu_fail(err, r, what, "gather kernel for sm_%d%d from NVRTC %d.%d", major, minor, nv.major,
                           nv.minor);
    ds->pick = gather_variant();
    return 0;
}

int kvt_copy_prepare(int dev, const char **mode, kvt_err *err)
{
    const kvt_cu *c = kvt_cu_get(err);
    if (!c)
        return -ENODEV;
    if (dev < 0 || dev >= KVT_CUDA_MAX_DEVICES)
        return kvt_error(err, EINVAL, "cuda", "device ordinal %d out of range", dev);
    struct dev_state *ds = &st.dev[dev];
    /* every launch asks: once decided, without the lock (which a build on another
       device holds for the few hundred ms NVRTC takes) */
    if (atomic_load_explicit(&ds->ready, memory_order_acquire) > 0) {
        if (mode)
            *mode = ds->mode == MODE_KERNEL ? "kernel" : "batch";
        return 0;
    }
    pthread_mutex_lock(&st.mu);
    if (!ds->ready) {
        const char *want = getenv("KVTRANSFER_CUDA_COPY");
        int force_kernel = want && !strcmp(want, "kernel"), force_batch = want && !strcmp(want, "batch");
        int have_batch = c->MemcpyBatchAsync_v2 || c->MemcpyBatchAsync_v1;
        kvt_err kwhy;
        /* the module belongs to the context current while it loads: the device's primary
           context, whichever one the caller has current (registering memory of cuda:1
           while cuda:0 is current must not load it into cuda:0's) */
        int rc = force_batch ? kvt_error(&kwhy, EOPNOTSUPP, "cuda", "KVTRANSFER_CUDA_COPY=batch")
                             : kvt_cuda_push(dev, &kwhy);
        if (rc == 0) {
            rc = build_kernel(c, dev, ds, &kwhy);
            kvt_cuda_pop();
        }
        if (rc == 0) {
            ds->mode = MODE_KERNEL;
            atomic_store_explicit(&ds->ready, 1, memory_order_release);
        } else if (!force_kernel && have_batch) {
            ds->mode = MODE_BATCH;
            ds->why = kwhy; /* said by kvt_cuda_copy_info: batch mode is far slower */
            atomic_store_explicit(&ds->ready, 1, memory_order_release);
        } else {
            ds->ready = -EOPNOTSUPP;
            kvt_error(&ds->why, EOPNOTSUPP, "cuda copy",
                      "no batched device copy on device %d: gather kernel: %s; cuMemcpyBatchAsync: %s", dev, kwhy.msg,
                      have_batch ? "not chosen (KVTRANSFER_CUDA_COPY=kernel)" : "not in this driver (needs CUDA 12.8+)");
        }
    }
    int ready = ds->ready;
    if (ready < 0 && err)
        *err = ds->why;
    pthread_mutex_unlock(&st.mu);
    if (ready < 0)
        return ready;
    if (mode)
        *mode = ds->mode == MODE_KERNEL ? "kernel" : "batch";
    return 0;
}

static int launch_batch(const kvt_cu *c, int dev, CUstream s, const kvt_copy_desc *h, size_t n, kvt_err *err)
{
    size_t cap = n < BATCH_CALL_MAX ? n : BATCH_CALL_MAX;
    CUdeviceptr *dsts = malloc(cap * sizeof *dsts), *srcs = malloc(cap * sizeof *srcs);
    size_t *sizes = malloc(cap * sizeof *sizes);
    int rc = 0;
    if (!dsts || !srcs || !sizes)
        rc = kvt_syserr(err, ENOMEM, "malloc", "%zu batch entries", cap);
    kvt_cu_memcpy_attrs attr = {.src_access_order = CU_MEMCPY_SRC_ACCESS_ORDER_STREAM,
                                .src_loc_hint = {CU_MEM_LOCATION_TYPE_DEVICE, dev},
                                .dst_loc_hint = {CU_MEM_LOCATION_TYPE_DEVICE, dev}};
    size_t zero = 0;
    for (size_t at = 0; at < n && rc == 0; at += cap) {
        size_t k = n - at < cap ? n - at : cap;
        for (size_t i = 0; i < k; i++) {
            dsts[i] = h[at + i].dst;
            srcs[i] = h[at + i].src;
            sizes[i] = h[at + i].len;
        }
        CUresult r;
        if (c->MemcpyBatchAsync_v2) {
            r = c->MemcpyBatchAsync_v2(dsts, srcs, sizes, k, &attr, &zero, 1, s);
        } else {
            size_t fail = 0;
            r = c->MemcpyBatchAsync_v1(dsts, srcs, sizes, k, &attr, &zero, 1, &fail, s);
        }
        if (r != CUDA_SUCCESS)
            rc = kvt_cu_fail(err, r, "cuMemcpyBatchAsync", "%zu copies on device %d", k, dev);
    }
    free(dsts);
    free(srcs);
    free(sizes);
    return rc;
}

static int launch_with(int dev, CUstream s, const kvt_copy_desc *h, CUdeviceptr d, size_t n, int variant, int forced,
                       kvt_err *err);

int kvt_copy_launch(int dev, CUstream s, const kvt_copy_desc *h, CUdeviceptr d, size_t n, kvt_err *err)
{
    return launch_with(dev, s, h, d, n, VARIANT_DEVICE, 0, err);
}

int kvt_copy_launch_staged(int dev, CUstream s, const kvt_copy_desc *h, CUdeviceptr d, size_t n, kvt_err *err)
{
    return launch_with(dev, s, h, d, n, VARIANT_STAGED, 0, err);
}

/* The grid of kernel k for n descriptors: one CTA each, or as many as fit (0: more
 * descriptors than a grid holds, which no caller's buffer comes near). */
static unsigned int grid_for(const struct dev_state *ds, int k, uint64_t n)
{
    if (SHAPE[k].per_desc)
        return n <= 0x7fffffffu ? (unsigned int)n : 0;
    return n < (uint64_t)ds->grid[k] ? (unsigned int)n : (unsigned int)ds->grid[k];
}

/* variant: 0..N_VARIANTS-1; KVTRANSFER_GATHER_VARIANT overrides it unless forced */
static int launch_with(int dev, CUstream s, const kvt_copy_desc *h, CUdeviceptr d, size_t n, int variant, int forced,
                       kvt_err *err)
{
    if (n == 0)
        return 0;
    int rc = kvt_copy_prepare(dev, NULL, err);
    if (rc < 0)
        return rc;
    const kvt_cu *c = kvt_cu_get(err);
    struct dev_state *ds = &st.dev[dev];
    if (ds->mode == MODE_BATCH)
        return launch_batch(c, dev, s, h, n, err);
    int k = !forced && ds->pick >= 0 ? ds->pick : variant;
    CUdeviceptr descs = d ? d : (CUdeviceptr)(uintptr_t)h;
    unsigned long long count = n;
    void *params[] = {&descs, &count};
    unsigned int grid = grid_for(ds, k, n);
    if (!grid)
        return kvt_error(err, EINVAL, "cuLaunchKernel", "gather of %zu ranges: more than a grid holds", n);
    CUresult r = c->LaunchKernel(ds->fn[k], grid, 1, 1, SHAPE[k].threads, 1, 1, 0, s, params, NULL);
    if (r != CUDA_SUCCESS)
        return kvt_cu_fail(err, r, "cuLaunchKernel", "gather of %zu ranges on device %d, grid %u", n, dev, grid);
    return 0;
}

int kvt_copy_launch_cols(int dev, CUstream s, const kvt_copy_cols *cols, CUdeviceptr dev_offs, kvt_err *err)
{
    if (cols->n == 0)
        return 0;
    int rc = kvt_copy_prepare(dev, NULL, err);
    if (rc < 0)
        return rc;
    struct dev_state *ds = &st.dev[dev];
    if (ds->mode != MODE_KERNEL)
        return -EOPNOTSUPP; /* the caller writes descriptors instead; err untouched */
    const uint64_t parts = kvt_copy_ndesc(cols->len);
    unsigned int grid = grid_for(ds, KERNEL_COLS, cols->n * parts);
    if (!grid)
        return kvt_error(err, EINVAL, "cuLaunchKernel", "gather of %lu blocks: more than a grid holds",
                         (unsigned long)cols->n);
    const kvt_cu *c = kvt_cu_get(err);
    /* blocks of one descriptor: each CTA reads its offsets where the CPU wrote them;
       longer blocks: from device memory (cuda_copy.h says why) */
    CUdeviceptr offs = cols->offs_dev;
    CUresult r;
    if (parts > 1) {
        r = c->MemcpyHtoDAsync(dev_offs, cols->offs, 2 * cols->n * sizeof *cols->offs, s);
        if (r != CUDA_SUCCESS)
            return kvt_cu_fail(err, r, "cuMemcpyHtoDAsync", "%lu offset pairs to device %d", (unsigned long)cols->n,
                               dev);
        offs = dev_offs;
    }
    /* the kernel's kvt_cols: where the offsets are on the device, the caller's fields,
       then how blocks are cut into descriptors */
    struct {
        uint64_t ro, lo, src, dst, len, n, parts, chunk;
    } k = {offs, offs + cols->n * sizeof *cols->offs, cols->src, cols->dst, cols->len, cols->n, parts,
           KVT_COPY_CHUNK};
    void *params[] = {&k};
    r = c->LaunchKernel(ds->fn[KERNEL_COLS], grid, 1, 1, SHAPE[KERNEL_COLS].threads, 1, 1, 0, s, params, NULL);
    if (r != CUDA_SUCCESS)
        return kvt_cu_fail(err, r, "cuLaunchKernel", "gather of %lu blocks of %lu bytes on device %d, grid %u",
                           (unsigned long)cols->n, (unsigned long)cols->len, dev, grid);
    return 0;
}

int kvt_cuda_copy_info(char *buf, size_t cap, kvt_err *err)
{
    const kvt_cu *c = kvt_cu_get(err);
    if (!c)
        return -ENODEV;
    pthread_once(&nv.once, load_nvrtc);
    const char *want = getenv("KVTRANSFER_CUDA_COPY");
    int have_batch = c->MemcpyBatchAsync_v2 || c->MemcpyBatchAsync_v1;
    char kernel[1100], batch[100];
    if (nv.ok)
        snprintf(kernel, sizeof kernel, "gather kernel (%s) via NVRTC %d.%d (%s)",
                 gather_variant() < 0 ? "device and staged shapes" : SHAPE[gather_variant()].name, nv.major, nv.minor,
                 nv.path);
    else
        snprintf(kernel, sizeof kernel, "no gather kernel: %s", nv.why);
    snprintf(batch, sizeof batch, "cuMemcpyBatchAsync %s", have_batch ? "available" : "not in this driver");
    int at = snprintf(buf, cap, "driver %d.%d; %s; %s%s%s", c->driver_version / 1000, c->driver_version % 1000 / 10,
                      kernel, batch, want && *want ? "; KVTRANSFER_CUDA_COPY=" : "", want && *want ? want : "");
    /* devices already set up that copy with cuMemcpyBatchAsync, and why (it is far slower) */
    for (int d = 0; d < KVT_CUDA_MAX_DEVICES && at >= 0 && (size_t)at < cap; d++)
        if (atomic_load_explicit(&st.dev[d].ready, memory_order_acquire) > 0 && st.dev[d].mode == MODE_BATCH)
            at += snprintf(buf + at, cap - (size_t)at, "; cuda:%d copies with cuMemcpyBatchAsync (%s)", d,
                           st.dev[d].why.msg);
    if (!nv.ok && !have_batch)
        return kvt_error(err, EOPNOTSUPP, "cuda copy", "%s", buf);
    return 0;
}

/* For benchmarks and tests: copies n descriptors on device dev and waits; the
 * kernel (or batch) alone, without a transport around it. One scratch stream and
 * descriptor buffer per device, kept. */
int kvt_cuda_gather_sync(int dev, const kvt_copy_desc *h, size_t n, int variant, kvt_err *err)
{
    static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    static struct {
        CUstream s;
        kvt_copy_desc *pinned;
        CUdeviceptr d;
        size_t cap;
    } sc[KVT_CUDA_MAX_DEVICES];
    const kvt_cu *c = kvt_cu_get(err);
    if (!c)
        return -ENODEV;
    if (dev < 0 || dev >= KVT_CUDA_MAX_DEVICES)
        return kvt_error(err, EINVAL, "cuda", "device ordinal %d out of range", dev);
    if (variant >= N_VARIANTS)
        return kvt_error(err, EINVAL, "cuda", "no kernel variant %d (0..%d)", variant, N_VARIANTS - 1);
    pthread_mutex_lock(&mu);
    int rc = kvt_cuda_push(dev, err);
    if (rc < 0) {
        pthread_mutex_unlock(&mu);
        return rc;
    }
    CUresult r = CUDA_SUCCESS;
    if (!sc[dev].s)
        r = c->StreamCreate(&sc[dev].s, CU_STREAM_NON_BLOCKING);
    if (r == CUDA_SUCCESS && sc[dev].cap < n) {
        if (sc[dev].d)
            c->MemFree(sc[dev].d);
        if (sc[dev].pinned)
            c->MemFreeHost(sc[dev].pinned);
        sc[dev].d = 0;
        sc[dev].pinned = NULL;
        sc[dev].cap = 0;
        r = c->MemAlloc(&sc[dev].d, n * sizeof *h);
        if (r == CUDA_SUCCESS)
            r = c->MemHostAlloc((void **)&sc[dev].pinned, n * sizeof *h, CU_MEMHOSTALLOC_PORTABLE);
        if (r == CUDA_SUCCESS)
            sc[dev].cap = n;
    }
    if (r == CUDA_SUCCESS) {
        memcpy(sc[dev].pinned, h, n * sizeof *h);
        r = c->MemcpyHtoDAsync(sc[dev].d, sc[dev].pinned, n * sizeof *h, sc[dev].s);
    }
    if (r != CUDA_SUCCESS)
        rc = kvt_cu_fail(err, r, "cuda gather", "%zu descriptors on device %d", n, dev);
    if (rc == 0)
        rc = launch_with(dev, sc[dev].s, sc[dev].pinned, sc[dev].d, n, variant >= 0 ? variant : VARIANT_DEVICE,
                         variant >= 0, err);
    if (rc == 0 && (r = c->StreamSynchronize(sc[dev].s)) != CUDA_SUCCESS)
        rc = kvt_cu_fail(err, r, "cuStreamSynchronize", "gather on device %d", dev);
    kvt_cuda_pop();
    pthread_mutex_unlock(&mu);
    return rc;
}
