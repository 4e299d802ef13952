"""The decode side of the control plane: one session with one prefill worker.

    with ControlClient(prefill_endpoint, engine=eng, regions=[region], layout=layout,
                       compat=CompatInfo.of(layout, "my-model")) as client:
        pull = client.pull("req-1", dst_blocks, payload=prompt_bytes)   # Submit
        pull.wait_layer(0, timeout=5)        # layer 0 is in place; prefill may still compute
        first_token = pull.wait(timeout=30)  # every layer in place and the release confirmed

The constructor does the handshake (refused with :class:`ControlError` ``incompatible``
naming the differing fields) and connects the transfer engine to the prefill worker's.
Each layer is read as soon as its manifest arrives, so reading layer i overlaps the
computation of layer i+1. A pull succeeds only after the prefill side confirmed the
release with the lease still held: a read that may have overlapped reuse of the blocks
raises :class:`LeaseExpiredError`, never returns. Whatever fails, a pull ends only once
nothing writes its destination blocks anymore, and releases the prefill side's blocks
when the prefill side can still hear it.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
import time
from typing import Callable, Sequence

import zmq

from ..descriptors import EngineDescriptor, RegionDescriptor
from ..engine import Engine, Region
from ..errors import ControlError, InvalidArgumentError, LeaseExpiredError, PeerLostError, TransferTimeoutError
from ..kv import CompatInfo, KVLayout, assign_heads, check_compatible
from . import messages as m
from .loop import SocketLoop
from .metrics import metrics_for
from .pull import Pull, PullContext
from .security import CurveClientKeys

log = logging.getLogger("kvtransfer.control")

#: request ids per Renew message (the bound messages.Renew puts on its list)
_RENEW_BATCH = 4096


class ControlClient:
    """A session with one prefill worker's control plane (see the module docs).

    ``regions``/``layout``: the local KV pool that pulls write into. ``timeout``: a
    prefill side silent for this long is lost (handshake included): its pulls fail with
    :class:`PeerLostError`. ``transport`` forces the engine's transport.
    """

    def __init__(self, endpoint: str, *, engine: Engine, regions: Sequence[Region], layout: KVLayout,
                 compat: CompatInfo, timeout: float = 10.0, curve: CurveClientKeys | None = None,
                 name: str = "decode", transport: str | None = None, registry=None):
        if not 0.05 <= timeout <= 3600:
            raise InvalidArgumentError(f"timeout must be in [0.05, 3600] s, got {timeout}", op="control")
        if len(regions) != layout.num_regions:
            raise InvalidArgumentError(f"the layout spans {layout.num_regions} regions, {len(regions)} given",
                                       op="control")
        self.endpoint = endpoint
        self.layout = layout
        self.compat = compat
        self.regions = list(regions)
        self.name = name
        self.timeout = timeout
        self._metrics = metrics_for(registry)
        self._pulls: dict[str, Pull] = {}
        self._pulls_lock = threading.Lock()  # pull() adds from any thread; the loop removes
        self._waiters: list[_Waiter] = []  # FIFO
        self._nonces = itertools.count(1)  # 0 is the heartbeat's: a ping never takes its Pong
        self._lost = False
        self._last_heard = time.monotonic()
        self._last_renew = 0.0
        self._last_sent = 0.0
        self._closed = False
        self._forced_transport = transport
        self.peer = None

        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.DEALER)
        try:
            sock.linger = 0
            sock.setsockopt(zmq.MAXMSGSIZE, m.HARD_MAX_BYTES)
            sock.sndhwm = sock.rcvhwm = 100_000
            if curve:
                curve.apply(sock)
            sock.connect(endpoint)
        except BaseException:
            # no loop owns the socket yet: close it here, or term() would wait for it forever
            sock.close(linger=0)
            self._ctx.term()
            raise
        self._transfer_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._heartbeat_s = min(1.0, timeout / 4)
        self._loop = SocketLoop(sock, f"kvt-control-{name}", self._on_frames, self._on_tick,
                                tick_s=min(0.05, self._heartbeat_s))
        self._loop.watch_fd(self._transfer_fd, self._on_transfers)
        self._loop.start()
        try:
            self._handshake(engine)
        except BaseException:
            self.close()
            raise

    # --- setup -------------------------------------------------------------------------

    def _handshake(self, engine: Engine) -> None:
        t0 = time.monotonic()
        reply = self._request(m.Hello(engine=engine.descriptor.to_bytes(), layout=self.layout, compat=self.compat,
                                      name=self.name), (m.Welcome,), "handshake", self.timeout)
        self.remote_layout: KVLayout = reply.layout
        self.remote_name = reply.name
        self.lease_s = reply.lease_s
        #: with CURVE, the data plane token this session got: the prefill engine's tcp
        #: server admits only connections that present it
        self.token: bytes | None = reply.token or None
        check_compatible(self.remote_layout, self.layout)
        self.remote_regions = [RegionDescriptor.from_bytes(b) for b in reply.regions]
        remote_engine = EngineDescriptor.from_bytes(reply.engine)
        self.peer = engine.connect(remote_engine, transport=self._forced_transport, token=self.token)
        self.handshake_s = time.monotonic() - t0
        self._pull_ctx = PullContext(
            name=self.name, layout=self.layout, remote_layout=self.remote_layout, regions=self.regions,
            remote_regions=self.remote_regions, peer=self.peer, transfer_fd=self._transfer_fd,
            handshake_s=self.handshake_s, call=self._loop.call, send=self._send, lost=lambda: self._lost,
            ended=self._pull_ended)
        self._metrics.handshake.observe(self.handshake_s)
        log.info("%s: session with %s at %s, transport %s, lease %.1f s", self.name, self.remote_name,
                 self.endpoint, self.peer.transport, self.lease_s)

    @property
    def transport(self) -> str:
        return self.peer.transport if self.peer else ""

    @property
    def lost(self) -> bool:
        """True once the prefill side stopped answering (this session is over)."""
        return self._lost

    # --- the caller's side -------------------------------------------------------------

    def pull(self, request_id: str, dst_blocks: Sequence[int], *, payload: bytes | None = None, readers: int = 1,
             heads: tuple[int, int] | None = None, timeout: float | None = None, skip_blocks: int = 0,
             wait_s: float = 0.0, expect: tuple[Sequence[int], int] | None = None) -> Pull:
        """Starts pulling request ``request_id`` into local blocks ``dst_blocks`` (token
        order). With ``payload`` it submits the request (the prefill side computes it);
        without, it subscribes to a request the prefill side already has (everything
        published so far is replayed). ``heads``: the global KV heads to take from this
        prefill worker (tensor-parallel mixes; default all of ours). ``timeout``: the
        pull fails with TransferTimeoutError if not done by then. ``skip_blocks``: the
        request's first blocks are not read (the decode side has that prefix already);
        ``dst_blocks`` then start at the prefill side's block ``skip_blocks``. ``wait_s``
        (subscribing only, at most 60 s): a request the prefill side has not opened yet is
        waited for this long before the pull fails ``unknown_request``. ``expect``: the
        prefill side's ``(block ids, tokens)`` if known (e.g. from its kv_transfer_params):
        the reads are planned right after the Subscribe goes, while its answer is on the way."""
        self._require_usable()
        dst = [int(b) for b in dst_blocks]
        bad = [b for b in dst if not 0 <= b < self.layout.num_blocks]
        if bad:
            raise InvalidArgumentError(f"pull {request_id!r}: local block ids {bad[:8]} outside the pool of "
                                       f"{self.layout.num_blocks}", op="pull")
        deadline = time.monotonic() + timeout if timeout is not None else None
        if skip_blocks < 0:
            raise InvalidArgumentError(f"pull {request_id!r}: skip_blocks must be >= 0, got {skip_blocks}", op="pull")
        if not 0 <= wait_s <= m.MAX_SUBSCRIBE_WAIT_S or (wait_s and payload is not None):
            raise InvalidArgumentError(f"pull {request_id!r}: wait_s must be in [0, {m.MAX_SUBSCRIBE_WAIT_S}] and "
                                       f"only when subscribing (no payload), got {wait_s}", op="pull")
        p = Pull(self._pull_ctx, request_id, dst, heads, deadline, skip_blocks, waits=wait_s > 0)
        msg = (m.Submit(request_id=request_id, payload=payload, readers=readers) if payload is not None
               else m.Subscribe(request_id=request_id, wait_s=float(wait_s)))
        frames = m.encode(msg)  # once: checked here, sent by the loop
        if len(frames[1]) > m.MAX_MESSAGE_BYTES:
            raise InvalidArgumentError(f"pull {request_id!r}: payload of {len(payload or b'')} bytes exceeds the "
                                       f"control plane's {m.MAX_MESSAGE_BYTES}-byte messages", op="pull")
        # registered here (not on the loop thread) so that pull() returns without a
        # round trip through the loop: the loop only sends
        with self._pulls_lock:
            if request_id in self._pulls:
                raise InvalidArgumentError(f"pull {request_id!r} is already running here", op="pull")
            if self._lost:
                raise PeerLostError(f"{self.endpoint} stopped answering", op="pull")
            self._pulls[request_id] = p

        def send() -> None:
            p.sent = True
            self._send_frames(frames)
            if expect is not None:  # while the answer is on its way
                p.plan_ahead(*expect)

        self._loop.call(send)
        return p

    def ping(self, timeout: float | None = None) -> float:
        """One round trip to the prefill side, in seconds."""
        nonce = next(self._nonces) % 0x7FFFFFFF + 1
        t0 = time.perf_counter()
        self._request(m.Ping(nonce=nonce), (m.Pong,), "ping", timeout or self.timeout,
                      match=lambda pong: pong.nonce == nonce)
        return time.perf_counter() - t0

    def stats(self, timeout: float | None = None) -> m.Stats:
        """The prefill side's pool and lease counters."""
        return self._request(m.StatsQuery(), (m.Stats,), "stats", timeout or self.timeout)

    def close(self) -> None:
        """Fails the pulls still running (releasing their blocks), then closes."""
        if self._closed:
            return
        self._closed = True

        def abandon() -> None:
            for p in list(self._pulls.values()):
                p.fail(ControlError(f"{self.name} closed during the pull", code="closed", op="close"))

        self._loop.call(abandon)
        deadline = time.monotonic() + min(self.timeout, 5.0)
        while self._pulls and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._loop.stop():
            # the loop thread still runs and may use the eventfd and the peer; term() would
            # wait for its socket forever: leak them rather than hang
            log.error("%s: leaving the control socket's context, the peer and the transfer eventfd open",
                      self.name)
            return
        os.close(self._transfer_fd)
        if self.peer is not None:
            self.peer.close()
        self._ctx.term()

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ---------------------------------------------------------------------

    def _require_usable(self) -> None:
        if self._closed:
            raise InvalidArgumentError("control client is closed", errno=errno.EBADF, op="pull")
        if self._lost:
            raise PeerLostError(f"{self.endpoint} stopped answering", op="pull")

    def _request(self, msg, expect: tuple[type, ...], what: str, timeout: float,
                 match: Callable[[object], bool] | None = None):
        """Sends a message that has one answer (no request id) and waits for it: the
        oldest waiter for a kind whose ``match`` (if any) accepts the answer takes it."""
        waiter = _Waiter(expect + (m.Error,), match)

        def register() -> None:
            self._waiters.append(waiter)
            self._send(msg)

        self._loop.call(register)
        if not waiter.ready.wait(timeout):
            # else a late answer would go to it, and every timed-out ping would stay here
            self._loop.call(lambda: self._forget(waiter))
            raise PeerLostError(f"{what}: no answer from {self.endpoint} within {timeout} s (is a prefill worker "
                                f"listening there? with CURVE, does it accept our key?)", op=what)
        reply = waiter.got
        if isinstance(reply, m.Error):
            raise ControlError(f"{what} refused by {self.endpoint}: {reply.code}: {reply.message}", code=reply.code,
                               op=what, fields=[tuple(f) for f in reply.fields])
        return reply

    def _forget(self, waiter: "_Waiter") -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)

    def _send(self, msg) -> None:
        self._send_frames(m.encode(msg))

    def _send_frames(self, frames: list[bytes]) -> None:
        self._last_sent = time.monotonic()
        self._loop.send_now(frames)

    def _on_frames(self, frames: list[bytes]) -> None:
        self._last_heard = time.monotonic()
        try:
            msg = m.decode_to_decode(frames)
        except ControlError as e:
            self._metrics.errors.labels("decode", e.code).inc()
            log.warning("%s: ignored a message from %s: %s", self.name, self.endpoint, e)
            return
        rid = getattr(msg, "request_id", "")
        pull = self._pulls.get(rid) if rid else None
        if isinstance(msg, m.Error) and pull is not None:
            return pull.on_refused(msg.code, msg.message)
        if rid and not isinstance(msg, m.Error):
            if pull is None:
                log.info("%s: %s for request %r that is not pulled here; ignored", self.name, type(msg).__name__, rid)
                return
            return pull.on_message(msg)
        if isinstance(msg, m.Renewed):
            for lost in msg.lost:
                if lost in self._pulls:
                    self._pulls[lost].fail(LeaseExpiredError(
                        f"{lost!r}: the prefill side no longer holds the blocks (lease expired)", op="renew"))
            for refused in msg.refused:
                if refused in self._pulls:
                    self._pulls[refused].fail(ControlError(
                        f"{refused!r}: the prefill side says it belongs to another session", code="not_owner",
                        op="renew"))
            return
        # an answer without a request id goes to the oldest request waiting for it
        for waiter in self._waiters:
            if waiter.takes(msg):
                self._waiters.remove(waiter)
                waiter.answer(msg)
                return
        if isinstance(msg, m.Error):
            log.warning("%s: error from %s: %s: %s", self.name, self.endpoint, msg.code, msg.message)

    def _on_transfers(self) -> None:
        try:
            os.eventfd_read(self._transfer_fd)
        except BlockingIOError:
            pass
        for p in list(self._pulls.values()):
            if p.reading:
                p.check_transfers()

    def _on_tick(self, now: float) -> None:
        if self._lost:
            return
        if now - self._last_heard > self.timeout:
            with self._pulls_lock:
                self._lost = True
                pulls = list(self._pulls.values())
            err = PeerLostError(f"{self.endpoint} silent for {now - self._last_heard:.1f} s (timeout {self.timeout} s)")
            log.warning("%s: %s", self.name, err)
            for p in pulls:
                p.fail(err)
            return
        for p in list(self._pulls.values()):
            if p.deadline is not None and now > p.deadline and p.error is None:
                p.fail(TransferTimeoutError(f"pull of {p.request_id!r} not done within its timeout", op="pull"))
        if self.peer is None:
            return  # heartbeats and renewals start after the handshake
        lease = self.lease_s
        # only requests the prefill side was told about: a pull registered by pull() whose
        # Submit is still queued for this thread would come back "lost" in Renewed
        with self._pulls_lock:
            renew = [rid for rid, p in self._pulls.items() if p.sent]
        if renew and now - self._last_renew > lease / 3:
            self._last_renew = now
            for i in range(0, len(renew), _RENEW_BATCH):
                self._send(m.Renew(request_ids=renew[i:i + _RENEW_BATCH]))
        elif now - self._last_sent > self._heartbeat_s:
            self._send(m.Ping())

    def _pull_ended(self, pull: Pull) -> None:
        with self._pulls_lock:
            self._pulls.pop(pull.request_id, None)
        err = pull.error
        outcome = "ok" if err is None else getattr(err, "code", type(err).__name__)
        self._metrics.pull_finished(pull.timings, outcome)


class _Waiter:
    """A request waiting for its one answer (an Error counts as one)."""

    def __init__(self, expect: tuple[type, ...], match: Callable[[object], bool] | None):
        self.expect = expect
        self.match = match
        self.got = None
        self.ready = threading.Event()

    def takes(self, msg) -> bool:
        return isinstance(msg, self.expect) and (self.match is None or isinstance(msg, m.Error) or self.match(msg))

    def answer(self, msg) -> None:
        self.got = msg
        self.ready.set()


def pull_sharded(clients: Sequence[ControlClient], request_id: str, dst_blocks: Sequence[int], *,
                 payload: bytes | None = None, timeout: float | None = None, wait_s: float = 0.0) -> list[Pull]:
    """Pulls one request from several prefill workers that each hold part of the KV
    heads (tensor parallel prefill): each local head is read from exactly one of them
    (:func:`kvtransfer.kv.assign_heads`). ``wait_s`` as in :meth:`ControlClient.pull`.
    Wait for every returned Pull."""
    layout = clients[0].layout
    heads = assign_heads(layout, [c.remote_layout for c in clients])
    return [c.pull(request_id, dst_blocks, payload=payload, heads=h, timeout=timeout, wait_s=wait_s)
            for c, h in zip(clients, heads) if h is not None]
