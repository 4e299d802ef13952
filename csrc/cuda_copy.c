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

/* The gather kernel: a CTA copies one descriptor at a time (grid-stride over them),
 * with 16-byte vectors when source and destination agree modulo 16: a byte head up to
 * the first aligned address, U independent 16-byte loads per thread before their
 * stores, a byte tail; otherwise bytes (correct, slow, rare). Sources are read through
 * the read-only path (they are not written during a copy). Two shapes, each best where
 * it is used:
 *   0 "device"  device memory to device memory (shm, also over peer access): 1,024
 *               threads, U = 2, one CTA per SM: 32 KiB in flight per SM. A CTA takes
 *               descriptors a group at a time (group_size: ~128 KiB of copying) from a
 *               counter in device memory, and loads the next group's descriptors into
 *               shared memory while it copies this one (shm's descriptors sit in pinned
 *               host memory, a PCIe round trip away). Taking groups as it gets to them,
 *               not a fixed share: a batch's kernels run side by side on several
 *               streams, one CTA per SM, so a kernel's CTAs start as the previous
 *               kernel's leave, up to ~90 us apart on an H200; with fixed shares the
 *               late ones finished alone (GPU time of 16,384 x 32 KiB in three jobs
 *               ~295 us against ~277 for one kernel). Measured (H200, shm/d2d copy_,
 *               32 KiB / 256 KiB / 512 MiB contiguous): fixed shares 0.83/0.91/0.92x;
 *               counter, 64 KiB groups 0.79/0.90/0.92x, 128 KiB 0.85-0.91/0.87-0.90/
 *               0.92-0.93x, 256 KiB 0.87/0.90/0.91x (but reads from another GPU 0.84x
 *               against 0.90-0.91x at 128 KiB). kvt_gather_cols is this shape reading
 *               read_blocks' offset columns instead of descriptors.
 *   1 "staged"  to or from pinned host memory (tcp staging, over PCIe): 256 threads,
 *               U = 8, as many CTAs as fit: more bytes in flight for PCIe's latency;
 *               the next descriptor is loaded while one is copied
 * Why shape 0 (bench/gather_sweep.py, 136 shapes, one H200, 16,384 scattered 32 KiB
 * blocks, 512 MiB, against copy_ of the same bytes at 2,054 GB/s): the more bytes a
 * thread or an SM has in flight, the worse: 256 threads x U = 8 x 6 CTAs per SM (the
 * previous default) 0.90x, 512 x 2 x 3 0.94x, 1,024 x 4 x 1 0.93x, 1,024 x 2 x 1
 * 0.977x; cache hints (.nc no-allocate, .cs, .cg, L2 256-byte prefetch) 0.85-0.92x;
 * torch index_select 0.90x. From another GPU every shape reads at 0.95-0.96x of
 * torch's peer copy_. KVTRANSFER_GATHER_VARIANT=0|1 forces one shape on every
 * descriptor list (read_blocks jobs over shm, which carry no descriptors, always run
 * kvt_gather_cols). */
#define N_VARIANTS 2 /* descriptor kernels, which KVTRANSFER_GATHER_VARIANT picks from */
#define VARIANT_DEVICE 0
#define VARIANT_STAGED 1
#define KERNEL_COLS 2 /* the device shape reading read_blocks' offset columns (kvt_copy_launch_cols) */
#define N_KERNELS 3
static const struct {
    const char *name;
    int threads;
    int max_per_sm; /* CTAs per SM at most (0: as many as fit) */
} SHAPE[N_KERNELS] = {{"kvt_gather_device", 1024, 1}, {"kvt_gather_staged", 256, 0}, {"kvt_gather_cols", 1024, 1}};
static const char KERNEL_SRC[] =
    "struct kvt_copy { unsigned long long src, dst, len; };\n"
    "template <int U>\n"
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
    "    unsigned long long j = threadIdx.x;\n"
    "    for (; j + (U - 1) * B < nv; j += U * B) {\n"
    "        uint4 v[U];\n"
    "#pragma unroll\n"
    "        for (int u = 0; u < U; u++) v[u] = __ldg(vs + j + u * B);\n"
    "#pragma unroll\n"
    "        for (int u = 0; u < U; u++) vt[j + u * B] = v[u];\n"
    "    }\n"
    "    for (; j < nv; j += B) vt[j] = __ldg(vs + j);\n"
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
    "        copy_one<U>(c);\n"
    "        c = c2;\n"
    "    }\n"
    "}\n"
    "struct kvt_list { const kvt_copy *d; __device__ kvt_copy at(unsigned long long i) const { return d[i]; } };\n"
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
    "#define QN 32\n"
    "/* the next group of g descriptors for this CTA: handed out by the counter (whoever\n"
    "   asks first gets it), or blockIdx.x, + gridDim.x, ... without one */\n"
    "__device__ __forceinline__ unsigned long long take(unsigned int *ctr, unsigned long long &mine)\n"
    "{\n"
    "    if (ctr) return atomicAdd(ctr, 1u);\n"
    "    const unsigned long long t = mine;\n"
    "    mine += gridDim.x;\n"
    "    return t;\n"
    "}\n"
    "template <int U, class S>\n"
    "__device__ __forceinline__ void gather_groups(const S src, unsigned long long n, unsigned int *ctr, unsigned int g)\n"
    "{\n"
    "    __shared__ kvt_copy q[2][QN];\n"
    "    __shared__ unsigned long long at[2];\n"
    "    unsigned long long mine = blockIdx.x;\n"
    "    if (threadIdx.x == 0) { at[0] = take(ctr, mine) * g; at[1] = take(ctr, mine) * g; }\n"
    "    __syncthreads();\n"
    "    if (threadIdx.x < g && at[0] + threadIdx.x < n) q[0][threadIdx.x] = src.at(at[0] + threadIdx.x);\n"
    "    __syncthreads();\n"
    "    for (int cur = 0; at[cur] < n; cur ^= 1) {\n"
    "        const unsigned long long b = at[cur], nb = at[cur ^ 1];\n"
    "        const bool load = threadIdx.x < g && nb + threadIdx.x < n;\n"
    "        kvt_copy c2;\n"
    "        if (load) c2 = src.at(nb + threadIdx.x);\n"
    "        unsigned long long after = 0;\n"
    "        if (threadIdx.x == 0) after = take(ctr, mine) * g;\n"
    "        for (unsigned int k = 0; k < g && b + k < n; k++) copy_one<U>(q[cur][k]);\n"
    "        __syncthreads();\n"
    "        if (load) q[cur ^ 1][threadIdx.x] = c2;\n"
    "        if (threadIdx.x == 0) at[cur] = after;\n"
    "        __syncthreads();\n"
    "    }\n"
    "    /* the last CTA out resets the counter for the next launch on its stream: every\n"
    "       CTA took its last group before counting itself out (a kernel that faults\n"
    "       leaves it set, but its context is lost then, and every later call fails) */\n"
    "    if (ctr && threadIdx.x == 0 && atomicAdd(ctr + 1, 1u) == gridDim.x - 1) { ctr[0] = 0; ctr[1] = 0; }\n"
    "}\n"
    "extern \"C\" __global__ void __launch_bounds__(1024, 1)\n"
    "kvt_gather_device(const kvt_copy *__restrict__ d, unsigned long long n, unsigned int *ctr, unsigned int g)\n"
    "{ kvt_list l = {d}; gather_groups<2>(l, n, ctr, g); }\n"
    "extern \"C\" __global__ void __launch_bounds__(256)\n"
    "kvt_gather_staged(const kvt_copy *__restrict__ d, unsigned long long n) { gather<8>(d, n); }\n"
    "extern \"C\" __global__ void __launch_bounds__(1024, 1)\n"
    "kvt_gather_cols(kvt_cols c, unsigned int *ctr, unsigned int g) { kvt_cols_src s = {c}; gather_groups<2>(s, c.n * c.parts, ctr, g); }\n";

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
        int grid[N_KERNELS]; /* SMs x resident CTAs per SM, per kernel */
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
        if (SHAPE[k].max_per_sm && per_sm > SHAPE[k].max_per_sm)
            per_sm = SHAPE[k].max_per_sm;
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

static int launch_with(int dev, CUstream s, const kvt_copy_desc *h, CUdeviceptr d, size_t n, uint64_t bytes,
                       CUdeviceptr ctr, int variant, int forced, kvt_err *err);

int kvt_copy_launch(int dev, CUstream s, const kvt_copy_desc *h, CUdeviceptr d, size_t n, uint64_t bytes,
                    CUdeviceptr ctr, kvt_err *err)
{
    return launch_with(dev, s, h, d, n, bytes, ctr, VARIANT_DEVICE, 0, err);
}

int kvt_copy_launch_staged(int dev, CUstream s, const kvt_copy_desc *h, CUdeviceptr d, size_t n, kvt_err *err)
{
    return launch_with(dev, s, h, d, n, 0, 0, VARIANT_STAGED, 0, err);
}

/* Descriptors a CTA of the device shape takes at a time: about 128 KiB of copying
 * (2 to 32 of them; measured against 64 and 256, above), long enough that the next
 * group's number (an atomic) and descriptors (a PCIe read when they sit in pinned
 * memory) arrive while it copies, short enough that the CTAs' last groups end close
 * together. */
static unsigned int group_size(uint64_t bytes, uint64_t ndesc)
{
    uint64_t avg = ndesc && bytes ? bytes / ndesc : 0;
    uint64_t g = avg ? (128u << 10) / avg : 4;
    return g < 2 ? 2 : g > 32 ? 32 : (unsigned int)g;
}

/* variant: 0..N_VARIANTS-1; KVTRANSFER_GATHER_VARIANT overrides it unless forced */
static int launch_with(int dev, CUstream s, const kvt_copy_desc *h, CUdeviceptr d, size_t n, uint64_t bytes,
                       CUdeviceptr ctr, int variant, int forced, kvt_err *err)
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
    unsigned int g = group_size(bytes, n);
    void *params[] = {&descs, &count, &ctr, &g}; /* the staged kernel takes the first two */
    unsigned int grid = n < (size_t)ds->grid[k] ? (unsigned int)n : (unsigned int)ds->grid[k];
    CUresult r = c->LaunchKernel(ds->fn[k], grid, 1, 1, SHAPE[k].threads, 1, 1, 0, s, params, NULL);
    if (r != CUDA_SUCCESS)
        return kvt_cu_fail(err, r, "cuLaunchKernel", "gather of %zu ranges on device %d, grid %u", n, dev, grid);
    return 0;
}

int kvt_copy_launch_cols(int dev, CUstream s, const kvt_copy_cols *cols, CUdeviceptr ctr, kvt_err *err)
{
    if (cols->n == 0)
        return 0;
    int rc = kvt_copy_prepare(dev, NULL, err);
    if (rc < 0)
        return rc;
    struct dev_state *ds = &st.dev[dev];
    if (ds->mode != MODE_KERNEL)
        return -EOPNOTSUPP; /* the caller writes descriptors instead; err untouched */
    /* the kernel's kvt_cols: the caller's fields, then how blocks are cut into descriptors */
    struct {
        kvt_copy_cols c;
        uint64_t parts, chunk;
    } k = {*cols, kvt_copy_ndesc(cols->len), KVT_COPY_CHUNK};
    const uint64_t total = cols->n * k.parts;
    unsigned int g = group_size(cols->n * cols->len, total);
    void *params[] = {&k, &ctr, &g};
    unsigned int grid = total < (uint64_t)ds->grid[KERNEL_COLS] ? (unsigned int)total : (unsigned int)ds->grid[KERNEL_COLS];
    CUresult r = kvt_cu_get(err)->LaunchKernel(ds->fn[KERNEL_COLS], grid, 1, 1, SHAPE[KERNEL_COLS].threads, 1, 1, 0,
                                               s, params, NULL);
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

int kvt_copy_counter(CUstream s, CUdeviceptr *ctr, kvt_err *err)
{
    const kvt_cu *c = kvt_cu_get(err);
    static const uint32_t zero[2];
    CUresult r = c->MemAlloc(ctr, sizeof zero);
    if (r != CUDA_SUCCESS) {
        *ctr = 0;
        return kvt_cu_fail(err, r, "cuMemAlloc", "%zu-byte copy counter", sizeof zero);
    }
    const char *what = "cuMemcpyHtoDAsync";
    r = c->MemcpyHtoDAsync(*ctr, zero, sizeof zero, s);
    if (r == CUDA_SUCCESS) {
        what = "cuStreamSynchronize";
        r = c->StreamSynchronize(s);
    }
    if (r != CUDA_SUCCESS) {
        c->MemFree(*ctr);
        *ctr = 0;
        return kvt_cu_fail(err, r, what, "zeroing a copy counter");
    }
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
        CUdeviceptr d, ctr;
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
    if (r == CUDA_SUCCESS && !sc[dev].ctr && (rc = kvt_copy_counter(sc[dev].s, &sc[dev].ctr, err)) < 0) {
        kvt_cuda_pop();
        pthread_mutex_unlock(&mu);
        return rc;
    }
    uint64_t bytes = 0;
    for (size_t i = 0; i < n; i++)
        bytes += h[i].len;
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
        rc = launch_with(dev, sc[dev].s, sc[dev].pinned, sc[dev].d, n, bytes, sc[dev].ctr,
                         variant >= 0 ? variant : VARIANT_DEVICE, variant >= 0, err);
    if (rc == 0 && (r = c->StreamSynchronize(sc[dev].s)) != CUDA_SUCCESS)
        rc = kvt_cu_fail(err, r, "cuStreamSynchronize", "gather on device %d", dev);
    kvt_cuda_pop();
    pthread_mutex_unlock(&mu);
    return rc;
}
