"""The engine-agnostic connector core: a serving engine's paged KV cache as a producer
(:class:`KVCacheSource`) or a consumer (:class:`KVCacheSink`) of whole KV pages.

No serving engine is imported here. The engine hands over its KV cache tensors (one per
attention layer, in layer order, torch tensors on CPU or CUDA) once; both sides register
each distinct underlying buffer (torch storage) once, and address a page as
``layer offset + block id * block stride``, taken from the tensors' shapes and strides.
:func:`describe_kv_caches` maps them onto a :class:`~kvtransfer.kv.KVLayout`:

- ``[B, H, N, 2D]`` with strides of LBHNC (vLLM's CPU cache, and what vLLM gives a connector
  that asks for LBHNC on GPUs): kind ``heads_major``;
- ``[B, H, N, 2D]`` with strides of LBNHC (vLLM's GPU default): kind ``tokens_major``;
- ``[2, B, N, H, D]`` per layer (vLLM's FlashAttention cache before August 2026): ``flash``.

Any other arrangement (blocks whose pages are not one stride apart inside a layer, such as
vLLM's BLHNC or LHBNC) raises :class:`LayoutMismatchError` naming it. Pages move whole: a
handshake between pools of different kinds, dtypes, head sizes, layer counts, models or
block sizes is refused naming the field.

    src = KVCacheSource(caches, model="llama-1b", endpoint="tcp://127.0.0.1:5555", lease_s=30)
    src.serve("req-1", block_ids, num_tokens)        # the engine computed them; keep them
    src.take_done()                                  # -> {"req-1"} once read (or expired)

    sink = KVCacheSink(caches, model="llama-1b")
    sink.start("req-1", "tcp://127.0.0.1:5555", "req-1", local_block_ids)
    finished, failed = sink.take_done()              # later: {"req-1"}, {}
"""

from __future__ import annotations

import concurrent.futures
import logging
import re
import threading
from dataclasses import dataclass
from typing import Any, Sequence

from ..control import ControlClient, ControlServer, CurveClientKeys, CurveServerKeys, Pull
from ..control.messages import MAX_SUBSCRIBE_WAIT_S
from ..engine import Engine, Region
from ..errors import ControlError, InvalidArgumentError, KVTransferError, LayoutMismatchError
from ..kv import CompatInfo, KVLayout

log = logging.getLogger("kvtransfer.connector")

__all__ = ["KVCacheSource", "KVCacheSink", "describe_kv_caches", "KVCaches", "layer_order"]


def layer_order(names: Sequence[str]) -> list[str]:
    """Layer names in layer order: by the numbers in them ("layers.10" after "layers.9")."""
    return sorted(names, key=lambda n: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)])


@dataclass
class KVCaches:
    """An engine's KV cache as registered memory: ``buffers`` (one uint8 tensor per distinct
    storage, in first-use order) and the ``layout`` of the layers in them."""
    buffers: list[Any]
    layout: KVLayout
    layout_name: str  # what the arrangement is called (LBHNC, LBNHC, flash)


def _whole_storage(t: Any) -> Any:
    """A contiguous uint8 tensor over all of ``t``'s storage (what one region registers)."""
    import torch

    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


def _kind_of(t: Any) -> tuple[str, int, int, int, int]:
    """``(kind, num_blocks, block_size, num_kv_heads, head_dim)`` of one layer's tensor, from
    its shape and strides; LayoutMismatchError naming the arrangement otherwise."""
    shape, strides = tuple(t.shape), tuple(t.stride())
    if len(shape) == 4:
        b, h, n, c = shape
        if c % 2:
            raise LayoutMismatchError(f"KV cache [B, H, N, C]={list(shape)}: C must be K and V of one head size, "
                                      f"got an odd {c}", fields=[("layout", list(shape), "[B, H, N, 2D]")])
        if strides == (h * n * c, n * c, c, 1):
            return "heads_major", b, n, h, c // 2
        if strides == (n * h * c, c, h * c, 1):
            return "tokens_major", b, n, h, c // 2
    elif len(shape) == 5 and shape[0] == 2:
        _, b, n, h, d = shape
        if strides == (b * n * h * d, n * h * d, h * d, d, 1):
            return "flash", b, n, h, d
    order = "".join("BHNC"[i] if len(shape) == 4 else "KBNHD"[i]
                    for i in sorted(range(len(shape)), key=lambda i: -strides[i]))
    raise LayoutMismatchError(
        f"cannot read this KV cache layout: shape {list(shape)}, strides {list(strides)} (dims by stride {order}); "
        f"supported: per layer [B, H, N, 2D] as LBHNC or LBNHC (each layer's blocks one page apart), or "
        f"[2, B, N, H, D] (flash)", fields=[("layout", order, "LBHNC|LBNHC|flash")])


_NAMES = {"heads_major": "LBHNC", "tokens_major": "LBNHC", "flash": "flash"}


def describe_kv_caches(caches: Sequence[Any], *, total_kv_heads: int = 0, first_head: int = 0) -> KVCaches:
    """The registrable buffers and the :class:`KVLayout` of ``caches`` (one tensor per
    layer, in layer order, all of one shape and dtype). Several layers may be views into
    one buffer (at any byte offset) or each have their own; nothing is assumed contiguous
    across layers. ``total_kv_heads``/``first_head``: this pool's share of a tensor
    parallel model's heads (default: all heads are here)."""
    if not caches:
        raise InvalidArgumentError("no KV cache tensors", op="describe_kv_caches")
    first = caches[0]
    kind, num_blocks, block_size, heads, head_dim = _kind_of(first)
    dtype = str(first.dtype).removeprefix("torch.")
    buffers: list[Any] = []
    keys: dict[tuple[str, int], int] = {}
    regions, offsets = [], []
    for i, t in enumerate(caches):
        if tuple(t.shape) != tuple(first.shape) or t.stride() != first.stride() or t.dtype != first.dtype:
            raise LayoutMismatchError(f"KV cache of layer {i} is {list(t.shape)} {t.dtype}, layer 0's "
                                      f"{list(first.shape)} {first.dtype}: one shape for all layers",
                                      fields=[("layers", list(t.shape), list(first.shape))])
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if key not in keys:
            keys[key] = len(buffers)
            buffers.append(_whole_storage(t))
        regions.append(keys[key])
        offsets.append(t.data_ptr() - storage.data_ptr())
    layout = KVLayout(kind=kind, num_layers=len(caches), num_blocks=num_blocks, block_size=block_size,
                      num_kv_heads=heads, head_dim=head_dim, dtype=dtype, total_kv_heads=total_kv_heads,
                      first_head=first_head, layer_offsets=tuple(offsets), layer_regions=tuple(regions))
    for r, buf in enumerate(buffers):
        if layout.region_nbytes(r) > buf.numel():
            raise InvalidArgumentError(f"KV layers in buffer {r} reach byte {layout.region_nbytes(r)} of a "
                                       f"{buf.numel()}-byte storage", op="describe_kv_caches")
    return KVCaches(buffers=buffers, layout=layout, layout_name=_NAMES[kind])


class _SharedPins:
    """The pool :class:`ControlServer` frees into, when the engine owns the blocks: it only
    counts pins (a block shared by two requests, e.g. a cached prefix, is pinned twice)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._count: dict[int, int] = {}
        self._lock = threading.Lock()

    def pin(self, ids: Sequence[int]) -> None:
        with self._lock:
            for i in ids:
                self._count[i] = self._count.get(i, 0) + 1

    def free(self, ids: Sequence[int]) -> None:
        with self._lock:
            for i in ids:
                left = self._count.get(i, 0) - 1
                if left > 0:
                    self._count[i] = left
                else:
                    self._count.pop(i, None)

    @property
    def num_used(self) -> int:
        return len(self._count)

    @property
    def num_free(self) -> int:
        return self.num_blocks - len(self._count)


class _Registered:
    """The engine and the registered regions of one side's KV caches."""

    def __init__(self, caches: Sequence[Any], model: str, engine: Engine | None, total_kv_heads: int,
                 first_head: int) -> None:
        self.kv = describe_kv_caches(caches, total_kv_heads=total_kv_heads, first_head=first_head)
        self.layout = self.kv.layout
        self.compat = CompatInfo.of(self.layout, model)
        self._own_engine = engine is None
        self.engine = engine or Engine()
        self.regions: list[Region] = []
        try:
            for buf in self.kv.buffers:
                self.regions.append(self.engine.register(buf)[0])
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for r in self.regions:
            r.close()
        self.regions = []
        if self._own_engine:
            self.engine.close()


class KVCacheSource:
    """The producer: serves blocks the engine already computed to consumers' reads.

    ``caches``: the KV cache tensors, one per layer, in layer order. ``model``: the name
    both sides must share. ``endpoint``: where the control plane binds (``tcp://HOST:0``
    picks a port; :attr:`endpoint` says which). ``lease_s``: how long served blocks stay
    pinned for a consumer that does not come or stops renewing. ``readers`` per request
    is 1 unless given to :meth:`serve`.
    """

    def __init__(self, caches: Sequence[Any], *, model: str, endpoint: str = "tcp://127.0.0.1:0",
                 lease_s: float = 30.0, engine: Engine | None = None, curve: CurveServerKeys | None = None,
                 total_kv_heads: int = 0, first_head: int = 0, name: str = "kv-source") -> None:
        self._reg = _Registered(caches, model, engine, total_kv_heads, first_head)
        self.layout = self._reg.layout
        self.layout_name = self._reg.kv.layout_name
        self._pins = _SharedPins(self.layout.num_blocks)
        self._done: set[str] = set()
        self._serving: set[str] = set()  # request ids offered and not yet freed
        self._lock = threading.Lock()
        try:
            self._server = ControlServer(endpoint, engine=self._reg.engine, regions=self._reg.regions,
                                         layout=self.layout, compat=self._reg.compat, pool=self._pins,
                                         on_submit=self._no_submit, lease_s=lease_s, curve=curve, name=name,
                                         on_freed=self._freed)
        except BaseException:
            self._reg.close()
            raise
        self.endpoint = self._server.endpoint

    @staticmethod
    def _no_submit(req: Any) -> None:
        raise ControlError("this source serves computed requests only (Subscribe), it computes none",
                           code="rejected")

    def serve(self, request_id: str, block_ids: Sequence[int], num_tokens: int, *, readers: int = 1,
              timeout: float = 5.0) -> None:
        """Offers request ``request_id``'s first ``num_tokens`` tokens, held in ``block_ids``
        (token order), to ``readers`` consumers. The blocks stay the engine's; they are
        pinned until :meth:`take_done` names the request."""
        blocks = [int(b) for b in block_ids][:self.layout.blocks_for(num_tokens)]
        req = self._server.open_request(request_id, readers=readers, timeout=timeout)
        try:
            req.pin(blocks, num_tokens)  # checks the ids; the server frees them into _pins from now on
        except BaseException:
            req.fail("could not pin the blocks")
            raise
        self._pins.pin(blocks)
        with self._lock:
            self._serving.add(request_id)
        req.layer_ready(*range(self.layout.num_layers))
        req.finish()

    def _freed(self, request_id: str) -> None:
        with self._lock:
            self._serving.discard(request_id)
            self._done.add(request_id)

    def take_done(self) -> set[str]:
        """Requests whose blocks no consumer needs anymore (every reader released them, or
        the lease expired) since the last call: the engine may free them."""
        with self._lock:
            done, self._done = self._done, set()
        return done

    @property
    def pinned_blocks(self) -> int:
        """Distinct blocks pinned for consumers now."""
        return self._pins.num_used

    @property
    def serving(self) -> int:
        """Requests whose blocks are still pinned."""
        with self._lock:
            return len(self._serving)

    @property
    def waiting(self) -> int:
        """Consumers' Subscribes waiting for a request not served yet (approximate)."""
        return self._server.stats().waiting

    def close(self) -> None:
        """Stops serving (consumers' pulls fail) and deregisters the memory."""
        self._server.close()
        self._reg.close()

    def __enter__(self) -> "KVCacheSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _Load:
    request_id: str
    future: concurrent.futures.Future
    pull: Pull | None = None


class KVCacheSink:
    """The consumer: pulls remote requests' blocks into local block ids, asynchronously.

    ``timeout``: a producer silent this long (handshake included) fails the loads from it,
    and a request it has not served yet is waited for this long (at most 60 s); a load
    also fails if not done within ``load_timeout``. ``transport`` forces one
    (``shm``, ``tcp``, ``verbs``; None: the engine chooses). Loads run on ``max_workers``
    threads that do the handshakes and wait for the pulls.
    """

    def __init__(self, caches: Sequence[Any], *, model: str, engine: Engine | None = None, timeout: float = 10.0,
                 load_timeout: float = 60.0, transport: str | None = None, curve: CurveClientKeys | None = None,
                 total_kv_heads: int = 0, first_head: int = 0, name: str = "kv-sink", max_workers: int = 4) -> None:
        self._reg = _Registered(caches, model, engine, total_kv_heads, first_head)
        self.layout = self._reg.layout
        self.layout_name = self._reg.kv.layout_name
        self.timeout = timeout
        self.load_timeout = load_timeout
        self._transport = transport
        self._curve = curve
        self._name = name
        self._clients: dict[str, ControlClient] = {}
        self._clients_lock = threading.Lock()
        self._loads: dict[str, _Load] = {}
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix=name)
        self._closed = False

    def _client(self, endpoint: str) -> ControlClient:
        with self._clients_lock:
            client = self._clients.get(endpoint)
            if client is not None and not client.lost:
                return client
            if client is not None:
                client.close()
            client = ControlClient(endpoint, engine=self._reg.engine, regions=self._reg.regions, layout=self.layout,
                                   compat=self._reg.compat, timeout=self.timeout, curve=self._curve,
                                   name=self._name, transport=self._transport)
            try:
                _check_same_pages(client.remote_layout, self.layout, endpoint)
            except BaseException:
                client.close()
                raise
            self._clients[endpoint] = client
            return client

    def start(self, request_id: str, endpoint: str, remote_request_id: str, block_ids: Sequence[int], *,
              skip_blocks: int = 0, remote: tuple[Sequence[int], int] | None = None) -> None:
        """Starts loading remote request ``remote_request_id`` (served at ``endpoint``) into
        local ``block_ids`` (token order), skipping its first ``skip_blocks`` blocks (a prefix
        already here). ``remote``: the producer's ``(block ids, tokens)`` if known, to plan
        the reads while its answer is on the way. Returns at once; :meth:`take_done`
        reports the outcome."""
        if self._closed:
            raise InvalidArgumentError("KVCacheSink is closed", op="start")
        blocks = [int(b) for b in block_ids]

        def run() -> None:
            # the producer's engine opens a request a step after it answered it: the
            # Subscribe waits for it (up to the sink's timeout) rather than being refused
            load.pull = self._client(endpoint).pull(remote_request_id, blocks, skip_blocks=skip_blocks,
                                                    timeout=self.load_timeout,
                                                    wait_s=min(self.timeout, MAX_SUBSCRIBE_WAIT_S), expect=remote)
            if self._closed:  # close() looked before this pull existed: it must not wait on
                load.pull.cancel()
            load.pull.wait(self.load_timeout + self.timeout)

        with self._lock:
            if request_id in self._loads:
                raise InvalidArgumentError(f"request {request_id!r} is already loading", op="start")
            load = _Load(request_id, concurrent.futures.Future())
            self._loads[request_id] = load
        load.future = self._pool.submit(run)

    def fail(self, request_id: str, message: str) -> None:
        """Records a load that cannot start (reported by :meth:`take_done` as failed)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_exception(InvalidArgumentError(f"load of {request_id!r}: {message}", op="start"))
        with self._lock:
            if request_id in self._loads:  # its running pull stays tracked, and reports itself
                raise InvalidArgumentError(f"request {request_id!r} is already loading", op="start")
            self._loads[request_id] = _Load(request_id, future)

    def wait(self, request_ids: Sequence[str], timeout: float) -> None:
        """Until these loads are done (or failed), at most ``timeout`` seconds."""
        with self._lock:
            futures = [self._loads[r].future for r in request_ids if r in self._loads]
        concurrent.futures.wait(futures, timeout=timeout)

    def take_done(self) -> tuple[set[str], dict[str, KVTransferError]]:
        """``(finished, failed)``: loads that ended since the last call; a failed one maps
        to its error. A load in neither is still running."""
        finished: set[str] = set()
        failed: dict[str, KVTransferError] = {}
        with self._lock:
            for rid, load in list(self._loads.items()):
                if not load.future.done():
                    continue
                del self._loads[rid]
                err = load.future.exception()
                if err is None:
                    finished.add(rid)
                else:
                    failed[rid] = err if isinstance(err, KVTransferError) else ControlError(
                        f"load of {rid!r}: {type(err).__name__}: {err}", code="error", op="load")
        return finished, failed

    @property
    def loading(self) -> int:
        with self._lock:
            return len(self._loads)

    def close(self) -> None:
        """Cancels the running loads (their producers' blocks are released), closes."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            loads = list(self._loads.values())
        for load in loads:
            if load.pull is not None:
                load.pull.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._clients_lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()
        self._reg.close()

    def __enter__(self) -> "KVCacheSink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_same_pages(remote: KVLayout, local: KVLayout, endpoint: str) -> None:
    """Pages move whole: the block size must match too (the handshake already refused a
    different model, dtype, kind, head size or layer count)."""
    if remote.block_size != local.block_size:
        raise LayoutMismatchError(
            f"KV caches at {endpoint} do not match: block_size (ours {local.block_size}, theirs {remote.block_size}): "
            f"whole pages are moved, so both engines need one block size",
            fields=[("block_size", local.block_size, remote.block_size)])

