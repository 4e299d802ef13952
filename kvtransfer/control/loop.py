"""One thread that owns one ZeroMQ socket.

ZeroMQ sockets are not thread-safe, so each side of the control plane gives its socket
to a :class:`SocketLoop` thread; other threads hand it work with :meth:`call`, which
queues a function and wakes the loop through an eventfd. The loop also watches extra
file descriptors (the decode side's transfer-completion eventfd) and runs a tick
function at least every ``tick_s`` (leases, heartbeats, deadlines). An exception in a
handler is logged and the loop goes on: one bad message never stops a worker. With
``user_ids``, ``on_frames`` also gets the ZAP User-Id of the connection a message came
on (with CURVE: the client's public key, Z85; "" without ZAP).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Callable

import zmq

log = logging.getLogger("kvtransfer.control")

#: messages taken from the socket per wake-up before timers and queued calls get a turn
_RECV_BATCH = 256


class SocketLoop:
    def __init__(self, sock: zmq.Socket, name: str, on_frames: Callable[..., None],
                 on_tick: Callable[[float], None], tick_s: float, user_ids: bool = False):
        self._sock = sock
        self._user_ids = user_ids
        self._name = name
        self._on_frames = on_frames
        self._on_tick = on_tick
        self._tick_ms = max(1, int(tick_s * 1000))
        self._calls: "queue.SimpleQueue[Callable[[], None]]" = queue.SimpleQueue()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._fds: dict[int, Callable[[], None]] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def watch_fd(self, fd: int, handler: Callable[[], None]) -> None:
        """Calls ``handler`` on the loop thread whenever ``fd`` is readable (register
        before start)."""
        self._fds[fd] = handler

    def call(self, fn: Callable[[], None]) -> None:
        """Runs ``fn`` on the loop thread, soon (thread-safe)."""
        self._calls.put(fn)
        os.eventfd_write(self._wake, 1)

    def send_now(self, frames: list[bytes]) -> bool:
        """Sends on the loop thread; False (and a log line) if the peer is gone or its
        queue is full — the protocol's timeouts and leases deal with the consequences."""
        try:
            self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=len(frames[-1]) < 65536)
            return True
        except zmq.ZMQError as e:
            log.warning("%s: cannot send (%s); dropped", self._name, e)
            return False

    def stop(self, timeout: float = 5.0) -> bool:
        """Stops the thread (after the calls queued before this one) and closes the socket.
        False when the thread is still running at ``timeout`` (a handler stuck): then the
        socket and the eventfd stay open — closing them under the running thread would be
        worse — and the caller must not term the socket's context, which would wait for
        this socket forever."""
        if self._thread.is_alive():
            self.call(self._request_stop)
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("%s: loop thread did not stop within %.1f s; its socket stays open", self._name, timeout)
                return False
        self._sock.close(linger=0)
        os.close(self._wake)
        return True

    def _request_stop(self) -> None:
        self._stopping = True

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake, zmq.POLLIN)
        for fd in self._fds:
            poller.register(fd, zmq.POLLIN)
        next_tick = time.monotonic()
        while not self._stopping:
            wait_ms = max(0, int((next_tick - time.monotonic()) * 1000))
            events = dict(poller.poll(wait_ms))
            if events.get(self._wake):
                self._run_calls()
            if events.get(self._sock):
                self._receive()
            for fd, handler in self._fds.items():
                if events.get(fd):
                    self._guard(handler)
            now = time.monotonic()
            if now >= next_tick:
                self._guard(lambda: self._on_tick(now))
                next_tick = now + self._tick_ms / 1000

    def _run_calls(self) -> None:
        try:
            os.eventfd_read(self._wake)
        except BlockingIOError:
            pass
        while not self._stopping:
            try:
                fn = self._calls.get_nowait()
            except queue.Empty:
                return
            self._guard(fn)

    def _receive(self) -> None:
        for _ in range(_RECV_BATCH):
            try:  # zero-copy frames only where their metadata is wanted
                parts = self._sock.recv_multipart(flags=zmq.NOBLOCK, copy=not self._user_ids)
            except zmq.Again:
                return
            if self._user_ids:
                frames, user = [p.bytes for p in parts], _user_id(parts[-1])
                self._guard(lambda: self._on_frames(frames, user))
            else:
                self._guard(lambda: self._on_frames(parts))

    def _guard(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            log.exception("%s: handler failed; going on", self._name)


def _user_id(frame: zmq.Frame) -> str:
    try:
        return frame.get("User-Id") or ""
    except zmq.ZMQError:  # no ZAP handler on this connection
        return ""
