/* shm transport: both engines on one host (transport_shm.c). */
#ifndef KVT_TRANSPORT_SHM_H
#define KVT_TRANSPORT_SHM_H

#include "engine.h"

extern const kvt_transport_ops kvt_shm_ops;

#endif
