"""The prefill side's sessions: who holds what, and what one session may hold.

A session is one decode side's DEALER socket (its ZeroMQ routing id) after a
successful ``Hello``. Requests belong to the sessions that submitted or subscribed
to them; :class:`Limits` bounds what one session may hold (pinned blocks, open
requests, Subscribes waiting for a request to open), how long any request may stay
pinned however often it is renewed, how many sessions there may be, and how long a
silent session is kept. The table lives on the server's loop thread only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from ..errors import InvalidArgumentError


@dataclass(frozen=True)
class Limits:
    """What the prefill side grants; every field bounds one way a client could hog it.

    ``session_blocks``: pinned blocks one session may hold at once (None: the whole
    pool). ``session_requests``: requests one session may have open. ``max_lease_s``:
    the longest a request's blocks stay pinned from its submit, renewed or not.
    ``session_idle_s``: a session that sent nothing for this long (and holds no
    request) is dropped; decode sides send a heartbeat at least every second.
    ``max_sessions``: sessions at once; a Hello beyond it is refused. ``session_waits``
    / ``max_waits``: Subscribes waiting for their request to open, per session / in all."""
    session_blocks: int | None = None
    session_requests: int = 1024
    max_lease_s: float = 600.0
    session_idle_s: float = 60.0
    max_sessions: int = 1024
    session_waits: int = 256
    max_waits: int = 4096

    def check(self, lease_s: float) -> None:
        if self.session_blocks is not None and self.session_blocks < 1:
            raise InvalidArgumentError(f"session_blocks must be >= 1 or None, got {self.session_blocks}",
                                       op="control")
        if not 1 <= self.session_requests <= 1 << 20:
            raise InvalidArgumentError(f"session_requests must be in [1, 2**20], got {self.session_requests}",
                                       op="control")
        if not lease_s <= self.max_lease_s <= 7 * 86400:
            raise InvalidArgumentError(f"max_lease_s must be in [lease_s={lease_s}, 604800], got "
                                       f"{self.max_lease_s}", op="control")
        if not 0.1 <= self.session_idle_s <= 86400:
            raise InvalidArgumentError(f"session_idle_s must be in [0.1, 86400], got {self.session_idle_s}",
                                       op="control")
        if not 1 <= self.max_sessions <= 1 << 20:
            raise InvalidArgumentError(f"max_sessions must be in [1, 2**20], got {self.max_sessions}", op="control")
        if not 0 <= self.session_waits <= self.max_waits <= 1 << 20:
            raise InvalidArgumentError(f"need 0 <= session_waits <= max_waits <= 2**20, got {self.session_waits} and "
                                       f"{self.max_waits}", op="control")


@dataclass
class Session:
    """One decode side, as the prefill side knows it (loop thread only)."""
    ident: bytes   # the ZeroMQ routing id of its DEALER socket
    name: str      # what its Hello said (not authenticated) and the routing id, for logs and errors
    last_heard: float  # time.monotonic() of its last message
    user: str = ""     # with CURVE, its public key (Z85) as the ZAP handler authenticated it
    token: bytes | None = None  # with CURVE, the data plane token minted for it
    requests: set[str] = field(default_factory=set)  # open requests it submitted or subscribed to
    waiting: set[str] = field(default_factory=set)   # request ids its Subscribes wait to see opened


def session_name(hello_name: str, ident: bytes) -> str:
    """How errors and logs name a session: ``decode-3 (a1b2c3d4)``."""
    return f"{hello_name or 'unnamed'} ({ident.hex()[-8:]})"


class RateLimitedLog:
    """At most ``burst`` lines per ``window_s`` seconds; the rest are counted and
    summed up in one line when the next window opens, so a client that sends garbage
    in a loop cannot fill the disk."""

    def __init__(self, logger: logging.Logger, burst: int = 20, window_s: float = 10.0):
        self._log = logger
        self._burst = burst
        self._window_s = window_s
        self._window_start = float("-inf")
        self._lines = 0
        self.suppressed = 0  # in the current window

    def warning(self, fmt: str, *args: object) -> bool:
        """Logs unless over the limit; True if it did."""
        now = time.monotonic()
        if now - self._window_start >= self._window_s:
            if self.suppressed:
                self._log.warning("%d more refused messages in the last %.0f s were not logged", self.suppressed,
                                  now - self._window_start)
            self._window_start, self._lines, self.suppressed = now, 0, 0
        if self._lines >= self._burst:
            self.suppressed += 1
            return False
        self._lines += 1
        self._log.warning(fmt, *args)
        return True
