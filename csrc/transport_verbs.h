/* verbs transport: RDMA READ (transport_verbs.c, or verbs_unavailable.c in a build
 * without libibverbs headers, where it reaches no peer and says why). */
#ifndef KVT_TRANSPORT_VERBS_H
#define KVT_TRANSPORT_VERBS_H

#include "engine.h"

extern const kvt_transport_ops kvt_verbs_ops;

#endif
