"""One request's KV on its way into the decode side's blocks (see :mod:`.client`).

The two files meet through a small explicit interface, one way each: a :class:`Pull`
gets a :class:`PullContext` (what it needs from the session that carries it: layouts,
regions, the peer, and callbacks into the session's loop thread), and the session
drives the pull through its "session's side" methods (``on_message``, ``on_refused``,
``check_transfers``, ``fail``). All state changes run on the session's loop thread; the
caller's side only waits.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..descriptors import RegionDescriptor
from ..engine import Peer, Region, Transfer
from ..errors import (ControlError, InvalidArgumentError, KVTransferError, LeaseExpiredError, PeerLostError,
                      TransferTimeoutError)
from ..kv import KVLayout, plan_reads
from . import messages as m
from .metrics import PullTimings

log = logging.getLogger("kvtransfer.control")


@dataclass(frozen=True)
class PullContext:
    """What a :class:`Pull` needs from the session that carries it, fixed at the
    session's handshake."""
    name: str                    # the session's, for logs
    layout: KVLayout             # the local pool's
    remote_layout: KVLayout      # the prefill side's
    regions: list[Region]        # the local pool's registered regions
    remote_regions: list[RegionDescriptor]
    peer: Peer                   # the transfer engine's connection to the prefill side
    transfer_fd: int             # eventfd the session's loop watches: a read completed
    handshake_s: float
    call: Callable[[Callable[[], None]], None]  # runs a function on the loop thread (any thread)
    send: Callable[[m.Release], None]           # sends a message to the prefill side (loop thread)
    lost: Callable[[], bool]                    # True once the prefill side stopped answering
    ended: Callable[["Pull"], None]             # the pull completed (loop thread)


class Pull:
    """One request's KV on its way into local blocks. ``wait``/``wait_layer`` block with
    a timeout; ``timings`` fills in as it goes. Created by :meth:`ControlClient.pull`."""

    def __init__(self, ctx: PullContext, request_id: str, dst_blocks: list[int],
                 heads: tuple[int, int] | None, deadline: float | None, skip_blocks: int = 0, waits: bool = False):
        self.request_id = request_id
        self.skip_blocks = skip_blocks
        self.dst_blocks = dst_blocks
        self.heads = heads
        self.timings = PullTimings(request_id=request_id, transport=ctx.peer.transport,
                                   handshake_s=ctx.handshake_s)
        self.result: bytes | None = None
        self.num_tokens: int | None = None
        #: time.monotonic() by which it must be done (None: no deadline); the session enforces it
        self.deadline = deadline
        #: the Submit/Subscribe was sent (set by the session, on its loop thread): renewable
        self.sent = False
        self._ctx = ctx
        self._waits = waits  # its Subscribe may wait for the request to open: timings.waited_s
        self._t0 = self.timings.started = time.monotonic()
        self._cv = threading.Condition()
        self._src_blocks: list[int] | None = None
        self._plans: list[np.ndarray] | None = None  # per layer, computed once at Pinned
        self._ahead: tuple[tuple[list[int], int], list[np.ndarray]] | None = None  # see plan_ahead
        self._inflight: list[tuple[Transfer, list[int]]] = []  # a read and the layers it carries
        self._busy_since = 0.0
        self._started: set[int] = set()  # layers whose read was issued
        self._layers_done: set[int] = set()
        self._finished = False           # the prefill side said Finished
        self._error: KVTransferError | None = None
        self._release_sent = False
        self._nothing_to_release = False  # the prefill side refused us: no Released will come
        self._complete = False           # terminal: nothing writes dst_blocks anymore

    # --- the caller's side -------------------------------------------------------------

    def done(self) -> bool:
        return self._complete

    def wait(self, timeout: float | None = None) -> bytes:
        """Until every layer is in place and the release is confirmed; returns the
        prefill side's result. Raises the pull's error, or TransferTimeoutError if it is
        still running at ``timeout`` (it goes on)."""
        with self._cv:
            if not self._cv.wait_for(lambda: self._complete, timeout):
                raise TransferTimeoutError(f"pull of {self.request_id!r} still running after {timeout} s "
                                           f"({len(self._layers_done)} layers in place)", op="pull")
        if self._error is not None:
            raise self._error
        return self.result or b""

    def wait_layer(self, layer: int, timeout: float | None = None) -> None:
        """Until ``layer`` is in place locally (the rest may still be coming)."""
        with self._cv:
            if not self._cv.wait_for(lambda: layer in self._layers_done or self._complete, timeout):
                raise TransferTimeoutError(f"layer {layer} of {self.request_id!r} not in place after {timeout} s",
                                           op="wait_layer")
            if layer in self._layers_done:
                return
        if self._error is not None:
            raise self._error
        raise ControlError(f"pull of {self.request_id!r} ended without layer {layer}", code="out_of_order",
                           op="wait_layer")

    def cancel(self) -> None:
        """Gives up: the prefill side's blocks are released, the pull fails ECANCELED."""
        err = ControlError(f"pull of {self.request_id!r} cancelled", code="cancelled", errno=errno.ECANCELED,
                           op="pull")
        self._ctx.call(lambda: self.fail(err))

    def __repr__(self) -> str:
        state = "done" if self._complete else f"{len(self._layers_done)} layers in place"
        return f"<Pull {self.request_id!r} {state}{' failed' if self._error else ''}>"

    # --- the session's side (its loop thread) -------------------------------------------

    def plan_ahead(self, src_blocks: Sequence[int], num_tokens: int) -> None:
        """Plans the reads for the blocks the prefill side is expected to pin (e.g. from
        its kv_transfer_params) while the Subscribe travels: its Pinned answer then costs
        a comparison instead of a plan. A wrong guess only costs this time (Pinned plans
        again); a bad one is reported by Pinned, as without it. Loop thread, before Pinned."""
        c = self._ctx
        try:
            key = self._plan_key([int(b) for b in src_blocks], int(num_tokens))
            self._ahead = (key, plan_reads(c.remote_layout, c.layout, key[0], self.dst_blocks, key[1],
                                           heads=self.heads))
        except (KVTransferError, TypeError, ValueError):
            self._ahead = None

    @property
    def error(self) -> KVTransferError | None:
        """The first error, once there is one."""
        return self._error

    @property
    def reading(self) -> bool:
        """Reads are in flight: :meth:`check_transfers` when the transfer eventfd fires."""
        return bool(self._inflight)

    def on_message(self, msg: m.Pinned | m.Manifest | m.Finished | m.Released | m.Failed) -> None:
        """A message of the prefill side about this request."""
        if self._waits and self.timings.waited_s is None:
            self.timings.waited_s = self._now()  # the first word since the request opened
        if isinstance(msg, m.Failed):
            return self.fail(pull_error(self.request_id, msg.code, msg.message, "failed on the prefill side"))
        handler = {m.Pinned: self._on_pinned, m.Manifest: self._on_manifest, m.Finished: self._on_finished,
                   m.Released: self._on_released}.get(type(msg))
        if handler is None:
            return log.info("%s: %s is not for a decode side; ignored", self._ctx.name, type(msg).__name__)
        try:
            handler(msg)
        except KVTransferError as e:  # e.g. a manifest whose blocks we cannot map or read
            self.fail(e)

    def on_refused(self, code: str, message: str) -> None:
        """The prefill side refused this pull's Submit/Subscribe/Release: it holds
        nothing for us (and a duplicate id is someone else's request: never release it)."""
        self._release_sent = self._nothing_to_release = True
        self.fail(pull_error(self.request_id, code, message, "refused"))

    def fail(self, err: KVTransferError) -> None:
        """Records the first error; the pull completes once no transfer writes into
        the destination, after releasing the prefill side's blocks."""
        if self._complete:
            return
        if self._error is None:
            self._error = err
            log.warning("%s: pull of %r failed: %s", self._ctx.name, self.request_id, err)
        self._settle()

    def check_transfers(self) -> None:
        """Takes the reads that completed (the transfer eventfd fired)."""
        for entry in [e for e in self._inflight if e[0].done()]:
            self._inflight.remove(entry)
            if not self._inflight:
                self.timings.transfer_s += time.monotonic() - self._busy_since
            t, layers = entry
            t.notify_fd(-1)
            try:
                t.wait(0)
            except KVTransferError as e:
                self.fail(e)
                continue
            if self._error is None:
                for x in layers:
                    self._layer_done(x)
        if self._error is not None:
            self._settle()
        else:
            self._maybe_release()

    # --- internals (the loop thread) -----------------------------------------------------

    def _now(self) -> float:
        return time.monotonic() - self._t0

    def _on_pinned(self, msg: m.Pinned) -> None:
        if self._src_blocks is not None:
            if self._src_blocks != msg.blocks:
                self.fail(ControlError(f"{self.request_id!r}: pinned twice with different blocks",
                                        code="out_of_order", op="pull"))
            return
        c = self._ctx
        skip, bs = self.skip_blocks, c.remote_layout.block_size
        # a skipped prefix is whole blocks on both sides: only equal block sizes say where it ends
        if skip and (bs != c.layout.block_size or skip > len(msg.blocks)):
            return self.fail(InvalidArgumentError(
                f"{self.request_id!r}: cannot skip {skip} of {len(msg.blocks)} blocks (block sizes {bs} and "
                f"{c.layout.block_size})", op="pull"))
        key = self._plan_key(msg.blocks, msg.num_tokens)
        need = c.layout.blocks_for(key[1])
        if len(self.dst_blocks) < need:
            return self.fail(InvalidArgumentError(
                f"{self.request_id!r}: {key[1]} tokens need {need} local blocks, "
                f"{len(self.dst_blocks)} were given", op="pull"))
        # the whole plan now (or before, see plan_ahead), while the prefill side computes
        # layer 0: a manifest then costs a slice and a read, nothing more
        if self._ahead is not None and self._ahead[0] == key:
            self._plans = self._ahead[1]
        else:
            self._plans = plan_reads(c.remote_layout, c.layout, key[0], self.dst_blocks, key[1], heads=self.heads)
        self._ahead = None
        self._src_blocks = msg.blocks
        self.num_tokens = msg.num_tokens
        self.timings.pinned_s = self._now()

    def _plan_key(self, blocks: list[int], num_tokens: int) -> tuple[list[int], int]:
        """What the plan depends on: the prefill side's blocks read (after the skipped
        ones) and the tokens in them."""
        rl, skip = self._ctx.remote_layout, self.skip_blocks
        n = max(num_tokens - skip * rl.block_size, 0)
        return list(blocks[skip:skip + rl.blocks_for(n)]), n

    def _on_manifest(self, msg: m.Manifest) -> None:
        if self._src_blocks is None:
            return self.fail(ControlError(f"{self.request_id!r}: manifest before the blocks were pinned",
                                           code="out_of_order", op="pull"))
        if self.timings.first_manifest_s is None:
            self.timings.first_manifest_s = self._now()
        c = self._ctx
        bad = [x for x in msg.layers if x >= c.layout.num_layers]
        if bad:
            return self.fail(ControlError(f"{self.request_id!r}: manifest names layers {bad[:8]} of "
                                           f"{c.layout.num_layers}", code="out_of_order", op="pull"))
        new = [x for x in dict.fromkeys(msg.layers) if x not in self._started]
        if not new or self._error is not None:
            return
        self._started.update(new)
        # the layers announced together travel as one batch
        plan = np.concatenate([self._plans[x] for x in new])
        if len(plan) == 0:
            for x in new:
                self._layer_done(x)
            return
        t = c.peer.read_indexed(c.regions, plan["dst_region"], plan["dst_off"], c.remote_regions,
                                plan["src_region"], plan["src_off"], plan["len"])
        t.notify_fd(c.transfer_fd)
        if not self._inflight:
            self._busy_since = time.monotonic()
        self._inflight.append((t, new))
        self.timings.bytes += t.nbytes
        self.timings.entries += t.entries

    def _on_finished(self, msg: m.Finished) -> None:
        self._finished = True
        self.result = msg.result
        num_layers = self._ctx.layout.num_layers
        missing = [x for x in range(num_layers) if x not in self._started]
        if missing and self._src_blocks is not None:
            return self.fail(ControlError(f"{self.request_id!r}: finished without layers {missing[:8]}",
                                           code="out_of_order", op="pull"))
        if self._src_blocks is None:  # a finished request with nothing pinned: 0 tokens
            self.num_tokens = 0
            self._started.update(range(num_layers))
            self._layers_done.update(range(num_layers))
        self._maybe_release()

    def _layer_done(self, layer: int) -> None:
        now = self._now()
        with self._cv:
            self._layers_done.add(layer)
            self.timings.layers_s[layer] = now
            if self.timings.first_byte_s is None:
                self.timings.first_byte_s = now
            self._cv.notify_all()

    def _maybe_release(self) -> None:
        if self._finished and not self._inflight and len(self._layers_done) == self._ctx.layout.num_layers:
            if self.timings.total_s is None:
                self.timings.total_s = self._now()
            self._send_release()

    def _send_release(self) -> None:
        if not self._release_sent:
            self._release_sent = True
            self._ctx.send(m.Release(request_id=self.request_id, transport=self._ctx.peer.transport,
                                     nbytes=self.timings.bytes))

    def _on_released(self, msg: m.Released) -> None:
        self.timings.released_s = self._now()
        if not msg.valid and self._error is None:
            self._error = LeaseExpiredError(f"{self.request_id!r}: {msg.message}")
        if self._error is None and not self._finished:
            self._error = ControlError(f"{self.request_id!r}: released before it finished", code="out_of_order")
        self._complete_now()

    def _settle(self) -> None:
        if self._inflight:
            return  # the transfer eventfd brings us back when they end
        if isinstance(self._error, PeerLostError) or self._ctx.lost() or self._nothing_to_release:
            return self._complete_now()  # nobody to release to, or nothing held
        if self._release_sent:
            return  # the Released answer (or the peer timeout) completes it
        self._send_release()

    def _complete_now(self) -> None:
        if self._complete:
            return
        for t, _ in self._inflight:
            t.notify_fd(-1)
        with self._cv:
            self._complete = True
            self._cv.notify_all()
        self._ctx.ended(self)


def pull_error(request_id: str, code: str, message: str, what: str) -> ControlError:
    """The error of a pull the prefill side refused or failed: LeaseExpiredError when the
    blocks were reclaimed (a read may have overlapped their reuse), else ControlError."""
    if code == "lease_expired":
        return LeaseExpiredError(f"{request_id!r}: {message}")
    return ControlError(f"{request_id!r} {what}: {code}: {message}", code=code, op="pull")
