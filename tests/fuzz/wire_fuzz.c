/* libFuzzer harness of what the tcp server makes of a client's bytes: the checks of
 * csrc/wire.c (hello, frame header, bytes per frame) and the region table's checks of
 * every entry (csrc/region.c), driven in the server's order: a hello (and its token),
 * then frames until the input runs out. The table holds two host regions of odd sizes
 * in exactly-sized heap blocks; every entry the table admits is read whole, so
 * AddressSanitizer catches a bounds check that lets a byte outside through, and every
 * admitted entry is released, so a leaked reference aborts at the end.
 *
 * Region ids and keys are random 64-bit numbers a fuzzer would never guess: an entry
 * naming region 1 or 2 means that region, key 1 its right key (other values pass
 * through unchanged and are refused). make fuzz / make test-fuzz build and run it. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "region.h"
#include "wire.h"

#define MAX_FRAME_BYTES (64u << 20) /* the server's default */

static kvt_region_table table;
static uint64_t ids[2], keys[2];
static const uint64_t sizes[2] = {4099, 65537};
static uint8_t *mem[2]; /* held here for the process's life (the leak checker looks) */

static void setup(void)
{
    static const uint8_t engine_id[16] = {1};
    kvt_err err;
    if (kvt_table_init(&table, engine_id, &err) < 0) {
        fprintf(stderr, "%s\n", err.msg);
        abort();
    }
    for (int i = 0; i < 2; i++) {
        mem[i] = malloc(sizes[i]);
        memset(mem[i], 0x5a, sizes[i]);
        if (kvt_table_add(&table, (uint64_t)(uintptr_t)mem[i], sizes[i], KVT_MEM_HOST, 0, 0, 0, NULL, NULL, &ids[i],
                          &keys[i], &err) < 0) {
            fprintf(stderr, "%s\n", err.msg);
            abort();
        }
    }
}

/* Takes n bytes off the input, or returns NULL when fewer are left (a short read: the
 * server would wait, then drop the connection). */
static const uint8_t *take(const uint8_t **p, size_t *left, size_t n)
{
    if (*left < n)
        return NULL;
    const uint8_t *at = *p;
    *p += n;
    *left -= n;
    return at;
}

static volatile uint8_t sink;

/* One read request, as serve_frame checks it. */
static void serve_read(const kvt_wire_entry *in, uint32_t n)
{
    kvt_wire_entry e[KVT_WIRE_MAX_ENTRIES];
    unsigned __int128 total = 0;
    for (uint32_t i = 0; i < n; i++) {
        e[i] = in[i];
        if (e[i].region == 1 || e[i].region == 2) {
            int r = (int)e[i].region - 1;
            e[i].region = ids[r];
            if (e[i].key == 1)
                e[i].key = keys[r];
        }
        total += e[i].length;
    }
    int big = kvt_wire_check_entries(e, n, MAX_FRAME_BYTES);
    if ((big < 0) != (total > MAX_FRAME_BYTES))
        abort(); /* the bytes-per-frame check disagrees with the sum */
    if (big < 0)
        return;
    for (uint32_t i = 0; i < n; i++) {
        kvt_region_view v;
        kvt_err ignored;
        if (kvt_table_acquire(&table, e[i].region, e[i].key, 1, e[i].offset, e[i].length, &v, &ignored) < 0)
            continue;
        const uint8_t *b = (const uint8_t *)(uintptr_t)v.addr;
        uint8_t x = 0;
        for (uint64_t k = 0; k < e[i].length; k++) /* what sendmsg would read */
            x ^= b[k];
        sink = x;
        kvt_table_release(&table, e[i].region);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int ready;
    if (!ready) {
        setup();
        ready = 1;
    }
    const uint8_t *p = data, *at;
    size_t left = size;
    kvt_wire_hello hi;
    int token_follows;
    if (!(at = take(&p, &left, sizeof hi)))
        return 0;
    memcpy(&hi, at, sizeof hi);
    if (kvt_wire_check_hello(&hi, &token_follows) < 0)
        return 0;
    if (token_follows && !take(&p, &left, KVT_WIRE_TOKEN_LEN))
        return 0;
    for (;;) {
        kvt_wire_hdr h;
        if (!(at = take(&p, &left, sizeof h)))
            break;
        memcpy(&h, at, sizeof h);
        int kind = kvt_wire_check_header(&h);
        if (kind < 0)
            break; /* the server drops the connection */
        if (kind == KVT_FRAME_VERBS) {
            if (!take(&p, &left, sizeof(kvt_wire_verbs)))
                break;
            continue; /* no RDMA device here: refused with -ENODEV, connection kept */
        }
        if (h.n < 1 || h.n > KVT_WIRE_MAX_ENTRIES)
            abort(); /* the header check let a bad count through */
        kvt_wire_entry ents[KVT_WIRE_MAX_ENTRIES];
        if (!(at = take(&p, &left, h.n * sizeof(kvt_wire_entry))))
            break;
        memcpy(ents, at, h.n * sizeof(kvt_wire_entry));
        serve_read(ents, h.n);
    }
    for (int i = 0; i < KVT_MAX_REGIONS; i++)
        if (atomic_load(&table.refs[i]) != 0)
            abort(); /* an admitted entry was not released */
    return 0;
}
