"""The control plane: ZeroMQ messages between prefill and decode workers.

The prefill side (:class:`ControlServer`) binds one ROUTER socket; each decode worker
(:class:`ControlClient`) connects one DEALER socket to it. Over that one pair travel
the handshake (engine and region descriptors, KV layout, compatibility hash), requests
(``Submit``, or ``Subscribe`` to a request the prefill side already has), per-request
manifests (``Pinned``: the blocks; ``Manifest``: layers whose bytes are final;
``Finished``/``Failed``), lease renewals and releases. Wire schema:
:mod:`kvtransfer.control.messages`.

Why ROUTER/DEALER and not PUB/SUB for manifests: a SUB socket that connects or
subscribes after a manifest was published never sees it (ZeroMQ's "slow joiner"), and
PUB drops messages for slow subscribers at the high-water mark — both lose a request's
KV silently. Here manifests are addressed to readers that asked for the request, over a
connection that already exists (ROUTER_MANDATORY reports a vanished reader instead of
dropping quietly), and a reader that joins late sends ``Subscribe`` and first gets a
replay of everything published so far (the blocks, every ready layer, the outcome),
then the rest live — the "clone" pattern of the ZeroMQ guide, with the request id as
the topic. A ``Subscribe`` may also come first and wait (``wait_s``) for the prefill
side to open the request. Nothing depends on timing.

Lifetimes: prefill pins a request's blocks until every reader released them or the
lease expires (decode renews while it works, every lease/3); a release after expiry is
answered ``valid=False`` and the pull fails with :class:`LeaseExpiredError`. A request
belongs to the sessions that submitted or subscribed to it: another session's
``Release``, ``Renew`` or ``Subscribe`` is refused (``not_owner``). Silence
from the prefill side for ``timeout`` seconds fails the pulls with
:class:`PeerLostError`. Security: CurveZMQ keys by configuration
(:mod:`kvtransfer.control.security`). Metrics: :mod:`kvtransfer.control.metrics`.
"""

from ..errors import ControlError, LeaseExpiredError, PeerLostError
from .client import ControlClient, Pull, pull_sharded
from .messages import new_request_id
from .metrics import PullTimings, metrics_for
from .security import CurveClientKeys, CurveServerKeys, generate_keys
from .server import ControlServer, PrefillRequest
from .sessions import Limits

__all__ = ["ControlServer", "PrefillRequest", "Limits", "ControlClient", "Pull", "pull_sharded", "new_request_id",
           "PullTimings", "metrics_for", "CurveServerKeys", "CurveClientKeys", "generate_keys", "ControlError",
           "LeaseExpiredError", "PeerLostError"]
