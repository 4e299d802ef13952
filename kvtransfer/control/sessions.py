"""The prefill side's sessions: who holds what.

A session is one decode side's DEALER socket (its ZeroMQ routing id) after a
successful ``Hello``. Requests belong to the sessions that submitted or subscribed
to them. The table lives on the server's loop thread only.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Session:
    """One decode side, as the prefill side knows it (loop thread only)."""
    ident: bytes   # the ZeroMQ routing id of its DEALER socket
    name: str      # what its Hello said (not authenticated) and the routing id, for logs and errors
    requests: set[str] = field(default_factory=set)  # open requests it submitted or subscribed to


def session_name(hello_name: str, ident: bytes) -> str:
    """How errors and logs name a session: ``decode-3 (a1b2c3d4)``."""
    return f"{hello_name or 'unnamed'} ({ident.hex()[-8:]})"
