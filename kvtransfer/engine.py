"""The transfer engine's Python face: register memory, connect to peers, read.

    with Engine() as eng:
        region, desc = eng.register(kv_pool)            # desc.to_bytes() goes to peers
        peer = eng.connect(remote_engine_descriptor)     # transport chosen here
        t = peer.read([(region, 0, remote_desc, 4096, 65536), ...])
        t.wait(timeout=5.0)                              # or: await t

Reads are one-sided: the target's Python code never runs to serve them; C threads
do the work on both sides. Only descriptors cross the wire; the handles returned here
keep registrations alive and must be closed (or used as context managers).

Transports, chosen per peer in :meth:`Engine.connect` from the C core's table (see
:meth:`Engine.plan`), in this order: ``verbs`` when both engines have an RDMA port and
queue pairs connect (RDMA READ, the NIC does the work), ``map`` when both share a boot
id and pid namespace and the peer holds regions in shared memory
(``alloc_host(shared=True)``: mapped once, copied with memcpy), ``shm`` on one host
otherwise (``process_vm_readv``, CUDA IPC), else ``tcp`` (a C server thread on the
target). ``KVTRANSFER_TRANSPORT=verbs|map|shm|tcp`` (or ``transport=``) forces one; a
forced transport that cannot run raises :class:`TransportUnavailableError`, never
falls back. ``KVTRANSFER_IB_DEVICE``, ``KVTRANSFER_IB_PORT`` and
``KVTRANSFER_IB_GID_INDEX`` pick the RDMA device, port and GID (default: the first
active port, a RoCEv2 GID on Ethernet).

CUDA memory (torch CUDA tensors, cupy arrays, DLPack, raw ``(ptr, nbytes, "cuda:N")``)
registers like host memory and is read by every transport: ``shm`` copies device to
device through CUDA IPC with a gather kernel (one launch for thousands of blocks),
``tcp`` stages through pinned host buffers on both sides, ``verbs`` lets the NIC reach
GPU memory (dma-buf or nvidia-peermem). Reads into or from CUDA memory are in place
once the transfer is done (the copies have finished on the GPU). The engine copies on
CUDA streams of its own, not ordered with the caller's: GPU work that writes a read's
destination (or, on the target, its source) must have finished before the read starts
(``torch.cuda.synchronize()``, or an event waited on). See csrc/cuda_copy.h for how
batched copies run.

Environment (tuning and diagnostics; defaults measured on an H100, see
bench/transfer_bw.py): ``KVTRANSFER_NVRTC`` (path of libnvrtc, or ``none``),
``KVTRANSFER_CUDA_COPY=kernel|batch``, ``KVTRANSFER_GATHER_VARIANT=0|1`` (one kernel shape for
every descriptor list, csrc/cuda_copy.c; shm's read_blocks jobs have none),
``KVTRANSFER_TCP_STAGE_KB`` (pinned staging buffers, default 2048) and
``KVTRANSFER_TCP_DEV_JOB_KB`` (tcp frames into CUDA memory, default 8192),
``KVTRANSFER_WAIT_SPIN_US`` (``wait`` polls this long before sleeping, default 5000),
``KVTRANSFER_WORKER_SPIN_US`` (transport threads poll for the next job this long before
sleeping, default 200), ``KVTRANSFER_TRACE=1`` (one stderr line per large batch: when
it was cut, first picked up, first and last launched, done).
"""

from __future__ import annotations

import asyncio
import errno as _errno
import logging
import math
import os
import socket
import threading
import weakref
from typing import Any, NamedTuple, Sequence

import numpy as np

from . import _C
from .descriptors import EngineDescriptor, RegionDescriptor
from .errors import (InvalidArgumentError, KVTransferError, TransferError, TransferTimeoutError,
                     TransportUnavailableError)
from .memory import MemoryRange, describe, find_nvrtc

log = logging.getLogger("kvtransfer")

#: The transports of the C core's table, in the order :meth:`Engine.connect` prefers them.
TRANSPORTS: tuple[str, ...] = _C.TRANSPORTS


def _unavailable(e: KVTransferError) -> KVTransferError:
    """A connect or plan error of the C core as raised here: an unknown transport name
    (op ``transport``) is the caller's mistake; anything else means no way through."""
    if e.op == "transport":
        return InvalidArgumentError(str(e), errno=e.errno, op=e.op)
    return TransportUnavailableError(str(e), errno=e.errno, op=e.op)


class Reach(NamedTuple):
    """Whether one transport reaches a peer: ``why`` says how, or (``errno`` set) why not."""
    name: str
    ok: bool
    errno: int
    why: str


class Offer(NamedTuple):
    """What one transport offers on this engine: ``facts`` (e.g. ``listen`` for tcp),
    or ``why_not`` when it offers nothing."""
    name: str
    offered: bool
    why_not: str | None
    facts: dict[str, Any]


def forced_transport(transport: str | None) -> tuple[str | None, str | None]:
    """The transport a caller forces, and by what: ``transport=`` (``"argument"``),
    else ``KVTRANSFER_TRANSPORT``; ``(None, None)`` for the automatic choice (also
    what ``transport="auto"`` asks for, whatever the environment says)."""
    if transport == "auto":
        return None, None
    if transport:
        return transport, "argument"
    env = os.environ.get("KVTRANSFER_TRANSPORT") or None
    return env, "KVTRANSFER_TRANSPORT" if env else None

#: One READ as the C core takes it; ``Peer.read`` packs entries into this.
READ_REQ_DTYPE = np.dtype([("local_region", "<u8"), ("local_off", "<u8"), ("remote_region", "<u8"),
                           ("remote_key", "<u8"), ("remote_addr", "<u8"), ("remote_off", "<u8"),
                           ("len", "<u8")])
assert READ_REQ_DTYPE.itemsize == _C.READ_REQ_BYTES

Entry = tuple["Region", int, RegionDescriptor, int, int]

MAX_THREADS = _C.MAX_THREADS  # connections or copy threads per peer


class Region:
    """A local registration: keeps the memory registered and its owner alive.

    ``descriptor`` is what peers need to read it. ``verbs_registration`` says how the
    RDMA device got the memory: ``"host"``, ``"dmabuf"`` or ``"peermem"`` (GPUDirect),
    or None without verbs. ``close()`` refuses new reads at once and returns when reads
    being served from it (or writing into it) are done.
    """

    def __init__(self, engine: "Engine", region_id: int, mem: MemoryRange, descriptor: RegionDescriptor,
                 verbs_registration: str | None = None, cuda: dict[str, Any] | None = None):
        self._engine = engine
        self.id = region_id
        self.ptr = mem.ptr
        self.nbytes = mem.nbytes
        self.device = mem.device if mem.device_index < 0 else f"{mem.device}:{mem.device_index}"
        self.descriptor = descriptor
        self.verbs_registration = verbs_registration
        #: CUDA regions: ``alloc_base``, ``alloc_nbytes``, ``device``, ``pci_bus_id`` and
        #: ``ipc_status`` (0: same-host readers can open it through CUDA IPC; else the
        #: CUresult of cuIpcGetMemHandle, and shm reads of it fail saying so). None for host.
        self.cuda = cuda
        self._owner = mem.owner
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._engine._deregister(self)
        self._owner = None

    def __enter__(self) -> "Region":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # backstop only: close() is the contract
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Region {self.id:#x} {self.nbytes} bytes on {self.device}, {state}>"


class Transfer:
    """A batch of reads in flight: ``done()``, ``wait(timeout)``, or ``await``.

    On failure, ``wait`` (and ``await``) raise a :class:`TransferError` naming the first
    entry that failed, its ranges, the transport and the cause. ``done()`` is True once
    nothing writes the destination anymore, whether the reads succeeded or not.
    """

    def __init__(self, c: Any, reqs: "np.ndarray | _Columns", transport: str, keep: tuple,
                 nbytes: int | None = None):
        self._c = c
        self._reqs = reqs  # for messages about a failed entry
        self._keep = keep  # local Regions and the Peer: they must outlive the transfer
        self.transport = transport
        self.entries = len(reqs)
        self.nbytes = int(reqs["len"].sum()) if nbytes is None else nbytes
        self._notify_fd: int | None = None  # an eventfd the C core writes when finished
        self._futures: dict[asyncio.AbstractEventLoop, asyncio.Future] = {}

    def done(self) -> bool:
        return self._c.wait(0.0)

    def wait(self, timeout: float | None = None) -> None:
        """Blocks until finished, at most ``timeout`` seconds (None: until the reads end,
        which the engine's io timeout bounds). Raises TransferTimeoutError if still
        running at the deadline (the transfer goes on), TransferError if it failed."""
        if not self._c.wait(timeout):
            raise TransferTimeoutError(
                f"transfer of {self.entries} entries ({self.nbytes} bytes) over {self.transport} "
                f"still running after {timeout} s")
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        try:
            self._c.status()
        except TransferError as e:
            e.transport = self.transport
            if 0 <= e.entry < len(self._reqs):
                r = self._reqs[e.entry]
                where = (f"entry {e.entry} of {self.entries} (local region {int(r['local_region']):#x} "
                         f"+{int(r['local_off'])}, remote region {int(r['remote_region']):#x} "
                         f"+{int(r['remote_off'])}, {int(r['len'])} bytes)")
            else:
                where = f"transfer of {self.entries} entries"
            e.args = (f"{where} over {self.transport}: {e.args[0]}",)
            raise

    def __await__(self):
        if not self._c.wait(0.0):
            # shield: cancelling one awaiting task must not cancel the others' future
            yield from asyncio.shield(self._finished_future()).__await__()
        self._raise_if_failed()

    def notify_fd(self, fd: int) -> None:
        """Has the C core add 1 to eventfd ``fd`` when this transfer finishes (at once if it
        already has): one eventfd can watch many transfers from a poll loop. ``fd=-1``
        stops it; after that returns, the fd is never written. Not combinable with
        ``await`` on the same transfer (both use the one notification slot)."""
        self._c.set_notify_fd(fd)

    def _finished_future(self) -> asyncio.Future:
        """One future per event loop, resolved when the C core writes the eventfd; every
        task of that loop awaiting this transfer shares it."""
        loop = asyncio.get_running_loop()
        fut = self._futures.get(loop)
        if fut is not None:
            return fut
        if self._notify_fd is None:
            self._notify_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._c.set_notify_fd(self._notify_fd)
        fut = self._futures[loop] = loop.create_future()
        fd = self._notify_fd

        def on_ready() -> None:
            loop.remove_reader(fd)
            del self._futures[loop]
            if not fut.done():
                fut.set_result(None)
            if not self._futures:
                self._close_notify_fd()

        loop.add_reader(fd, on_ready)
        return fut

    def _close_notify_fd(self) -> None:
        if self._notify_fd is not None:
            self._c.set_notify_fd(-1)  # the C core never writes to it after this returns
            os.close(self._notify_fd)
            self._notify_fd = None

    def __del__(self) -> None:
        try:
            self._close_notify_fd()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"<Transfer {self.entries} entries, {self.nbytes} bytes over {self.transport}>"


class _Columns:
    """A batch kept as the columns it was given (int64 arrays, or one int for every
    entry), so that vectorized reads pass them to the C core without packing;
    ``batch[i]["field"]`` reads one entry back for error messages. ``paged``: one local
    and one remote region (read_blocks), which the C core takes as a paged batch."""

    def __init__(self, n: int, paged: bool = False, **cols: Any):
        self._n = n
        self._paged = paged
        self._cols = cols

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict[str, int]:
        return {k: int(v) if np.ndim(v) == 0 else int(v[i]) for k, v in self._cols.items()}

    def submit(self, c: Any) -> Any:
        k = self._cols
        read = c.read_paged if self._paged else c.read_cols
        return read(self._n, k["local_region"], k["local_off"], k["remote_region"], k["remote_key"],
                    k["remote_addr"], k["remote_off"], k["len"])


def _length_column(lengths: Any, shape: tuple) -> tuple[Any, int]:
    """Lengths as the C core takes them (one int, or an int64 array of ``shape``) and
    their sum."""
    ln = _offsets(lengths, "length", check_negative=False)
    if ln.ndim == 0:
        return int(ln), int(ln) * math.prod(shape)
    ln = np.broadcast_to(ln, shape)
    return ln, int(ln.sum())


class Peer:
    """A connection to another engine, over one transport (``.transport``)."""

    def __init__(self, engine: "Engine", c: Any, descriptor: EngineDescriptor, transport: str,
                 tried: Sequence[Reach] = ()):
        self._engine = engine
        self._c = c
        self.descriptor = descriptor
        self.transport = transport
        #: transports that reached the peer but failed to connect before this one did
        self.tried: tuple[Reach, ...] = tuple(tried)
        self._closed = False

    def read(self, entries: Sequence[Entry]) -> Transfer:
        """Starts reading a batch; each entry is ``(local Region, local offset,
        remote RegionDescriptor, remote offset, nbytes)`` (offsets and sizes in bytes).
        Thousands of entries per call are expected. Local ranges are checked now
        (InvalidArgumentError names the entry); remote ranges by the target."""
        n = len(entries)
        if n == 0:
            raise InvalidArgumentError("read: empty batch", op="read")
        try:
            locals_, loffs, remotes, roffs, lens = zip(*entries)
        except (TypeError, ValueError):
            raise InvalidArgumentError(
                "read: each entry is (local Region, local offset, remote RegionDescriptor, remote offset, nbytes)",
                op="read") from None
        reqs = np.empty(n, READ_REQ_DTYPE)
        local_ids = _check_each(locals_, self._local_problem)
        reqs["local_region"] = [r.id for r in locals_] if len(local_ids) > 1 else local_ids[0].id
        remote_descs = _check_each(remotes, self._remote_problem)
        if len(remote_descs) == 1:
            d = remote_descs[0]
            reqs["remote_region"] = d.region_id
            reqs["remote_key"] = d.key
            reqs["remote_addr"] = d.addr
        else:
            reqs["remote_region"] = [d.region_id for d in remotes]
            reqs["remote_key"] = [d.key for d in remotes]
            reqs["remote_addr"] = [d.addr for d in remotes]
        reqs["local_off"] = _offsets(loffs, "local offset")
        reqs["remote_off"] = _offsets(roffs, "remote offset")
        reqs["len"] = _offsets(lens, "length")
        return self._submit(reqs, tuple(local_ids))

    def read_blocks(self, local: Region, local_offsets: Any, remote: RegionDescriptor, remote_offsets: Any,
                    lengths: Any) -> Transfer:
        """Vectorized :meth:`read` for one local and one remote region: offsets are
        int arrays (bytes), ``lengths`` an array or one int for every block."""
        if (type(local_offsets) is np.ndarray and type(remote_offsets) is np.ndarray and type(lengths) is int
                and local_offsets.dtype == _INT64 and remote_offsets.dtype == _INT64 and local_offsets.ndim == 1
                and local_offsets.shape == remote_offsets.shape and not self._closed
                and self._local_problem(local) is None and self._remote_problem(remote) is None):
            # the usual call, without the conversions below: ~3 us sooner to the C core,
            # which checks every range (and starts the first copy) itself
            n = len(local_offsets)
            batch = _Columns(n, True, local_region=local.id, local_off=local_offsets,
                             remote_region=remote.region_id, remote_key=remote.key, remote_addr=remote.addr,
                             remote_off=remote_offsets, len=lengths)
            c = self._c.read_paged(n, local.id, local_offsets, remote.region_id, remote.key, remote.addr,
                                   remote_offsets, lengths)
            return Transfer(c, batch, self.transport, (local, self), lengths * n)
        _check_each([local], self._local_problem)
        _check_each([remote], self._remote_problem)
        lo = _offsets(local_offsets, "local offset", check_negative=False)
        ro = _offsets(remote_offsets, "remote offset", check_negative=False)
        if lo.ndim != 1 or lo.shape != ro.shape:
            raise InvalidArgumentError(f"read_blocks: offsets must be 1-D of one length, got {lo.shape} and "
                                       f"{ro.shape}", op="read")
        ln, nbytes = _length_column(lengths, lo.shape)
        batch = _Columns(len(lo), True, local_region=local.id, local_off=lo, remote_region=remote.region_id,
                         remote_key=remote.key, remote_addr=remote.addr, remote_off=ro, len=ln)
        return self._submit(batch, (local,), nbytes)

    def read_indexed(self, locals_: Sequence[Region], local_index: Any, local_offsets: Any,
                     remotes: Sequence[RegionDescriptor], remote_index: Any, remote_offsets: Any,
                     lengths: Any) -> Transfer:
        """Vectorized :meth:`read` over several regions on each side: entry ``i`` reads
        ``lengths[i]`` bytes from ``remotes[remote_index[i]]`` at ``remote_offsets[i]`` into
        ``locals_[local_index[i]]`` at ``local_offsets[i]`` (int arrays, bytes). This is how a
        KV plan (:func:`kvtransfer.kv.plan_reads`) is read without a Python loop per entry."""
        locals_ = list(locals_)
        remotes = list(remotes)
        if not locals_ or not remotes:
            raise InvalidArgumentError("read_indexed: needs at least one local and one remote region", op="read")
        _check_each(locals_, self._local_problem)
        _check_each(remotes, self._remote_problem)
        li = _offsets(local_index, "local region index")
        ri = _offsets(remote_index, "remote region index")
        lo = _offsets(local_offsets, "local offset", check_negative=False)
        ro = _offsets(remote_offsets, "remote offset", check_negative=False)
        if lo.ndim != 1 or not (li.shape == ri.shape == lo.shape == ro.shape):
            raise InvalidArgumentError("read_indexed: indexes and offsets must be 1-D arrays of one length", op="read")
        if len(lo) == 0:
            raise InvalidArgumentError("read: empty batch", op="read")
        for idx, regions, what in ((li, locals_, "local"), (ri, remotes, "remote")):
            if int(idx.max()) >= len(regions):
                i = int(np.argmax(idx >= len(regions)))
                raise InvalidArgumentError(f"read: entry {i}: {what} region index {int(idx[i])} out of range "
                                           f"({len(regions)} given)", op="read")
        ln, nbytes = _length_column(lengths, lo.shape)

        def column(values: list[int], index: np.ndarray) -> Any:
            return values[0] if len(values) == 1 else np.array(values, np.uint64)[index]

        one_to_one = len(locals_) == 1 and len(remotes) == 1  # a paged batch, as read_blocks'
        batch = _Columns(len(lo), one_to_one, local_region=column([r.id for r in locals_], li), local_off=lo,
                         remote_region=column([d.region_id for d in remotes], ri),
                         remote_key=column([d.key for d in remotes], ri),
                         remote_addr=column([d.addr for d in remotes], ri), remote_off=ro, len=ln)
        return self._submit(batch, tuple(locals_), nbytes)

    def _submit(self, reqs: "np.ndarray | _Columns", keep: tuple, nbytes: int | None = None) -> Transfer:
        if self._closed:
            raise InvalidArgumentError("read on a closed peer", errno=_errno.EBADF, op="read")
        c = reqs.submit(self._c) if isinstance(reqs, _Columns) else self._c.read(reqs)
        return Transfer(c, reqs, self.transport, (*keep, self), nbytes)

    def _local_problem(self, r: Any) -> tuple[int, str] | None:
        if not isinstance(r, Region) or r._engine is not self._engine:
            return _errno.EINVAL, f"local side must be a Region of this engine, got {r!r}"
        if r.closed:
            return _errno.EBADF, f"local {r!r} is closed"
        return None

    def _remote_problem(self, d: Any) -> tuple[int, str] | None:
        if not isinstance(d, RegionDescriptor):
            return _errno.EINVAL, f"remote side must be a RegionDescriptor, got {type(d).__name__}"
        if d.engine_id != self.descriptor.engine_id:
            return _errno.EINVAL, (f"remote region {d.region_id:#x} belongs to engine {d.engine_id.hex()}, "
                                   f"this peer is {self.descriptor.engine_id.hex()}")
        return None

    def close(self) -> None:
        """Closes the connection; reads still queued fail with ECANCELED."""
        if not self._closed:
            self._closed = True
            self._c.close()
            self._engine._peers.discard(self)

    def __enter__(self) -> "Peer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Peer {self.descriptor.engine_id.hex()[:8]} via {self.transport}>"


def _hint_nvrtc() -> None:
    """Tells the C core where pip-installed NVRTC lives (``KVTRANSFER_NVRTC``), unless the
    caller named one; the C core reads it when it first compiles the gather kernel."""
    if not os.environ.get("KVTRANSFER_NVRTC"):
        path = find_nvrtc()
        if path:
            os.environ["KVTRANSFER_NVRTC"] = path


_INT64 = np.dtype(np.int64)


def _check_each(objs: Sequence[Any], problem: Any) -> list[Any]:
    """Checks each distinct object once; an error names the first entry holding it.
    Returns the distinct objects, in order of first use."""
    distinct = list({id(o): o for o in objs}.values())
    for obj in distinct:
        found = problem(obj)
        if found:
            err, text = found
            entry = next(i for i, o in enumerate(objs) if o is obj)
            raise InvalidArgumentError(f"read: entry {entry}: {text}", errno=err, op="read")
    return distinct


def _offsets(values: Any, what: str, check_negative: bool = True) -> np.ndarray:
    """Byte offsets or lengths as int64: integers only (no silent float truncation),
    none negative; an error names the entry. ``check_negative=False`` leaves that
    check to the C core (it refuses negative offsets and lengths of every entry before
    anything is sent, naming the entry), so large batches are scanned once, not twice."""
    a = np.asarray(values)
    if a.dtype.kind not in "iu":
        if a.size:
            raise InvalidArgumentError(f"read: every {what} must be an integer, got {a.dtype} values", op="read")
        a = a.astype(np.int64)
    if a.dtype.kind == "u" and a.size and int(a.max()) > np.iinfo(np.int64).max:
        raise InvalidArgumentError(f"read: {what} {int(a.max())} is too large", op="read")
    a = a.astype(np.int64, copy=False)
    if check_negative and a.size and (neg := a < 0).any():
        if a.ndim == 0:
            raise InvalidArgumentError(f"read: negative {what} {int(a)}", op="read")
        i = int(np.argmax(neg))
        raise InvalidArgumentError(f"read: entry {i}: negative {what} {int(a[i])}", op="read")
    return a


#: Length of a tcp server access token (see :meth:`Engine.require_tokens`).
TOKEN_BYTES = 32


def _check_token(token: Any, op: str) -> None:
    if not isinstance(token, bytes) or len(token) != TOKEN_BYTES:
        raise InvalidArgumentError(f"a token is {TOKEN_BYTES} bytes, got {token!r:.80}", op=op)


class Engine:
    """A transfer engine: a region table, a tcp server thread, and peers.

    ``listen_host``/``listen_port``: where the tcp server binds (default loopback, any
    free port). ``io_timeout``: seconds without progress after which a read fails
    (a dead or hung peer). ``tcp_connections``: streams per tcp peer.
    ``shm_threads``: copy threads per shm peer. ``verbs_qps``: RC queue pairs per verbs
    peer. ``use_verbs=False`` leaves RDMA devices alone. ``verbs_unavailable`` says why
    this engine has no verbs (``None`` when it has).

    The tcp server's limits: ``tcp_idle_timeout`` (seconds a connection may wait between
    requests), ``tcp_max_connections`` in total and ``tcp_max_connections_per_peer``
    (per peer address; a connection over either is refused with EBUSY), and
    ``tcp_max_frame_bytes`` (what one request may ask for; more is refused with
    EMSGSIZE). ``None`` keeps the C core's default (60 s, 1024, 256, 64 MiB). Each
    hello and each request must also finish within ``io_timeout``, however slowly its
    bytes trickle. :meth:`server_stats` counts connections and refusals.
    """

    def __init__(self, *, listen_host: str = "127.0.0.1", listen_port: int = 0, io_timeout: float = 10.0,
                 tcp_connections: int = 4, shm_threads: int = 2, verbs_qps: int = 2, use_verbs: bool = True,
                 tcp_idle_timeout: float | None = None, tcp_max_connections: int | None = None,
                 tcp_max_connections_per_peer: int | None = None, tcp_max_frame_bytes: int | None = None):
        if not io_timeout >= 0.001:
            raise InvalidArgumentError(f"io_timeout must be at least 0.001 s, got {io_timeout}", op="engine")
        for name, value in (("tcp_connections", tcp_connections), ("shm_threads", shm_threads)):
            if not 1 <= value <= MAX_THREADS:
                raise InvalidArgumentError(f"{name} must be in [1, {MAX_THREADS}], got {value}", op="engine")
        if not 1 <= verbs_qps <= _C.VERBS_MAX_QPS:
            raise InvalidArgumentError(f"verbs_qps must be in [1, {_C.VERBS_MAX_QPS}], got {verbs_qps}", op="engine")
        self._c = _C.Engine(listen_host=listen_host, listen_port=listen_port, io_timeout_ms=round(io_timeout * 1000),
                            tcp_conns=tcp_connections, shm_threads=shm_threads, verbs_qps=verbs_qps,
                            use_verbs=use_verbs)
        limits = {"tcp_idle_timeout": tcp_idle_timeout, "tcp_max_connections": tcp_max_connections,
                  "tcp_max_connections_per_peer": tcp_max_connections_per_peer,
                  "tcp_max_frame_bytes": tcp_max_frame_bytes}
        for name, value in limits.items():
            if value is not None and not value > 0:
                self._c.close()
                raise InvalidArgumentError(f"{name} must be positive, got {value}", op="engine")
        self.tcp_limits: dict[str, int] = self._c.set_tcp_limits(
            round((tcp_idle_timeout or 0) * 1000), tcp_max_connections or 0, tcp_max_connections_per_peer or 0,
            tcp_max_frame_bytes or 0)
        info = self._c.info()
        self.descriptor = EngineDescriptor(
            engine_id=info["engine_id"], hostname=socket.gethostname(), boot_id=info["boot_id"],
            pid=info["pid"], pidns=info["pidns"], table_fd=info["table_fd"], table_addr=info["table_addr"],
            tcp_host=info["tcp_host"], tcp_port=info["tcp_port"], verbs=info["verbs"], ib_device=info["ib_device"],
            gid=info["gid"])
        self.verbs_unavailable: str | None = None if info["verbs"] else info["verbs_why"]
        self._regions: "weakref.WeakSet[Region]" = weakref.WeakSet()
        self._peers: "weakref.WeakSet[Peer]" = weakref.WeakSet()
        self._lock = threading.Lock()
        log.debug("engine %s listening on %s:%d", self.id, info["tcp_host"], info["tcp_port"])

    @property
    def id(self) -> str:
        return self.descriptor.engine_id.hex()

    def require_tokens(self) -> None:
        """From now on the tcp server (tcp reads and verbs setup) admits a connection
        only if its hello carries a token allowed with :meth:`allow_token`; others are
        refused with EACCES ("token refused"). Connections already open stay."""
        self._require_open("require_tokens")
        self._c.require_tokens()

    def allow_token(self, token: bytes, ttl_s: float | None = None) -> None:
        """Admits connections presenting ``token`` (32 bytes) for ``ttl_s`` seconds
        (``None``: until revoked). Allowing it again sets its expiry anew; at expiry it
        is revoked."""
        self._require_open("allow_token")
        _check_token(token, "allow_token")
        if ttl_s is not None and not ttl_s > 0:
            raise InvalidArgumentError(f"ttl_s must be positive or None, got {ttl_s}", op="allow_token")
        self._c.allow_token(token, -1 if ttl_s is None else max(1, round(ttl_s * 1000)))

    def revoke_token(self, token: bytes) -> int:
        """Refuses ``token`` from now on and drops the connections that presented it;
        returns how many were dropped (0 for a token not allowed)."""
        self._require_open("revoke_token")
        _check_token(token, "revoke_token")
        return self._c.revoke_token(token)

    def server_stats(self) -> dict[str, int]:
        """The tcp server now: ``connections`` open, ``threads`` (the acceptor and one
        per connection), and counts since start: ``accepted``, ``refused_busy`` (over a
        connection cap), ``refused_token``, ``dropped_idle``, ``dropped_deadline`` (a
        hello or request slower than ``io_timeout``), ``dropped_revoked``,
        ``refused_frames`` (over ``tcp_max_frame_bytes``), ``accept_backoffs`` (accept
        paused: no descriptors or memory left)."""
        self._require_open("server_stats")
        return self._c.tcp_stats()

    def register(self, obj: Any) -> tuple[Region, RegionDescriptor]:
        """Registers ``obj``'s memory for remote reads (see :mod:`kvtransfer.memory` for
        what is accepted). Register few large regions (whole pools), never per block."""
        self._require_open("register")
        mem = describe(obj)
        if mem.nbytes <= 0:
            raise InvalidArgumentError(f"cannot register an empty range ({mem.nbytes} bytes)", op="register")
        kind = _C.MEM_CUDA if mem.device == "cuda" else _C.MEM_HOST
        if kind == _C.MEM_CUDA:
            _hint_nvrtc()
        region_id, key, verbs_path = self._c.register(mem.ptr, mem.nbytes, kind, mem.device_index)
        cuda: dict[str, Any] = {}
        if kind == _C.MEM_CUDA:
            cuda = self._c.region_cuda(region_id)
            if mem.device_index < 0:
                mem = MemoryRange(mem.ptr, mem.nbytes, mem.device, cuda["device"], mem.owner)
        desc = RegionDescriptor(engine_id=self.descriptor.engine_id, region_id=region_id, addr=mem.ptr,
                                nbytes=mem.nbytes, device=mem.device, device_index=mem.device_index, key=key,
                                pci_bus_id=cuda.get("pci_bus_id", ""), alloc_base=cuda.get("alloc_base", 0),
                                alloc_nbytes=cuda.get("alloc_nbytes", 0))
        region = Region(self, region_id, mem, desc, verbs_path or None, cuda or None)
        if verbs_path and kind == _C.MEM_CUDA:
            log.info("engine %s: CUDA region %#x registered with the NIC through %s", self.id[:8], region_id,
                     verbs_path)
        self._regions.add(region)
        return region, desc

    def _require_open(self, op: str) -> None:
        if self._c is None:
            raise InvalidArgumentError(f"{op} on a closed engine", errno=_errno.EBADF, op=op)

    def _deregister(self, region: Region) -> None:
        self._regions.discard(region)
        if self._c is not None:
            self._c.deregister(region.id)

    def connect(self, peer: EngineDescriptor | bytes, *, transport: str | None = None,
                token: bytes | None = None) -> Peer:
        """Connects to another engine over the first transport of :meth:`plan` that
        reaches it and connects (see module docs); ``.tried`` on the peer lists those
        that failed first. A forced transport that cannot run raises
        :class:`TransportUnavailableError`, as does a peer no transport reaches.
        ``token`` (32 bytes): presented in every tcp hello (tcp reads, verbs setup), for
        a peer that requires tokens (:meth:`require_tokens`); one it refuses raises
        with errno EACCES. shm and map reads do not pass the tcp server and need none."""
        self._require_open("connect")
        if token is not None:
            _check_token(token, "connect")
        desc = self._descriptor_of(peer)
        forced, _ = forced_transport(transport)
        try:
            c, tried = self._c.connect(desc, forced, token)
        except KVTransferError as e:
            raise _unavailable(e) from e
        tried = [Reach(*t) for t in tried]
        for t in tried:
            log.info("engine %s: %s to %s failed (%s); tried the next transport", self.id[:8], t.name,
                     desc.engine_id.hex()[:8], t.why)
        p = Peer(self, c, desc, c.transport, tried)
        self._peers.add(p)
        log.info("engine %s: peer %s via %s%s", self.id[:8], desc.engine_id.hex()[:8], p.transport,
                 " (forced)" if forced else "")
        return p

    def plan(self, peer: EngineDescriptor | bytes, *, transport: str | None = None) -> list[Reach]:
        """The transports :meth:`connect` would try for ``peer``, in its order, each with
        whether it reaches the peer and why (not); forced (``transport=`` or
        ``KVTRANSFER_TRANSPORT``): that one alone. The C core's table decides; this
        asks it. Raises :class:`InvalidArgumentError` for an unknown name and
        :class:`TransportUnavailableError` for a forced one that cannot reach the peer."""
        self._require_open("plan")
        desc = self._descriptor_of(peer)
        try:
            return [Reach(*r) for r in self._c.plan(desc, forced_transport(transport)[0])]
        except KVTransferError as e:
            raise _unavailable(e) from e

    def transports(self) -> list[Offer]:
        """What each transport of the table offers on this engine, in preference order."""
        self._require_open("transports")
        return [Offer(*t) for t in self._c.transports()]

    @staticmethod
    def _descriptor_of(peer: EngineDescriptor | bytes) -> EngineDescriptor:
        desc = EngineDescriptor.from_bytes(peer) if isinstance(peer, (bytes, bytearray, memoryview)) else peer
        if not isinstance(desc, EngineDescriptor):
            raise InvalidArgumentError(f"connect needs an EngineDescriptor, got {type(peer).__name__}", op="connect")
        return desc

    def close(self) -> None:
        """Closes peers, then regions (waiting for reads they serve), then the engine."""
        with self._lock:
            if self._c is None:
                return
            for p in list(self._peers):
                p.close()
            for r in list(self._regions):
                r.close()
            c, self._c = self._c, None
        c.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # backstop only
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"<Engine {self.id[:8]} tcp {self.descriptor.tcp_host}:{self.descriptor.tcp_port}>"
