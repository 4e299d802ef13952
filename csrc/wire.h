/* The tcp transport's wire format (version 1). All integers little-endian.
 *
 *   client -> server  hello     {magic "KVTH", version, flags, status=0, engine id wanted}
 *                               then, when flags has KVT_HELLO_TOKEN, a 32-byte token
 *   server -> client  hello     {magic "KVTH", version, flags, status, engine id served}
 *                               status -EACCES: token refused; -EBUSY: too many
 *                               connections (reserved: 1 in total, 2 from this address)
 *   client -> server  request   {magic "KVTR", n, seq} then n x {region, key, offset, length}
 *   server -> client  response  {magic "KVTA", n, seq} then n x int32 status (0 or -errno),
 *                               then the bytes of every entry whose status is 0, in order
 *
 *   client -> server  verbs     {magic "KVTV", n = queue pairs, seq} then kvt_wire_verbs
 *   server -> client  verbs     {magic "KVTV", n, seq} then kvt_wire_verbs (status < 0: refused)
 *                               The server's queue pairs live as long as this connection.
 *
 * A connection carries requests one after another; the server answers in order. A
 * frame with a bad magic, n outside [1, KVT_WIRE_MAX_ENTRIES] or a short read closes
 * the connection; a refused entry (bad key, out of bounds, unknown region) only gets
 * its status, and the server goes on. A request asking for more than the server's
 * bytes per frame gets -EMSGSIZE for every entry and no bytes. The checks are the pure
 * functions at the end, shared by the server and the fuzz harness (tests/fuzz/). */
#ifndef KVT_WIRE_H
#define KVT_WIRE_H

#include <stdint.h>

#include "kvt.h" /* KVT_VERBS_MAX_QPS: queue pairs a verbs hello carries */

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "kvtransfer's wire format is little-endian; add byte swapping for this target"
#endif

#define KVT_WIRE_VERSION 1
#define KVT_HELLO_MAGIC 0x4854564bu /* "KVTH" */
#define KVT_REQ_MAGIC 0x5254564bu   /* "KVTR" */
#define KVT_RESP_MAGIC 0x4154564bu  /* "KVTA" */
#define KVT_VERBS_MAGIC 0x5654564bu /* "KVTV" */
#define KVT_WIRE_MAX_ENTRIES 1024
#define KVT_HELLO_TOKEN 0x1u   /* hello flag: a token follows */
#define KVT_WIRE_TOKEN_LEN 32
#define KVT_REFUSED_TOTAL 1    /* hello.reserved of an -EBUSY refusal */
#define KVT_REFUSED_PEER 2

typedef struct kvt_wire_hello {
    uint32_t magic;
    uint16_t version;
    uint16_t flags;
    int32_t status;
    uint32_t reserved;
    uint8_t engine_id[16];
} kvt_wire_hello;

typedef struct kvt_wire_hdr {
    uint32_t magic;
    uint32_t n;
    uint64_t seq;
} kvt_wire_hdr;

typedef struct kvt_wire_entry {
    uint64_t region;
    uint64_t key;
    uint64_t offset;
    uint64_t length;
} kvt_wire_entry;

/* One side of an RC connection: address (GID, LID), path MTU (enum ibv_mtu), per queue
 * pair its number and first packet sequence number, and how many RDMA READs this side
 * answers in flight per queue pair (its responder resources: the other side's
 * initiator depth must not exceed them). */
typedef struct kvt_wire_verbs {
    int32_t status;
    uint16_t lid;
    uint8_t mtu;
    uint8_t nqp;
    uint8_t gid[16];
    uint32_t qpn[KVT_VERBS_MAX_QPS];
    uint32_t psn[KVT_VERBS_MAX_QPS];
    uint32_t rd_depth;
} kvt_wire_verbs;

_Static_assert(sizeof(kvt_wire_verbs) == 92, "verbs endpoint is 92 bytes");
_Static_assert(sizeof(kvt_wire_hello) == 32, "hello is 32 bytes");
_Static_assert(sizeof(kvt_wire_hdr) == 16, "header is 16 bytes");
_Static_assert(sizeof(kvt_wire_entry) == 32, "entry is 32 bytes");

/* What the server makes of a frame's fixed part, before reading anything else. */
enum kvt_wire_kind { KVT_FRAME_READ = 1, KVT_FRAME_VERBS = 2 };

/* A client's hello: 0, or -EPROTO (not kvtransfer v1). *token_follows: 1 when 32
 * token bytes come next. */
int kvt_wire_check_hello(const kvt_wire_hello *h, int *token_follows);
/* A frame header: KVT_FRAME_READ (n entries follow), KVT_FRAME_VERBS (a
 * kvt_wire_verbs follows), or -EPROTO (drop the connection). */
int kvt_wire_check_header(const kvt_wire_hdr *h);
/* A read request's entries: 0, or -EMSGSIZE when together they ask for more than
 * max_bytes (sums that overflow 64 bits included). */
int kvt_wire_check_entries(const kvt_wire_entry *e, uint32_t n, uint64_t max_bytes);

#endif
