"""The prefill side of the control plane: handshakes, requests, manifests, leases.

    server = ControlServer("tcp://127.0.0.1:0", engine=eng, regions=[region], layout=layout,
                           compat=CompatInfo.of(layout, "my-model"), pool=pool, on_submit=queue.put)
    # a compute thread, for each PrefillRequest req taken from the queue:
    blocks = pool.alloc(layout.blocks_for(n)); req.pin(blocks, n)
    for layer in ...: compute into the blocks; req.layer_ready(layer)
    req.finish(first_token_bytes)       # or req.fail("why") — always one of the two

Block ownership: once pinned, a request's blocks belong to the server, which returns
them to the pool when the application is done with them (``finish``/``fail``) **and**
every reader released them or the lease expired. A lease starts at submit and at pin
and is extended by the readers' renewals; a decode worker that dies stops renewing, so
its blocks come back within ``lease_s``, and no request stays pinned longer than
``Limits.max_lease_s`` however often it is renewed. A release that arrives after expiry
is answered ``valid=False``: the reader must not trust what it read. Per-session quotas
(:class:`~kvtransfer.control.sessions.Limits`: pinned blocks, open requests) refuse a
``Submit``/``Subscribe`` with ``quota_exceeded``, or fail a request whose pin would
exceed them, so one client cannot hold the pool. A session silent for
``Limits.session_idle_s`` that holds no request is dropped (a decode side sends a
heartbeat every second), and refusals are logged at most 20 lines per 10 s.

A ``Subscribe`` with ``wait_s`` for an id that is not open yet (and was never retired)
waits for it: when the id opens, it attaches as an immediate Subscribe would; when
``wait_s`` passes first, it is refused ``unknown_request``. Waits are bounded per
session and in all (``Limits.session_waits``, ``max_waits``), end with their session,
and a ``Release`` of the id cancels the wait.

The data plane: with CURVE, the server makes its engine's tcp server require tokens
(:meth:`~kvtransfer.engine.Engine.require_tokens`) and mints one per authenticated
session (an HMAC of the client's public key and routing id under a key of this server),
allowed while the session lasts, sent in ``Welcome`` and revoked when the session is
dropped or the server closes: only a client that passed the CURVE handshake can read
the pool over tcp. Without CURVE anyone who reaches the control port gets the region
keys in ``Welcome`` and can read registered memory (see :mod:`.security`).

A request belongs to the sessions that submitted or subscribed to it (its readers): a
``Release``, ``Renew`` or ``Subscribe`` from any other session is refused with
``not_owner``, so one decode side cannot retire another's request. A request submitted
for several readers keeps its free reader slots open to any session that names its id
(tensor-parallel decode ranks are separate sessions): such ids must be unguessable —
:func:`~kvtransfer.control.messages.new_request_id` makes them so. All state lives on
the socket's loop thread; :class:`PrefillRequest` methods are thread-safe and only
queue work to it.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import zmq

from ..descriptors import EngineDescriptor
from ..engine import Engine, Region
from ..errors import ControlError, InvalidArgumentError, KVTransferError, LayoutMismatchError
from ..kv import BlockPool, CompatInfo, KVLayout, check_compatible, compat_problems
from . import messages as m
from .loop import SocketLoop
from .metrics import metrics_for
from .security import CurveServerKeys, warn_if_exposed
from .sessions import Limits, RateLimitedLog, Session, session_name

log = logging.getLogger("kvtransfer.control")

_TOMBSTONES = 4096  # retired request ids remembered, so a late release is told why


class PrefillRequest:
    """One request, as the prefill application sees it. Thread-safe; every method only
    queues work to the server's loop thread. Call exactly one of :meth:`finish` or
    :meth:`fail` at the end, also after :attr:`cancelled` turned True (that is what
    lets the server return the blocks)."""

    def __init__(self, server: "ControlServer", request_id: str, payload: bytes, readers: int):
        self.request_id = request_id
        self.payload = payload
        self.readers = readers
        self._server = server
        self._cancelled = threading.Event()
        self._pinned = False
        self._ended = False

    @property
    def cancelled(self) -> bool:
        """True once no reader wants the KV anymore (released early, lease expired,
        server closing): stop computing, then call finish or fail."""
        return self._cancelled.is_set()

    def pin(self, blocks: Sequence[int], num_tokens: int) -> None:
        """Hands the request's blocks (token order, from the server's pool) to the
        server: readers learn them now and may read each layer once announced."""
        blocks = [int(b) for b in blocks]
        layout = self._server.layout
        if self._pinned or self._ended:
            raise InvalidArgumentError(f"request {self.request_id!r}: pin called twice or after the end", op="pin")
        if num_tokens < 0 or len(blocks) < layout.blocks_for(num_tokens):
            raise InvalidArgumentError(f"request {self.request_id!r}: {num_tokens} tokens need "
                                       f"{layout.blocks_for(max(num_tokens, 0))} blocks, got {len(blocks)}", op="pin")
        bad = [b for b in blocks if not 0 <= b < layout.num_blocks]
        if bad:
            raise InvalidArgumentError(f"request {self.request_id!r}: block ids {bad[:8]} outside the pool of "
                                       f"{layout.num_blocks}", op="pin")
        self._pinned = True
        self._server._loop.call(lambda: self._server._pin(self.request_id, blocks, num_tokens))

    def layer_ready(self, *layers: int) -> None:
        """Announces that these layers of the pinned blocks hold their final bytes."""
        if not self._pinned:
            raise InvalidArgumentError(f"request {self.request_id!r}: layer_ready before pin", op="layer_ready")
        bad = [x for x in layers if not 0 <= x < self._server.layout.num_layers]
        if bad or not layers:
            raise InvalidArgumentError(f"request {self.request_id!r}: layers {bad or '()'} outside "
                                       f"[0, {self._server.layout.num_layers})", op="layer_ready")
        ls = [int(x) for x in layers]
        self._server._loop.call(lambda: self._server._layers(self.request_id, ls))

    def finish(self, result: bytes = b"") -> None:
        """Every layer is announced; ``result`` goes to the readers (e.g. the first token)."""
        self._end(m.Finished(request_id=self.request_id, result=bytes(result)))

    def fail(self, message: str, code: str = "prefill_failed") -> None:
        """The request ends without (all of) its KV; readers get ``code`` and ``message``."""
        self._end(m.Failed(request_id=self.request_id, code=code, message=str(message)[:4000]))

    def _end(self, outcome: m.Finished | m.Failed) -> None:
        if self._ended:
            return
        self._ended = True
        self._server._loop.call(lambda: self._server._end(self.request_id, outcome))

    def __repr__(self) -> str:
        return f"<PrefillRequest {self.request_id!r}{' cancelled' if self.cancelled else ''}>"


@dataclass
class _Req:
    """The server's state of one request (loop thread only)."""
    handle: PrefillRequest
    deadline: float       # of the lease (monotonic); renewals move it, never past max_deadline
    max_deadline: float   # created + Limits.max_lease_s
    subscribers: list[bytes] = field(default_factory=list)
    released_by: set[bytes] = field(default_factory=set)
    blocks: list[int] | None = None
    num_tokens: int = 0
    layers: list[int] = field(default_factory=list)
    outcome: m.Finished | m.Failed | None = None
    retired: bool = False

    @property
    def app_done(self) -> bool:
        return self.outcome is not None


def _bind(sock: zmq.Socket, endpoint: str) -> None:
    """Binds ``sock`` (``tcp://HOST:0``: any free port); ControlError ``bind`` if it cannot."""
    bind_to = endpoint[:-2] + ":*" if endpoint.startswith("tcp://") and endpoint.endswith(":0") else endpoint
    try:
        sock.bind(bind_to)
    except zmq.ZMQError as e:
        raise ControlError(f"cannot bind the control socket to {endpoint}: {e}", code="bind", errno=e.errno,
                           op="bind") from None


class ControlServer:
    """The prefill side's ROUTER socket and its loop thread (see the module docs).

    ``endpoint``: where to bind (``tcp://HOST:0`` picks a free port; :attr:`endpoint`
    says which). ``on_submit(req)`` runs on the loop thread for every Submit: it must
    only queue the request (raising rejects it). ``lease_s``: how long blocks stay
    pinned without a renewal. ``on_freed(request_id)`` runs on the loop thread when a
    request's blocks went back to ``pool`` (released by every reader, or lease expired).
    ``curve``: CurveZMQ keys; without them a server bound beyond loopback warns.
    ``limits``: per-session quotas and the maximum lease
    (:class:`~kvtransfer.control.sessions.Limits`; default ``Limits()``).
    """

    def __init__(self, endpoint: str, *, engine: Engine, regions: Sequence[Region], layout: KVLayout,
                 compat: CompatInfo, pool: BlockPool, on_submit: Callable[[PrefillRequest], None],
                 lease_s: float = 10.0, curve: CurveServerKeys | None = None, name: str = "prefill",
                 registry=None, on_freed: Callable[[str], None] | None = None, limits: Limits | None = None):
        if not 0.05 <= lease_s <= 86400:
            raise InvalidArgumentError(f"lease_s must be in [0.05, 86400], got {lease_s}", op="control")
        if len(regions) != layout.num_regions:
            raise InvalidArgumentError(f"the layout spans {layout.num_regions} regions, {len(regions)} given",
                                       op="control")
        if pool.num_blocks != layout.num_blocks:
            raise InvalidArgumentError(f"pool of {pool.num_blocks} blocks for a layout of {layout.num_blocks}",
                                       op="control")
        self.limits = limits or Limits()
        self.limits.check(lease_s)
        self.layout = layout
        self.compat = compat
        self.pool = pool
        self.lease_s = lease_s
        self.name = name
        self._on_submit = on_submit
        self._on_freed = on_freed
        self._metrics = metrics_for(registry)
        self._engine = engine
        self._token_key = secrets.token_bytes(32) if curve else None  # tokens only with authenticated sessions
        self._welcome_parts = dict(engine=engine.descriptor.to_bytes(),
                                   regions=[r.descriptor.to_bytes() for r in regions])
        self._reqs: dict[str, _Req] = {}
        self._orphans: dict[str, _Req] = {}  # retired, but the application still holds the blocks
        self._tombstones: collections.OrderedDict[str, str] = collections.OrderedDict()
        # of retired requests: (readers, those that released), for late and repeated releases
        self._retired_by: dict[str, tuple[frozenset[bytes], frozenset[bytes]]] = {}
        self._sessions: dict[bytes, Session] = {}
        # Subscribes waiting for their request to open: request id -> {session ident: deadline}
        self._waiting: dict[str, dict[bytes, float]] = {}
        self._num_waiting = 0
        self._next_wait_deadline = float("inf")
        self._expired = 0
        self._errors = 0
        self._refusal_log = RateLimitedLog(log)
        self._next_prune = 0.0

        self._ctx = zmq.Context()
        self._auth = None
        sock = self._ctx.socket(zmq.ROUTER)
        try:
            sock.linger = 0
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished reader fails (and is logged)
            sock.setsockopt(zmq.MAXMSGSIZE, m.HARD_MAX_BYTES)
            sock.sndhwm = sock.rcvhwm = 100_000
            self._auth = curve.apply(self._ctx, sock) if curve else None
            _bind(sock, endpoint)
        except BaseException:
            # no loop owns the socket yet: close it here, or term() would wait for it forever
            sock.close(linger=0)
            self._stop_context()
            raise
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        warn_if_exposed(self.endpoint, curve)
        if curve:
            engine.require_tokens()
        self._loop = SocketLoop(sock, f"kvt-control-{name}", self._on_frames, self._on_tick,
                                tick_s=min(0.05, lease_s / 4), user_ids=curve is not None)
        self._closed = False
        self._loop.start()
        log.info("%s: control plane on %s (lease %.1f s%s)", name, self.endpoint, lease_s,
                 ", CURVE" if curve else "")

    # --- the application's side (any thread) -----------------------------------------

    def open_request(self, request_id: str, *, readers: int = 1, payload: bytes = b"",
                     timeout: float = 5.0) -> PrefillRequest:
        """Starts a request from the prefill side (decode workers :meth:`Subscribe` to it
        by id): the lease runs from now, so a reader must come within ``lease_s``."""
        handle = PrefillRequest(self, request_id, payload, readers)
        done = threading.Event()
        outcome: list[Exception | None] = [None]

        def create() -> None:
            try:
                outcome[0] = self._create(handle)
                if outcome[0] is None:
                    self._attach_waiting(request_id)  # before open_request returns
            finally:
                done.set()

        self._loop.call(create)
        if not done.wait(timeout):
            raise ControlError(f"open_request {request_id!r}: the control loop did not answer within {timeout} s",
                               code="timeout", op="open_request")
        if outcome[0] is not None:
            raise outcome[0]
        return handle

    def stats(self) -> m.Stats:
        """A snapshot of the pool and the leases (taken without the loop: approximate)."""
        return m.Stats(free_blocks=self.pool.num_free, used_blocks=self.pool.num_used,
                       pinned_requests=len(self._reqs) + len(self._orphans), leases_expired=self._expired,
                       errors=self._errors, sessions=len(self._sessions), waiting=self._num_waiting)

    def close(self, timeout: float = 5.0) -> None:
        """Tells subscribers the server is going away, cancels every request, stops."""
        if self._closed:
            return
        self._closed = True
        self._loop.call(self._shutdown)
        stopped = self._loop.stop(timeout)
        self._stop_context(term=stopped)

    def _stop_context(self, term: bool = True) -> None:
        if self._auth is not None:
            self._auth.stop()
        if term:
            self._ctx.term()
        else:  # the loop thread still holds its socket: term() would wait for it forever
            log.error("%s: leaving the control socket's context open", self.name)

    def __enter__(self) -> "ControlServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the loop thread: messages from readers ---------------------------------------

    def _on_frames(self, frames: list[bytes], user: str = "") -> None:
        ident, body = frames[0], frames[1:]
        try:
            msg = m.decode_to_prefill(body)
        except ControlError as e:
            return self._refuse(ident, e.code, str(e))
        if (session := self._sessions.get(ident)) is not None:
            session.last_heard = time.monotonic()
        elif not isinstance(msg, (m.Hello, m.Ping)):
            return self._refuse(ident, "no_handshake", f"{type(msg).__name__} before the handshake (send Hello first)",
                                getattr(msg, "request_id", ""))
        if isinstance(msg, m.Hello):
            return self._hello(ident, msg, user)
        handler = self._handlers.get(type(msg))
        handler(self, ident, msg)

    def _hello(self, ident: bytes, msg: m.Hello, user: str) -> None:
        fields = compat_problems(self.compat, msg.compat)
        try:
            EngineDescriptor.from_bytes(msg.engine)
            if not fields:
                check_compatible(self.layout, msg.layout)
        except LayoutMismatchError as e:
            fields = e.fields
        except InvalidArgumentError as e:
            return self._refuse(ident, "malformed", f"Hello: {e}")
        if fields:
            names = ", ".join(f"{n} (ours {a!r}, yours {b!r})" for n, a, b in fields)
            return self._refuse(ident, "incompatible", f"KV caches do not match: {names}",
                                fields=[(n, str(a), str(b)) for n, a, b in fields])
        if ident not in self._sessions:  # a repeated Hello keeps the session and its requests
            if len(self._sessions) >= self.limits.max_sessions:
                self._prune(time.monotonic())
            if len(self._sessions) >= self.limits.max_sessions:
                self._metrics.limit_refusals.labels("max_sessions").inc()
                return self._refuse(ident, "too_many_sessions", f"{len(self._sessions)} sessions are open, "
                                    f"the limit; try again later")
            session = Session(ident, session_name(msg.name, ident), time.monotonic(), user=user)
            if self._token_key is not None:
                session.token = hmac.new(self._token_key, user.encode() + b"\0" + ident, hashlib.sha256).digest()
                self._engine.allow_token(session.token)  # until the session is dropped
            self._sessions[ident] = session
            self._metrics.sessions.set(len(self._sessions))
        self._send(ident, m.Welcome(layout=self.layout, compat=self.compat, lease_s=self.lease_s, name=self.name,
                                    token=self._sessions[ident].token or b"", **self._welcome_parts))

    def _submit(self, ident: bytes, msg: m.Submit) -> None:
        if (over := self._over_quota(self._sessions[ident], 0)) is not None:
            return self._refuse_limit(ident, over, f"Submit of {msg.request_id!r}", msg.request_id)
        handle = PrefillRequest(self, msg.request_id, msg.payload, msg.readers)
        problem = self._create(handle, subscriber=ident)
        if problem is not None:
            return self._refuse(ident, problem.code, str(problem), msg.request_id)
        try:
            self._on_submit(handle)
        except Exception as e:  # the application said no: nothing was pinned yet
            log.warning("%s: request %r rejected: %s", self.name, msg.request_id, e)
            req = self._reqs[msg.request_id]
            req.outcome = m.Failed(request_id=msg.request_id, code="rejected", message=str(e)[:4000])
            self._send(ident, req.outcome)
            self._retire(msg.request_id, "rejected")
        self._attach_waiting(msg.request_id)  # a rejected id refuses them as retired

    def _create(self, handle: PrefillRequest, subscriber: bytes | None = None) -> ControlError | None:
        rid = handle.request_id
        if rid in self._reqs or rid in self._orphans or rid in self._tombstones:
            return ControlError(f"request id {rid!r} is already in use", code="duplicate_request")
        if self._closed:
            return ControlError("the server is shutting down", code="shutting_down")
        now = time.monotonic()
        req = _Req(handle=handle, deadline=now + self.lease_s, max_deadline=now + self.limits.max_lease_s)
        if subscriber is not None:
            req.subscribers.append(subscriber)
            self._sessions[subscriber].requests.add(rid)
        self._reqs[rid] = req
        return None

    def _subscribe(self, ident: bytes, msg: m.Subscribe) -> None:
        rid = msg.request_id
        known = rid in self._reqs or rid in self._orphans or rid in self._tombstones
        if msg.wait_s > 0 and not known and not self._closed:
            return self._wait_for_open(ident, rid, msg.wait_s)
        req = self._live(ident, rid, "Subscribe")
        if req is None:
            return
        if ident not in req.subscribers:
            if len(req.subscribers) >= req.handle.readers:
                # one more reader than releases expected: the blocks could be freed under it
                return self._refuse(ident, "not_owner", f"Subscribe: request {msg.request_id!r} belongs to "
                                    f"{self._owners(req.subscribers)}: its {req.handle.readers} reader slot(s) are "
                                    f"taken", msg.request_id)
            if (over := self._over_quota(self._sessions[ident], len(req.blocks or ()))) is not None:
                return self._refuse_limit(ident, over, f"Subscribe to {msg.request_id!r}", msg.request_id)
            req.subscribers.append(ident)
            self._sessions[ident].requests.add(msg.request_id)
        req.deadline = min(time.monotonic() + self.lease_s, req.max_deadline)
        # replay what was published before this reader joined, then it gets the rest live
        if req.blocks is not None:
            self._send(ident, m.Pinned(request_id=msg.request_id, blocks=req.blocks, num_tokens=req.num_tokens))
        if req.layers:
            self._send(ident, m.Manifest(request_id=msg.request_id, layers=req.layers))
        if req.outcome is not None:
            self._send(ident, req.outcome)

    def _renew(self, ident: bytes, msg: m.Renew) -> None:
        deadline = time.monotonic() + self.lease_s
        lost, refused = [], []
        for rid in msg.request_ids:
            req = self._reqs.get(rid)
            if req is None:
                if ident not in self._waiting.get(rid, ()):  # a waiting Subscribe has no lease yet
                    lost.append(rid)
            elif ident not in req.subscribers:
                refused.append(rid)
            else:
                req.deadline = min(deadline, req.max_deadline)
        if refused:
            self._refused_metric("not_owner")
            self._log_refusal(ident, "not_owner", f"Renew of {len(refused)} requests of other sessions, e.g. "
                                                  f"{refused[0]!r}")
        self._send(ident, m.Renewed(lease_s=self.lease_s, lost=lost, refused=refused))

    def _release(self, ident: bytes, msg: m.Release) -> None:
        rid = msg.request_id
        req = self._reqs.get(rid)
        if req is None and ident in self._waiting.get(rid, ()):  # the reader gave up waiting
            self._stop_waiting(rid, ident)
            return self._send(ident, m.Released(request_id=rid, valid=True, message="was not open; stopped waiting"))
        if req is None:
            why = self._tombstones.get(rid)
            readers, released_by = self._retired_by.get(rid, (frozenset(), frozenset()))
            if why and ident not in readers:
                return self._refuse(ident, "not_owner", f"Release: request {rid!r} belonged to other sessions",
                                    rid)
            if why == "expired":
                return self._send(ident, m.Released(
                    request_id=rid, valid=False,
                    message=f"the lease expired before this release (no renewal for {self.lease_s} s): the blocks "
                            f"may have been reused while read"))
            if why == "released" and ident in released_by:  # a repeat: the first answer stands
                return self._send(ident, m.Released(request_id=rid, valid=True, message="already released"))
            return self._refuse(ident, "unknown_request", f"Release of request {rid!r}, which is "
                                f"{'already ' + why if why else 'unknown'}", rid)
        if ident not in req.subscribers:
            return self._refuse(ident, "not_owner", f"Release: request {rid!r} belongs to "
                                f"{self._owners(req.subscribers)}", rid)
        req.released_by.add(ident)
        self._send(ident, m.Released(request_id=rid, valid=True))
        log.info("%s: request %r: %d bytes read by %s over %s", self.name, rid, msg.nbytes,
                 self._sessions[ident].name, msg.transport or "?")
        if len(req.released_by) >= req.handle.readers:
            self._retire(rid, "released")

    def _ping(self, ident: bytes, msg: m.Ping) -> None:
        self._send(ident, m.Pong(nonce=msg.nonce))

    def _stats(self, ident: bytes, msg: m.StatsQuery) -> None:
        self._send(ident, self.stats())

    _handlers = {m.Submit: _submit, m.Subscribe: _subscribe, m.Renew: _renew,
                 m.Release: _release, m.Ping: _ping, m.StatsQuery: _stats}

    def _pinned_by(self, session: Session) -> int:
        return sum(len(r.blocks or ()) for rid in session.requests if (r := self._reqs.get(rid)) is not None)

    def _over_quota(self, session: Session, more_blocks: int) -> tuple[str, str] | None:
        """(limit, why) if ``session`` may not take one more request of ``more_blocks``."""
        if len(session.requests) >= self.limits.session_requests:
            return "session_requests", f"{session.name} has {len(session.requests)} open requests, the limit"
        quota = self.limits.session_blocks
        if quota is not None and (pinned := self._pinned_by(session)) + max(more_blocks, 1) > quota:
            more = f" + {more_blocks}" if more_blocks else ""
            return "session_blocks", f"{session.name} holds {pinned} pinned blocks{more}, its quota is {quota}"
        return None

    def _refuse_limit(self, ident: bytes, over: tuple[str, str], what: str, rid: str) -> None:
        limit, why = over
        self._metrics.limit_refusals.labels(limit).inc()
        self._refuse(ident, "quota_exceeded", f"{what}: {why}", rid)

    def _owners(self, idents: list[bytes]) -> str:
        names = [s.name if (s := self._sessions.get(i)) else i.hex()[-8:] for i in idents]
        return f"session{'s' if len(names) > 1 else ''} {', '.join(names)}" if names else "no session"

    def _wait_for_open(self, ident: bytes, rid: str, wait_s: float) -> None:
        session = self._sessions[ident]
        waiters = self._waiting.get(rid, {})
        if ident not in waiters:  # a repeated Subscribe only moves the deadline
            if (over := self._over_wait_quota(session)) is not None:
                return self._refuse_limit(ident, over, f"Subscribe to {rid!r} (not open yet)", rid)
            self._waiting[rid] = waiters
            session.waiting.add(rid)
            self._num_waiting += 1
            self._metrics.waiting.set(self._num_waiting)
        waiters[ident] = deadline = time.monotonic() + wait_s
        self._next_wait_deadline = min(self._next_wait_deadline, deadline)

    def _over_wait_quota(self, session: Session) -> tuple[str, str] | None:
        """(limit, why) if ``session`` may not start one more wait."""
        if len(session.waiting) >= self.limits.session_waits:
            return "session_waits", f"{session.name} has {len(session.waiting)} Subscribes waiting, the limit"
        if self._num_waiting >= self.limits.max_waits:
            return "max_waits", f"{self._num_waiting} Subscribes are waiting, the limit"
        return None

    def _stop_waiting(self, rid: str, ident: bytes) -> None:
        waiters = self._waiting[rid]
        del waiters[ident]
        if not waiters:
            del self._waiting[rid]
        if (session := self._sessions.get(ident)) is not None:
            session.waiting.discard(rid)
        self._num_waiting -= 1
        self._metrics.waiting.set(self._num_waiting)

    def _attach_waiting(self, rid: str) -> None:
        """``rid`` opened (or was retired at once): its waiting Subscribes go on as if sent now."""
        for ident in list(self._waiting.get(rid, ())):
            self._stop_waiting(rid, ident)
            self._subscribe(ident, m.Subscribe(request_id=rid))

    def _expire_waits(self, now: float) -> None:
        expired = [(rid, ident) for rid, waiters in self._waiting.items() for ident, d in waiters.items() if d <= now]
        for rid, ident in expired:
            self._stop_waiting(rid, ident)
            self._refuse(ident, "unknown_request", f"Subscribe: request {rid!r} is unknown (not opened within the "
                         f"Subscribe's wait)", rid)
        self._next_wait_deadline = min((d for w in self._waiting.values() for d in w.values()), default=float("inf"))

    def _live(self, ident: bytes, rid: str, what: str) -> _Req | None:
        req = self._reqs.get(rid)
        if req is None:
            why = self._tombstones.get(rid)
            code = "lease_expired" if why == "expired" else "unknown_request"
            self._refuse(ident, code, f"{what}: request {rid!r} is {why or 'unknown'}", rid)
        return req

    # --- the loop thread: the application's calls -------------------------------------

    def _find(self, rid: str) -> _Req | None:
        return self._reqs.get(rid) or self._orphans.get(rid)

    def _pin(self, rid: str, blocks: list[int], num_tokens: int) -> None:
        req = self._find(rid)
        if req is None:  # cannot happen through PrefillRequest; keep the pool whole anyway
            log.error("%s: pin for unknown request %r; freeing its blocks", self.name, rid)
            self.pool.free(blocks)
            return
        over = None if req.retired else self._pin_over_quota(req, len(blocks))
        req.blocks, req.num_tokens = blocks, num_tokens
        self._metrics.pinned_blocks.inc(len(blocks))
        if over is not None:
            self._metrics.limit_refusals.labels("session_blocks").inc()
            log.warning("%s: request %r: %s; failing it", self.name, rid, over)
            self._publish(req, m.Failed(request_id=rid, code="quota_exceeded", message=over))
            self._retire(rid, "quota_exceeded")
        elif not req.retired:
            req.deadline = min(time.monotonic() + self.lease_s, req.max_deadline)
            self._publish(req, m.Pinned(request_id=rid, blocks=blocks, num_tokens=num_tokens))

    def _pin_over_quota(self, req: _Req, nblocks: int) -> str | None:
        """Why pinning ``nblocks`` for ``req`` would take one of its readers over quota."""
        quota = self.limits.session_blocks
        for ident in req.subscribers if quota is not None else ():
            session = self._sessions.get(ident)
            if session is not None and (pinned := self._pinned_by(session)) + nblocks > quota:
                return f"{nblocks} blocks would take {session.name} to {pinned + nblocks}, over its quota of {quota}"
        return None

    def _layers(self, rid: str, layers: list[int]) -> None:
        req = self._find(rid)
        if req is None or req.retired:
            return
        new = [x for x in layers if x not in req.layers]
        if new:
            req.layers.extend(new)
            self._publish(req, m.Manifest(request_id=rid, layers=new))

    def _end(self, rid: str, outcome: m.Finished | m.Failed) -> None:
        req = self._find(rid)
        if req is None:
            return
        req.outcome = outcome
        if req.retired:
            self._free(self._orphans.pop(rid))
        else:
            self._publish(req, outcome)

    # --- the loop thread: lifetimes ----------------------------------------------------

    def _on_tick(self, now: float) -> None:
        if now >= self._next_prune:
            self._prune(now)
            self._next_prune = now + min(1.0, self.limits.session_idle_s / 4)
        if now >= self._next_wait_deadline:
            self._expire_waits(now)
        for rid in [rid for rid, r in self._reqs.items() if r.deadline < now]:
            req = self._reqs[rid]
            self._expired += 1
            self._metrics.leases_expired.inc()
            if req.deadline >= req.max_deadline:
                self._metrics.limit_refusals.labels("max_lease").inc()
                why = f"held for the maximum lease of {self.limits.max_lease_s} s"
            else:
                why = f"no renewal for {self.lease_s} s"
            log.warning("%s: lease of request %r expired (%d/%d readers released, %s); reclaiming %d blocks",
                        self.name, rid, len(req.released_by), req.handle.readers, why, len(req.blocks or ()))
            self._publish(req, m.Failed(request_id=rid, code="lease_expired",
                                        message=f"{why}; the blocks are reclaimed"))
            self._retire(rid, "expired")

    def _prune(self, now: float) -> None:
        """Drops the sessions silent for ``session_idle_s`` that hold no request (the
        leases of those that do run out first, since nobody renews them)."""
        silent = [s for s in self._sessions.values()
                  if now - s.last_heard > self.limits.session_idle_s and not s.requests]
        for session in silent:
            for rid in list(session.waiting):
                self._stop_waiting(rid, session.ident)
            del self._sessions[session.ident]
            self._revoke(session)
        if silent:
            self._metrics.sessions_expired.inc(len(silent))
            self._metrics.sessions.set(len(self._sessions))
            log.info("%s: dropped %d sessions silent for %.0f s (e.g. %s); %d remain", self.name, len(silent),
                     self.limits.session_idle_s, silent[0].name, len(self._sessions))

    def _revoke(self, session: Session) -> None:
        if session.token is None:
            return
        try:
            dropped = self._engine.revoke_token(session.token)
        except KVTransferError as e:  # the engine closed first: its server and tokens are gone anyway
            log.info("%s: token of %s not revoked: %s", self.name, session.name, e)
            return
        if dropped:
            log.info("%s: %s's token revoked; %d data connections dropped", self.name, session.name, dropped)

    def _retire(self, rid: str, why: str) -> None:
        """No reader needs the blocks anymore: free them now, or when the application is done."""
        req = self._reqs.pop(rid)
        req.retired = True
        req.handle._cancelled.set()
        for ident in req.subscribers:
            if (session := self._sessions.get(ident)) is not None:
                session.requests.discard(rid)
        self._remember(rid, why, req.subscribers, req.released_by)
        if req.app_done:
            self._free(req)
        else:
            self._orphans[rid] = req

    def _free(self, req: _Req) -> None:
        if req.blocks:
            self.pool.free(req.blocks)
            self._metrics.pinned_blocks.dec(len(req.blocks))
            req.blocks = None
        if self._on_freed is not None:
            try:
                self._on_freed(req.handle.request_id)
            except Exception:  # the application's bug must not stop the loop
                log.exception("%s: on_freed(%r) raised", self.name, req.handle.request_id)

    def _remember(self, rid: str, why: str, readers: list[bytes] = (), released_by: set[bytes] = frozenset()
                  ) -> None:
        self._tombstones[rid] = why
        if readers:
            self._retired_by[rid] = (frozenset(readers), frozenset(released_by))
        while len(self._tombstones) > _TOMBSTONES:
            old, _ = self._tombstones.popitem(last=False)
            self._retired_by.pop(old, None)

    def _shutdown(self) -> None:
        for rid in list(self._reqs):
            self._publish(self._reqs[rid], m.Failed(request_id=rid, code="shutting_down",
                                                    message=f"{self.name} is shutting down"))
            self._retire(rid, "shutting_down")
        for rid, waiters in list(self._waiting.items()):
            for ident in list(waiters):
                self._stop_waiting(rid, ident)
                self._refuse(ident, "shutting_down", f"{self.name} is shutting down", rid)
        for session in self._sessions.values():
            self._revoke(session)

    # --- the loop thread: sending --------------------------------------------------------

    def _publish(self, req: _Req, msg) -> None:
        frames = m.encode(msg)
        for ident in req.subscribers:
            self._loop.send_now([ident, *frames])

    def _send(self, ident: bytes, msg) -> None:
        self._loop.send_now([ident, *m.encode(msg)])

    def _refuse(self, ident: bytes, code: str, message: str, request_id: str = "",
                fields: list[tuple[str, str, str]] | None = None) -> None:
        self._refused_metric(code)
        self._log_refusal(ident, code, message)
        self._send(ident, m.Error(code=code, message=message[:4000], request_id=request_id[:256],
                                  fields=fields or []))

    def _refused_metric(self, code: str) -> None:
        self._errors += 1
        self._metrics.errors.labels("prefill", code).inc()

    def _log_refusal(self, ident: bytes, code: str, message: str) -> None:
        who = s.name if (s := self._sessions.get(ident)) else ident.hex()[-8:]
        self._refusal_log.warning("%s: refused a message from %s: %s: %s", self.name, who, code, message[:200])
