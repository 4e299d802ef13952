"""One small exception hierarchy for everything kvtransfer raises.

Every error carries ``.errno`` (a positive errno value) and ``.op`` (the failing call
or operation, e.g. ``"process_vm_readv"`` or ``"register"``); the message carries the
arguments. Bad input is kept apart from failures of the machinery:

- :class:`KVTransferError` - the base; ``.errno``, ``.op``.
  - :class:`InvalidArgumentError` (also a ``ValueError``) - the caller's input is wrong.
  - :class:`TransportUnavailableError` - a transport cannot run between these engines.
  - :class:`TransferError` - a read failed; ``.entry`` (index in the batch or -1) and
    ``.transport``.
    - :class:`RemoteAccessError` - the target refused it: wrong key, out of bounds,
      region not registered.
  - :class:`TransferTimeoutError` (also a ``TimeoutError``) - a deadline passed.
  - :class:`LayoutMismatchError` (an InvalidArgumentError) - two KV layouts cannot be
    mapped onto each other; ``.fields`` lists ``(name, ours, theirs)``.
  - :class:`PoolExhaustedError` - no free KV blocks (ENOSPC).
  - :class:`ControlError` - the control plane refused or could not carry a message;
    ``.code`` is the wire error code (``"malformed"``, ``"incompatible"``, ...).
    - :class:`LeaseExpiredError` - the blocks a read used may have been reused (ESTALE).
    - :class:`PeerLostError` - the other side stopped answering (EHOSTDOWN).
"""

from __future__ import annotations

import errno as _errno
import os


class KVTransferError(Exception):
    """Base of every kvtransfer error: ``.errno`` and ``.op`` say what failed."""

    def __init__(self, message: str, *, errno: int = _errno.EIO, op: str = "") -> None:
        super().__init__(message)
        self.errno = errno
        self.op = op

    @property
    def strerror(self) -> str:
        return os.strerror(self.errno)


class InvalidArgumentError(KVTransferError, ValueError):
    """The caller passed something that cannot work (bad object, range, descriptor)."""

    def __init__(self, message: str, *, errno: int = _errno.EINVAL, op: str = "") -> None:
        super().__init__(message, errno=errno, op=op)


class TransportUnavailableError(KVTransferError):
    """A (possibly forced) transport cannot connect these two engines."""


class TransferError(KVTransferError):
    """A read failed. ``.entry`` is the batch index that failed first (-1: not one entry)."""

    def __init__(self, message: str, *, errno: int = _errno.EIO, op: str = "", entry: int = -1,
                 transport: str = "") -> None:
        super().__init__(message, errno=errno, op=op)
        self.entry = entry
        self.transport = transport


class RemoteAccessError(TransferError):
    """The target refused a range: wrong key, outside the region, or not registered."""


class TransferTimeoutError(KVTransferError, TimeoutError):
    """A wait passed its deadline; the transfer may still be running."""

    def __init__(self, message: str, *, errno: int = _errno.ETIMEDOUT, op: str = "wait") -> None:
        super().__init__(message, errno=errno, op=op)


class LayoutMismatchError(InvalidArgumentError):
    """Two KV layouts that cannot be mapped; ``.fields`` is ``[(name, ours, theirs), ...]``."""

    def __init__(self, message: str, *, fields: list[tuple[str, object, object]] | None = None,
                 op: str = "layout") -> None:
        super().__init__(message, op=op)
        self.fields = fields or []


class PoolExhaustedError(KVTransferError):
    """Not enough free blocks in a KV pool."""

    def __init__(self, message: str, *, op: str = "alloc") -> None:
        super().__init__(message, errno=_errno.ENOSPC, op=op)


class ControlError(KVTransferError):
    """The control plane refused a message or could not deliver it. ``.code`` is the
    error code on the wire (``"malformed"``, ``"incompatible"``, ``"unknown_request"``, ...),
    ``.fields`` the differing fields of a refused handshake."""

    def __init__(self, message: str, *, code: str = "error", errno: int = _errno.EPROTO, op: str = "control",
                 fields: list[tuple[str, object, object]] | None = None) -> None:
        super().__init__(message, errno=errno, op=op)
        self.code = code
        self.fields = fields or []


class LeaseExpiredError(ControlError):
    """The lease on the blocks expired before the read was confirmed: they may have been
    reused while read, so the bytes must not be trusted."""

    def __init__(self, message: str, *, op: str = "release") -> None:
        super().__init__(message, code="lease_expired", errno=_errno.ESTALE, op=op)


class PeerLostError(ControlError):
    """The other side of the control plane stopped answering (dead, hung or unreachable)."""

    def __init__(self, message: str, *, op: str = "control") -> None:
        super().__init__(message, code="peer_lost", errno=_errno.EHOSTDOWN, op=op)


_REMOTE_REFUSALS = {_errno.EACCES, _errno.ENOENT, _errno.ERANGE, _errno.ESTALE}


def from_c(err: int, op: str, message: str, entry: int = -1) -> KVTransferError:
    """Maps an error of the C core (positive errno, failing op, text) to its class.

    Errors of a transfer (``entry >= 0``) become :class:`TransferError`s; the facade
    adds the transport and the entry's ranges to the message.
    """
    if entry >= 0:
        cls = RemoteAccessError if err in _REMOTE_REFUSALS else TransferError
        return cls(message, errno=err, op=op, entry=entry)
    if err == _errno.ETIMEDOUT:
        return TransferTimeoutError(message, errno=err, op=op)
    if err in (_errno.EINVAL, _errno.ERANGE, _errno.EBADF, _errno.EOPNOTSUPP, _errno.ENOENT):
        return InvalidArgumentError(message, errno=err, op=op)
    return KVTransferError(message, errno=err, op=op)
