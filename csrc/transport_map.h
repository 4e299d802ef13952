/* map transport: same-host reads of regions in shared memory, mapped once and
 * copied with memcpy (transport_map.c). */
#ifndef KVT_TRANSPORT_MAP_H
#define KVT_TRANSPORT_MAP_H

#include "engine.h"

extern const kvt_transport_ops kvt_map_ops;

/* The target side, at registration: if [addr, addr+len) lies in one shared mapping
 * of a memfd or /dev/shm file that this process holds open, fills *out (fd, offset,
 * identity) and returns 1; else out->fd = -1 and 0. */
int kvt_map_export(uint64_t addr, uint64_t len, kvt_map_src *out);

#endif
