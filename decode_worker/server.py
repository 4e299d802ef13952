"""Serves the decode worker's ASGI app (:mod:`.http`) with uvicorn, in a thread of its own.

uvicorn gives the limits a front door needs: the idle keep-alive timeout, a cap on
connections (``limit_concurrency``: beyond it, requests get 503), a bounded header size
(h11's incomplete-event limit: 400), and one event loop instead of a thread per client.
It has no deadline for a request still arriving, so :class:`_Protocol` adds two: its
headers must be complete within ``header_timeout`` of the connection (or of the last
response), its body within ``body_timeout`` of the headers; a client that misses either
is answered 408 (when no response has begun) and disconnected.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from dataclasses import dataclass

import h11
import uvicorn
from prometheus_client import Counter
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("decode_worker")

TIMED_OUT = Counter("kvtransfer_http_read_timeouts", "Connections dropped for a request not sent in time",
                    ["phase"])
_408 = b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain\r\nContent-Length: 26\r\nConnection: close\r\n" \
       b"\r\nthe request came too slow\n"


@dataclass(frozen=True)
class ServerLimits:
    """Seconds and counts that bound what clients can hold."""
    header_timeout: float = 10.0   # connection (or last response) -> headers complete
    body_timeout: float = 30.0     # headers -> body complete
    keep_alive: float = 5.0        # an idle connection between requests
    max_connections: int = 512     # open connections; beyond: 503
    backlog: int = 1024            # the listen() queue


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol with deadlines on reading a request (see the module's doc)."""

    limits: ServerLimits  # set on the subclass made by :func:`make_server`

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._phase = ""
        self._arm("headers", self.limits.header_timeout)

    def _arm(self, phase: str, delay: float) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._phase = phase
        self._deadline = self.loop.call_later(delay, self._expired) if phase else None

    def handle_events(self) -> None:
        super().handle_events()
        state = self.conn.their_state
        if self._phase == "headers" and state is not h11.IDLE:
            self._arm("body" if state is h11.SEND_BODY else "", self.limits.body_timeout)
        elif self._phase == "body" and state is not h11.SEND_BODY:
            self._arm("", 0)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm("headers", self.limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._arm("", 0)
        super().connection_lost(exc)

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        TIMED_OUT.labels(self._phase).inc()
        log.info("%s: %s not complete in time; disconnecting", self.client, self._phase)
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):  # no byte of a response sent yet
            self.transport.write(_408)
        self.transport.close()


class Server:
    """uvicorn serving ``app`` on an already bound socket, in a daemon thread.
    ``address``: the (host, port) it listens on. :meth:`close` stops it, bounded."""

    def __init__(self, app, host: str, port: int, limits: ServerLimits = ServerLimits()):
        protocol = type("DecodeHTTPProtocol", (_Protocol,), {"limits": limits})
        self._sock = socket.create_server((host, port), backlog=limits.backlog, reuse_port=False)
        self.address = self._sock.getsockname()[:2]
        config = uvicorn.Config(app, http=protocol, lifespan="off", log_config=None, access_log=False,
                                timeout_keep_alive=limits.keep_alive,  # type: ignore[arg-type]
                                limit_concurrency=limits.max_connections, backlog=limits.backlog,
                                timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, name="http",
                                        daemon=True)
        self._thread.start()

    def close(self, timeout: float = 15.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the HTTP server did not stop in %.0f s", timeout)
        self._sock.close()
