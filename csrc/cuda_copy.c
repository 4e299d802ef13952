/* Batched GPU copies: the gather kernel (its CUDA C source below, compiled with NVRTC
 * loaded at run time) or cuMemcpyBatchAsync. cuda_copy.h says what and why. */
#define _GNU_SOURCE
#include "cuda_copy.h"

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEVICES 64
#define THREADS 256
#define THREADS_BULK 32 /* variant 5: one warp per CTA */
#define CTAS_PER_SM 8
#define BATCH_CALL_MAX 8192 /* descriptors per cuMemcpyBatchAsync call */

/* One CTA per descriptor at a time (grid-stride over descriptors; the next
 * descriptor is loaded while this one is copied). 16-byte vectors when source and
 * destination agree modulo 16: a byte head up to the first aligned address, U
 * independent 16-byte loads per thread before their stores, a byte tail; otherwise
 * bytes (correct, slow, rare). Sources are read through the read-only path
 * (ld.global.nc: they are not written during a copy). Variants (the copy is bound by
 * memory bandwidth; which is fastest is measured, bench/transfer_bw.py "kernelN"):
 *   0  U = 4, streaming stores (st.global.cs)
 *   1  U = 8, streaming stores
 *   2  U = 8, plain stores
 *   3  U = 8, plain stores, loads asking L2 to fetch 256-byte sectors (.L2::256B)
 *   4  U = 16, plain stores
 *   5  Hopper's bulk copy engine (cp.async.bulk through shared memory; one warp per
 *      CTA; sm_90 and later, elsewhere variant 0's code); device memory only: staging
 *      through pinned host memory (tcp) always uses variant STAGE_VARIANT
 * KVTRANSFER_GATHER_VARIANT=0..5 picks one; the default is DEFAULT_VARIANT. Measured on
 * an H100 (one process, 16,384 scattered 32 KiB blocks / one 512 MiB range, GB/s,
 * torch copy_ of the same bytes 1,396-1,431): v0 1,071-1,227 / 1,311-1,316, v1 1,202 /
 * 1,314, v2 1,225-1,230 / 1,311-1,312, v3 1,208 / 1,308, v4 1,231 / 1,314, v5 1,221 /
 * 1,291: alike within noise; v2 is the default (plain loads and stores, any memory). */
#define N_VARIANTS 6
#define DEFAULT_VARIANT 2
#define STAGE_VARIANT 2
static const char KERNEL_SRC[] =
    "struct kvt_copy { unsigned long long src, dst, len; };\n"
    "template <int P>\n"
    "__device__ __forceinline__ uint4 load16(const uint4 *p)\n"
    "{\n"
    "#if __CUDA_ARCH__ >= 800\n"
    "    if (P) {\n"
    "        uint4 v;\n"
    "        asm volatile(\"ld.global.nc.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];\"\n"
    "                     : \"=r\"(v.x), \"=r\"(v.y), \"=r\"(v.z), \"=r\"(v.w) : \"l\"(p));\n"
    "        return v;\n"
    "    }\n"
    "#endif\n"
    "    return __ldg(p);\n"
    "}\n"
    "template <int CS>\n"
    "__device__ __forceinline__ void store16(uint4 *p, uint4 v)\n"
    "{\n"
    "    if (CS) __stcs(p, v); else *p = v;\n"
    "}\n"
    "template <int U, int CS, int P>\n"
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
    "        for (int u = 0; u < U; u++) v[u] = load16<P>(vs + j + u * B);\n"
    "#pragma unroll\n"
    "        for (int u = 0; u < U; u++) store16<CS>(vt + j + u * B, v[u]);\n"
    "    }\n"
    "    for (; j < nv; j += B) store16<CS>(vt + j, load16<P>(vs + j));\n"
    "    for (unsigned long long k = head + (nv << 4) + threadIdx.x; k < len; k += B) t[k] = s[k];\n"
    "}\n"
    "template <int U, int CS, int P>\n"
    "__device__ __forceinline__ void gather(const kvt_copy *__restrict__ d, unsigned long long n)\n"
    "{\n"
    "    unsigned long long i = blockIdx.x;\n"
    "    if (i >= n) return;\n"
    "    kvt_copy c = d[i];\n"
    "    for (; i < n; i += gridDim.x) {\n"
    "        const unsigned long long next = i + gridDim.x;\n"
    "        kvt_copy c2 = c;\n"
    "        if (next < n) c2 = d[next];\n"
    "        copy_one<U, CS, P>(c);\n"
    "        c = c2;\n"
    "    }\n"
    "}\n"
    "#if __CUDA_ARCH__ >= 900\n"
    "/* Variant 5: Hopper's bulk copy engine (cp.async.bulk, TMA without tensor maps). One\n"
    " * warp per CTA; lane 0 streams 8 KiB segments global -> shared (completion counted on\n"
    " * an mbarrier per buffer) -> global, four buffers deep, at most two loads in flight\n"
    " * per CTA; a buffer is reloaded only once the store that read it has finished\n"
    " * reading it (cp.async.bulk.wait_group.read). Ranges not 16-byte aligned, or of a\n"
    " * length that is not a multiple of 16, are copied by the warp's loads and stores. */\n"
    "#define BS 4\n"
    "#define BSEG 8192\n"
    "__device__ __forceinline__ unsigned smem(const void *p) { return (unsigned)__cvta_generic_to_shared(p); }\n"
    "struct bulk_pipe {\n"
    "    unsigned long long dst[BS];\n"
    "    unsigned len[BS];\n"
    "    unsigned bar[BS], buf[BS];\n"
    "    unsigned phase;\n"
    "    unsigned long long issued, completed;\n"
    "    __device__ __forceinline__ void complete_oldest()\n"
    "    {\n"
    "        const int k = (int)(completed % BS);\n"
    "        const unsigned par = (phase >> k) & 1u;\n"
    "        unsigned ok = 0;\n"
    "        do {\n"
    "            asm volatile(\"{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }\"\n"
    "                         : \"=r\"(ok) : \"r\"(bar[k]), \"r\"(par) : \"memory\");\n"
    "        } while (!ok);\n"
    "        phase ^= 1u << k;\n"
    "        asm volatile(\"cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\"\n"
    "                     :: \"l\"(dst[k]), \"r\"(buf[k]), \"r\"(len[k]) : \"memory\");\n"
    "        asm volatile(\"cp.async.bulk.commit_group;\" ::: \"memory\");\n"
    "        completed++;\n"
    "    }\n"
    "    __device__ __forceinline__ void load(unsigned long long src, unsigned long long d, unsigned bytes)\n"
    "    {\n"
    "        const unsigned long long j = issued;\n"
    "        const int k = (int)(j % BS);\n"
    "        if (j >= BS) {\n"
    "            /* stores issued after the one that read buffer k: wait until at most that many are\n"
    "               still reading, so that one is done with the buffer */\n"
    "            const long long newer = (long long)completed - 1 - (long long)(j - BS);\n"
    "            if (newer <= 0) asm volatile(\"cp.async.bulk.wait_group.read 0;\" ::: \"memory\");\n"
    "            else if (newer == 1) asm volatile(\"cp.async.bulk.wait_group.read 1;\" ::: \"memory\");\n"
    "            else if (newer == 2) asm volatile(\"cp.async.bulk.wait_group.read 2;\" ::: \"memory\");\n"
    "            else asm volatile(\"cp.async.bulk.wait_group.read 3;\" ::: \"memory\");\n"
    "        }\n"
    "        asm volatile(\"mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\" :: \"r\"(bar[k]), \"r\"(bytes) : \"memory\");\n"
    "        asm volatile(\"cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\"\n"
    "                     :: \"r\"(buf[k]), \"l\"(src), \"r\"(bytes), \"r\"(bar[k]) : \"memory\");\n"
    "        dst[k] = d;\n"
    "        len[k] = bytes;\n"
    "        issued++;\n"
    "        if (issued - completed >= BS - 1) complete_oldest();\n"
    "    }\n"
    "};\n"
    "extern \"C\" __global__ void __launch_bounds__(32) kvt_gather_v5(const kvt_copy *__restrict__ d, unsigned long long n)\n"
    "{\n"
    "    __shared__ __align__(128) unsigned char buf[BS][BSEG];\n"
    "    __shared__ __align__(8) unsigned long long bar[BS];\n"
    "    bulk_pipe pp;\n"
    "    if (threadIdx.x == 0) {\n"
    "        for (int k = 0; k < BS; k++) {\n"
    "            pp.bar[k] = smem(&bar[k]);\n"
    "            pp.buf[k] = smem(buf[k]);\n"
    "            asm volatile(\"mbarrier.init.shared::cta.b64 [%0], 1;\" :: \"r\"(pp.bar[k]) : \"memory\");\n"
    "        }\n"
    "        asm volatile(\"fence.mbarrier_init.release.cluster;\" ::: \"memory\");\n"
    "        pp.phase = 0;\n"
    "        pp.issued = pp.completed = 0;\n"
    "    }\n"
    "    __syncwarp();\n"
    "    for (unsigned long long i = blockIdx.x; i < n; i += gridDim.x) {\n"
    "        const kvt_copy c = d[i];\n"
    "        if (((c.src | c.dst | c.len) & 15) != 0) {\n"
    "            copy_one<4, 0, 0>(c);\n"
    "        } else if (threadIdx.x == 0) {\n"
    "            for (unsigned long long off = 0; off < c.len; off += BSEG)\n"
    "                pp.load(c.src + off, c.dst + off, (unsigned)(c.len - off < BSEG ? c.len - off : BSEG));\n"
    "        }\n"
    "        __syncwarp();\n"
    "    }\n"
    "    if (threadIdx.x == 0) {\n"
    "        while (pp.completed < pp.issued) pp.complete_oldest();\n"
    "        asm volatile(\"cp.async.bulk.wait_group 0;\" ::: \"memory\");\n"
    "    }\n"
    "}\n"
    "#else\n"
    "extern \"C\" __global__ void __launch_bounds__(32) kvt_gather_v5(const kvt_copy *__restrict__ d, unsigned long long n)\n"
    "{ gather<4, 0, 0>(d, n); }\n"
    "#endif\n"
    "#define KVT_VARIANT(name, U, CS, P) extern \"C\" __global__ void __launch_bounds__(256) \\\n"
    "    name(const kvt_copy *__restrict__ d, unsigned long long n) { gather<U, CS, P>(d, n); }\n"
    "KVT_VARIANT(kvt_gather_v0, 4, 1, 0)\n"
    "KVT_VARIANT(kvt_gather_v1, 8, 1, 0)\n"
    "KVT_VARIANT(kvt_gather_v2, 8, 0, 0)\n"
    "KVT_VARIANT(kvt_gather_v3, 8, 0, 1)\n"
    "KVT_VARIANT(kvt_gather_v4, 16, 0, 0)\n";

static int gather_variant(void)
{
    const char *v = getenv("KVTRANSFER_GATHER_VARIANT");
    return v && v[0] >= '0' && v[0] < '0' + N_VARIANTS && !v[1] ? v[0] - '0' : DEFAULT_VARIANT;
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
        int ready; /* 1 decided; -errno failed (why holds the message) */
        int mode;  /* 1 kernel, 2 batch */
        CUfunction fn[N_VARIANTS];
        int grid[N_VARIANTS]; /* SMs x resident CTAs per SM, per variant */
        int pick;             /* KVTRANSFER_GATHER_VARIANT, else DEFAULT_VARIANT */
        kvt_err why;
    } dev[MAX_DEVICES];
} st = {.mu = PTHREAD_MUTEX_INITIALIZER};

enum { MODE_KERNEL = 1, MODE_BATCH = 2 };

/* Compiles the kernel for the device's architecture (a CUBIN; PTX when this NVRTC
 * cannot target the architecture directly) and loads it into the current context. */
static int build_kernel(const kvt_cu *c, int dev, struct dev_state *ds, kvt_err *err)
{
    pthread_once(&nv.once, load_nvrtc);
    if (!nv.ok)
        return kvt_error(err, EOPNOTSUPP, "nvrtc", "%s", nv.why);
    CUdevice d;
    int major = 0, minor = 0, sms = 0;
    CUresult r = c->DeviceGet(&d, dev);
    if (r == CUDA_SUCCESS)
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
    for (int k = 0; k < N_VARIANTS && r == CUDA_SUCCESS; k++) {
        char name[32];
        snprintf(name, sizeof name, "kvt_gather_v%d", k);
        r = c->ModuleGetFunction(&ds->fn[k], mod, name);
        int per_sm = CTAS_PER_SM;
        if (r == CUDA_SUCCESS && c->OccupancyMaxActiveBlocksPerMultiprocessor &&
            c->OccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, ds->fn[k], k == 5 ? THREADS_BULK : THREADS, 0) !=
                CUDA_SUCCESS)
            per_sm = CTAS_PER_SM;
        ds->grid[k] = (sms > 0 ? sms : 1) * (per_sm > 0 ? per_sm : 1);
    }
    if (r != CUDA_SUCCESS)
        return kvt_cu_fail(err, r, "cuModuleLoadData", "gather kernel for sm_%d%d from NVRTC %d.%d", major, minor,
                           nv.major, nv.minor);
    ds->pick = gather_variant();
    return 0;
}

int kvt_copy_prepare(int dev, const char **mode, kvt_err *err)
{
    const kvt_cu *c = kvt_cu_get(err);
    if (!c)
        return -ENODEV;
    if (dev < 0 || dev >= MAX_DEVICES)
        return kvt_error(err, EINVAL, "cuda", "device ordinal %d out of range", dev);
    struct dev_state *ds = &st.dev[dev];
    pthread_mutex_lock(&st.mu);
    if (!ds->ready) {
        const char *want = getenv("KVTRANSFER_CUDA_COPY");
        int force_kernel = want && !strcmp(want, "kernel"), force_batch = want && !strcmp(want, "batch");
        int have_batch = c->MemcpyBatchAsync_v2 || c->MemcpyBatchAsync_v1;
        kvt_err kwhy;
        int rc = force_batch ? kvt_error(&kwhy, EOPNOTSUPP, "cuda", "KVTRANSFER_CUDA_COPY=batch") : build_kernel(c, dev, ds, &kwhy);
        if (rc == 0) {
            ds->mode = MODE_KERNEL;
            ds->ready = 1;
        } else if (!force_kernel && have_batch) {
            ds->mode = MODE_BATCH;
            ds->ready = 1;
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

static int launch_with(int dev, CUstream s, const kvt_copy_desc *h, CUdeviceptr d, size_t n, int variant,
                       kvt_err *err);

int kvt_copy_launch(int dev, CUstream s, const kvt_copy_desc *h, CUdeviceptr d, size_t n, kvt_err *err)
{
    return launch_with(dev, s, h, d, n, -1, err);
}

int kvt_copy_launch_staged(int dev, CUstream s, const kvt_copy_desc *h, CUdeviceptr d, size_t n, kvt_err *err)
{
    return launch_with(dev, s, h, d, n, STAGE_VARIANT, err);
}

/* variant: -1 the configured one, else 0..N_VARIANTS-1 */
static int launch_with(int dev, CUstream s, const kvt_copy_desc *h, CUdeviceptr d, size_t n, int variant,
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
    int k = variant >= 0 && variant < N_VARIANTS ? variant : ds->pick;
    CUdeviceptr descs = d ? d : (CUdeviceptr)(uintptr_t)h;
    unsigned long long count = n;
    void *params[] = {&descs, &count};
    unsigned int grid = n < (size_t)ds->grid[k] ? (unsigned int)n : (unsigned int)ds->grid[k];
    CUresult r = c->LaunchKernel(ds->fn[k], grid, 1, 1, k == 5 ? THREADS_BULK : THREADS, 1, 1, 0, s, params, NULL);
    if (r != CUDA_SUCCESS)
        return kvt_cu_fail(err, r, "cuLaunchKernel", "gather of %zu ranges on device %d, grid %u", n, dev, grid);
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
        snprintf(kernel, sizeof kernel, "gather kernel (variant %d) via NVRTC %d.%d (%s)", gather_variant(), nv.major,
                 nv.minor, nv.path);
    else
        snprintf(kernel, sizeof kernel, "no gather kernel: %s", nv.why);
    snprintf(batch, sizeof batch, "cuMemcpyBatchAsync %s", have_batch ? "available" : "not in this driver");
    snprintf(buf, cap, "driver %d.%d; %s; %s%s%s", c->driver_version / 1000, c->driver_version % 1000 / 10, kernel,
             batch, want && *want ? "; KVTRANSFER_CUDA_COPY=" : "", want && *want ? want : "");
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
    } sc[MAX_DEVICES];
    const kvt_cu *c = kvt_cu_get(err);
    if (!c)
        return -ENODEV;
    if (dev < 0 || dev >= MAX_DEVICES)
        return kvt_error(err, EINVAL, "cuda", "device ordinal %d out of range", dev);
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
        rc = launch_with(dev, sc[dev].s, sc[dev].pinned, sc[dev].d, n, variant, err);
    if (rc == 0 && (r = c->StreamSynchronize(sc[dev].s)) != CUDA_SUCCESS)
        rc = kvt_cu_fail(err, r, "cuStreamSynchronize", "gather on device %d", dev);
    kvt_cuda_pop();
    pthread_mutex_unlock(&mu);
    return rc;
}
