"""The prefill side's sessions: who holds what, and what one session may hold.

A session is one decode side's DEALER socket (its ZeroMQ routing id) after a
successful ``Hello``. Requests belong to the sessions that submitted or subscribed
to them; :class:`Limits` bounds what one session may hold (pinned blocks, open
requests) and how long any request may stay pinned however often it is renewed. The
table lives on the server's loop thread only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InvalidArgumentError


@dataclass(frozen=True)
class Limits:
    """What the prefill side grants; every field bounds one way a client could hog it.

    ``session_blocks``: pinned blocks one session may hold at once (None: the whole
    pool). ``session_requests``: requests one session may have open. ``max_lease_s``:
    the longest a request's blocks stay pinned from its submit, renewed or not.
    """
    session_blocks: int | None = None
    session_requests: int = 1024
    max_lease_s: float = 600.0

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


@dataclass
class Session:
    """One decode side, as the prefill side knows it (loop thread only)."""
    ident: bytes   # the ZeroMQ routing id of its DEALER socket
    name: str      # what its Hello said (not authenticated) and the routing id, for logs and errors
    requests: set[str] = field(default_factory=set)  # open requests it submitted or subscribed to


def session_name(hello_name: str, ident: bytes) -> str:
    """How errors and logs name a session: ``decode-3 (a1b2c3d4)``."""
    return f"{hello_name or 'unnamed'} ({ident.hex()[-8:]})"
