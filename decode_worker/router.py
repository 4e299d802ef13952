"""The decode worker's prefill workers: one control-plane session each, least
outstanding work first, and another worker when one fails.

At start every ``--prefill`` endpoint must answer the handshake (retried until
``connect_timeout``: workers may start in any order); a worker running another model
refuses it, which stops the decode worker with that message. A session that is lost
later (the prefill worker died) is left out of the choice and re-established in the
background, so a restarted worker comes back.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from kvtransfer.control import ControlClient, ControlError, PeerLostError, Pull
from kvtransfer import workers_protocol as protocol
from kvtransfer.errors import KVTransferError, TransferError, TransferTimeoutError, TransportUnavailableError

log = logging.getLogger("decode_worker")

#: prefill-side failures another prefill worker may not have
_RETRYABLE_CODES = {"peer_lost", "shutting_down", "pool_exhausted", "lease_expired", "cancelled", "rejected"}


class NoPrefillWorker(KVTransferError):
    pass


class PullNotStopped(TransferTimeoutError):
    """A pull outlived its timeout and did not end when cancelled: reads may still write
    its destination blocks, so they must not go back to the pool."""


def retryable(e: KVTransferError) -> bool:
    if isinstance(e, (PeerLostError, TransferError, TransportUnavailableError)):
        return True
    return isinstance(e, ControlError) and e.code in _RETRYABLE_CODES


def _wait(pull: Pull, client: ControlClient, timeout: float) -> bytes:
    """The pull's result. A pull still running past its own deadline (plus slack) is
    cancelled and waited for, bounded by the session's timeout; if even that does not
    end it, PullNotStopped: the caller must not reuse the blocks."""
    try:
        return pull.wait(timeout + 5)
    except TransferTimeoutError as e:
        if pull.done():
            raise  # the pull's own deadline ended it: nothing writes its blocks anymore
        pull.cancel()
        try:
            pull.wait(client.timeout)
        except KVTransferError:
            pass  # the cancel's own error; what counts is whether it ended
        if not pull.done():
            raise PullNotStopped(f"{e}; still running {client.timeout} s after its cancel", op="pull") from e
        raise


class PrefillRouter:
    def __init__(self, endpoints: list[str], connect: Callable[[str], ControlClient], connect_timeout: float):
        self._connect = connect
        self._lock = threading.Lock()
        self._clients: dict[str, ControlClient | None] = {}
        self._outstanding = {e: 0 for e in endpoints}
        deadline = time.monotonic() + connect_timeout
        for e in endpoints:
            self._clients[e] = self._first_connect(e, deadline)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._reconnect_loop, name="prefill-reconnect", daemon=True)
        self._thread.start()

    def _first_connect(self, endpoint: str, deadline: float) -> ControlClient:
        while True:
            try:
                return self._connect(endpoint)
            except PeerLostError as e:
                if time.monotonic() > deadline:
                    raise NoPrefillWorker(f"prefill worker {endpoint} did not answer: {e}", op="connect") from None
                log.info("waiting for prefill worker %s", endpoint)
                time.sleep(0.5)

    def sessions(self) -> dict[str, str]:
        """endpoint -> "transport" or "lost"."""
        with self._lock:
            return {e: (c.transport if c and not c.lost else "lost") for e, c in self._clients.items()}

    def pull(self, request_id: str, dst_blocks: list[int], payload: protocol.PrefillPayload, timeout: float
             ) -> tuple[protocol.PrefillResult, Pull, str]:
        """Prefills on the least busy worker; on a failure that another worker may not
        have (it died, it is full), tries the next. Returns (result, pull, endpoint)."""
        tried: list[str] = []
        errors: list[str] = []
        data = protocol.encode(payload)
        while True:
            endpoint, client = self._pick(tried)
            if client is None:
                raise NoPrefillWorker("no prefill worker is reachable" + (": " + "; ".join(errors) if errors else ""),
                                      op="prefill")
            tried.append(endpoint)
            attempt = request_id if len(tried) == 1 else f"{request_id}#{len(tried)}"
            try:
                pull = client.pull(attempt, dst_blocks, payload=data, timeout=timeout)
                result = protocol.decode_result(_wait(pull, client, timeout))
                return result, pull, endpoint
            except KVTransferError as e:
                if not retryable(e):
                    raise
                errors.append(f"{endpoint}: {e}")
                log.warning("request %s: prefill worker %s failed (%s); trying another", request_id, endpoint, e)
            finally:
                with self._lock:
                    self._outstanding[endpoint] -= 1

    def _pick(self, exclude: list[str]) -> tuple[str, ControlClient | None]:
        with self._lock:
            live = [(n, e) for e, n in self._outstanding.items()
                    if e not in exclude and (c := self._clients.get(e)) is not None and not c.lost]
            if not live:
                return "", None
            _, endpoint = min(live)
            self._outstanding[endpoint] += 1
            return endpoint, self._clients[endpoint]

    def _reconnect_loop(self) -> None:
        while not self._stop.wait(2.0):
            with self._lock:
                lost = [e for e, c in self._clients.items() if c is None or c.lost]
            for e in lost:
                try:
                    fresh = self._connect(e)
                except KVTransferError:
                    continue
                with self._lock:
                    old, self._clients[e] = self._clients[e], fresh
                log.info("prefill worker %s is back (%s)", e, fresh.transport)
                if old is not None:
                    old.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            if c is not None:
                c.close()
