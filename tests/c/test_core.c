/* Drives the C core with no Python: two engines in one process, a batch of scattered
 * reads over each transport with the bytes checked, and a wrong key refused.
 * Built and run by tests/test_c_core.py; prints "N passed, M failed". */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvt.h"

#define N_BLOCKS 512
#define BLOCK 4099 /* odd on purpose: unaligned offsets */

static int passed, failed;

#define CHECK(cond, ...)                                                                          \
    do {                                                                                          \
        if (cond) {                                                                               \
            passed++;                                                                             \
        } else {                                                                                  \
            failed++;                                                                             \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                                  \
            fprintf(stderr, __VA_ARGS__);                                                         \
            fputc('\n', stderr);                                                                  \
        }                                                                                         \
    } while (0)

static void run(const char *name)
{
    kvt_err err;
    kvt_engine_opts o = {.io_timeout_ms = 5000};
    kvt_engine *a = NULL, *b = NULL;
    CHECK(kvt_engine_create(&o, &a, &err) == 0, "create a: %s", err.msg);
    CHECK(kvt_engine_create(&o, &b, &err) == 0, "create b: %s", err.msg);
    if (!a || !b)
        return;
    size_t n = (size_t)N_BLOCKS * BLOCK;
    unsigned char *src = malloc(n), *dst = calloc(1, n);
    srand(7);
    for (size_t i = 0; i < n; i++)
        src[i] = (unsigned char)rand();
    uint64_t sid, skey, did, dkey;
    CHECK(kvt_register(a, (uint64_t)(uintptr_t)src, n, KVT_MEM_HOST, -1, &sid, &skey, NULL, &err) == 0, "%s", err.msg);
    CHECK(kvt_register(b, (uint64_t)(uintptr_t)dst, n, KVT_MEM_HOST, -1, &did, &dkey, NULL, &err) == 0, "%s", err.msg);

    kvt_engine_info ai;
    kvt_engine_info_get(a, &ai);
    kvt_peer *p = NULL;
    int rc = kvt_connect(b, &ai, name, &p, NULL, NULL, &err);
    CHECK(rc == 0, "%s connect: %s", name, err.msg);
    CHECK(rc < 0 || strcmp(kvt_peer_transport(p), name) == 0, "%s: connected over %s", name, kvt_peer_transport(p));
    if (rc == 0) {
        kvt_read_req *reqs = calloc(N_BLOCKS, sizeof *reqs);
        for (size_t i = 0; i < N_BLOCKS; i++) /* block i <- block (N-1-i): scattered */
            reqs[i] = (kvt_read_req){.local_region = did, .local_off = i * BLOCK, .remote_region = sid,
                                     .remote_key = skey, .remote_addr = (uint64_t)(uintptr_t)src,
                                     .remote_off = (N_BLOCKS - 1 - i) * BLOCK, .len = BLOCK};
        kvt_transfer *t = NULL;
        CHECK(kvt_peer_read(p, reqs, N_BLOCKS, &t, &err) == 0, "%s read: %s", name, err.msg);
        if (t) {
            CHECK(kvt_transfer_wait(t, 10000) == 0, "%s: wait timed out", name);
            int64_t entry = -1;
            CHECK(kvt_transfer_status(t, &err, &entry) == 0, "%s status: %s", name, err.msg);
            int same = 1;
            for (size_t i = 0; i < N_BLOCKS && same; i++)
                same = memcmp(dst + i * BLOCK, src + (N_BLOCKS - 1 - i) * BLOCK, BLOCK) == 0;
            CHECK(same, "%s: bytes differ", name);
            kvt_transfer_release(t);
        }
        /* a wrong key on entry 1 is refused, and says which entry */
        reqs[1].remote_key ^= 1;
        t = NULL;
        CHECK(kvt_peer_read(p, reqs, 2, &t, &err) == 0, "%s read: %s", name, err.msg);
        if (t) {
            CHECK(kvt_transfer_wait(t, 10000) == 0, "%s: wait timed out", name);
            int64_t entry = -1;
            int st = kvt_transfer_status(t, &err, &entry);
            CHECK(st == -EACCES && entry == 1, "%s: wrong key gave %d at entry %ld", name, st, (long)entry);
            kvt_transfer_release(t);
        }
        free(reqs);
        kvt_peer_close(p);
    }
    CHECK(kvt_deregister(a, sid, &err) == 0, "%s", err.msg);
    CHECK(kvt_deregister(a, sid, &err) == -ENOENT, "double deregister must be ENOENT");
    kvt_deregister(b, did, &err);
    kvt_engine_destroy(a);
    kvt_engine_destroy(b);
    free(src);
    free(dst);
}

/* The transport table answers for a peer without connecting: tcp reaches any host,
 * shm this one; an unknown name is refused. */
static void plan(void)
{
    kvt_err err;
    kvt_engine_opts o = {.io_timeout_ms = 5000};
    kvt_engine *a = NULL;
    CHECK(kvt_engine_create(&o, &a, &err) == 0, "create: %s", err.msg);
    if (!a)
        return;
    kvt_engine_info ai;
    kvt_engine_info_get(a, &ai);
    kvt_reach r[KVT_MAX_TRANSPORTS];
    int n = kvt_plan(a, &ai, NULL, r, &err);
    CHECK(n == (int)kvt_transport_count(), "plan: %d entries for %zu transports", n, kvt_transport_count());
    int shm = 0, tcp = 0;
    for (int i = 0; i < n; i++) {
        shm |= strcmp(r[i].name, "shm") == 0 && r[i].ok;
        tcp |= strcmp(r[i].name, "tcp") == 0 && r[i].ok && i == n - 1;
    }
    CHECK(shm && tcp, "plan: shm and (last) tcp must reach this engine");
    CHECK(kvt_plan(a, &ai, "pigeon", r, &err) == -EINVAL, "an unknown transport must be EINVAL");
    ai.boot_id[0] ^= 1; /* another host */
    CHECK(kvt_plan(a, &ai, "shm", r, &err) == -EHOSTUNREACH, "forced shm to another host: %s", err.msg);
    kvt_engine_destroy(a);
}

int main(void)
{
    run("tcp");
    run("shm");
    plan();
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
