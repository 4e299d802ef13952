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
