/* tcp transport: reads served by the peer's tcp server thread (transport_tcp.c). */
#ifndef KVT_TRANSPORT_TCP_H
#define KVT_TRANSPORT_TCP_H

#include "engine.h"

extern const kvt_transport_ops kvt_tcp_ops;

#endif
