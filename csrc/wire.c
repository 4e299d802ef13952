/* The tcp server's checks of what a client sent: pure functions, no I/O, so that the
 * fuzz harness (tests/fuzz/wire_fuzz.c) drives them with arbitrary bytes. */
#include "wire.h"

#include <errno.h>

int kvt_wire_check_hello(const kvt_wire_hello *h, int *token_follows)
{
    *token_follows = 0;
    if (h->magic != KVT_HELLO_MAGIC || h->version != KVT_WIRE_VERSION)
        return -EPROTO;
    *token_follows = (h->flags & KVT_HELLO_TOKEN) != 0;
    return 0;
}

int kvt_wire_check_header(const kvt_wire_hdr *h)
{
    if (h->magic == KVT_VERBS_MAGIC)
        return KVT_FRAME_VERBS;
    if (h->magic != KVT_REQ_MAGIC || h->n == 0 || h->n > KVT_WIRE_MAX_ENTRIES)
        return -EPROTO;
    return KVT_FRAME_READ;
}

int kvt_wire_check_entries(const kvt_wire_entry *e, uint32_t n, uint64_t max_bytes)
{
    uint64_t total = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (e[i].length > max_bytes - total)
            return -EMSGSIZE;
        total += e[i].length;
    }
    return 0;
}
