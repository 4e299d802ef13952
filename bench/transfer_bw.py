"""READ bandwidth of the transfer engine between two processes, in the style of ib_read_bw.

    .venv/bin/python bench/transfer_bw.py                                   # shm, tcp, memcpy, zmq
    .venv/bin/python bench/transfer_bw.py --sizes 16K,256K,4M --total 256M --iters 10 --json bw.json
    .venv/bin/python bench/transfer_bw.py --transports tcp,zmq --tcp-connections 8
    make bench BENCH_ARGS="--total 64M"

A target process (``python -m kvtransfer.testing.target``) registers ``--total`` seeded random
bytes; this process registers a destination of the same size (``alloc_host``: huge
pages, pre-faulted) and reads the target's bytes with one-sided READs. The buffer is
cut into blocks of each ``--sizes`` size, and blocks are read the way KV pages are: in a
random permutation, remote block ``perm[i]`` into local block ``i``. One pass reads every
block, all in ONE ``peer.read_blocks(...)`` batch, then ``transfer.wait()``.

For every (system, size): one verifying pass (destination zeroed first, then every byte
checked against the seeded bytes gathered by the permutation; a mismatch names the
block and exits 1), ``--warmup`` untimed passes, then ``--iters`` timed passes.

Systems (``--transports``, default all four, run over the same bytes and permutation):

* ``map``    kvtransfer over the map transport (asked for: the target then holds its bytes
             in shared memory, mapped here once and copied with memcpy; ``--shm-threads``).
* ``shm``    kvtransfer over the shm transport (``process_vm_readv``; ``--shm-threads``).
* ``tcp``    kvtransfer over the tcp transport on loopback (``--tcp-connections``).
* ``memcpy`` baseline, the ceiling for shm: a single-thread gather copy in one process,
             ``np.take(src_blocks, perm, axis=0, out=dst_blocks)`` from a local copy of
             the seeded bytes into the same destination.
* ``zmq``    baseline, the CPU-mediated path kvtransfer exists to beat: a helper process
             (bench/zmq_sender.py) holding the seeded bytes pushes the blocks in
             permutation order over a ZeroMQ PUSH socket on loopback tcp, one zero-copy
             message per block (pyzmq copies messages under 64 KiB anyway); this
             process receives each one and copies it into place.
             A REQ/REP control socket starts each pass; its round trip is timed.

Columns (one row per block size; GB/s is 10^9 bytes per second, K/M/G are powers of 1024):

* ``#bytes``         block size.
* ``#blocks``        blocks per pass (``--total // size``), i.e. entries of the batch.
* ``BW avg[GB/s]``   bytes of all timed passes / their total time.
* ``BW peak[GB/s]``  bytes of one pass / time of the fastest pass.
* ``MsgRate[Mops]``  blocks per second over all timed passes, in millions.
* ``p50[us]``, ``p99[us]``  percentiles of the time of one whole pass (one batch), in
  microseconds; with few ``--iters``, p99 is about the slowest pass.

A pass is timed from the call that starts it (``read_blocks``; for zmq the control
request) to the last byte in place (``wait`` returns; for zmq the last block copied).
After the tables, one line per size gives the ratios of BW avg: shm/memcpy and tcp/zmq.
``--json FILE`` writes a list of records ``{"system", "block_bytes", "blocks", "iters",
"bw_avg_gbps", "bw_peak_gbps", "mops", "p50_us", "p99_us"}``.

Other libraries, repetitions, two hosts, KV shapes, pictures (bench/README.md has a run):

* ``--peers nixl,mooncake`` adds ``nixl-sm``, ``nixl-tcp`` (NIXL's UCX backend) and
  ``mooncake-tcp`` (Mooncake's Transfer Engine) on the same bytes, sizes and permutations,
  from their own environment (``make bench-peers``); bench/peers.py and bench/peer_*.py.
  A peer that cannot start is a row that says why; the header prints each one's settings.
* ``--reps N`` interleaves the systems' timed passes (A B C A B C ...) N times and adds
  median [min-max] per system and each ratio computed pair by pair within a repetition.
* ``--serve [--listen-host H --port P]`` runs only the target, like ib_read_bw's server;
  ``--connect H:P`` reads from it over tcp or verbs (bench/remote.py).
* ``--model-shape NAME --prompt-tokens N`` moves one request's paged KV instead, layer by
  layer (bench/kv_shapes.py): total time, time to the first layer, each layer's time.
* ``--plot FILE.png`` draws the run (bench/plot.py). ``--json`` and ``--plot`` paths are
  checked before any work.

``--device cuda`` (a GPU machine: torch with CUDA) moves GPU memory instead, between a
target process holding the seeded bytes in a CUDA tensor and this process reading them
into a CUDA tensor; defaults: ``--total 512M --sizes 32K,256K,512M`` (16,384 scattered
32 KiB blocks, 2,048 of 256 KiB, one contiguous 512 MiB range). Systems:

* ``shm``      kvtransfer over shm: CUDA IPC, batched device-to-device copies.
* ``tcp``      kvtransfer over tcp on loopback, device memory on both ends (pinned staging).
* ``tcp-host`` kvtransfer over tcp with host memory on both ends (what ``tcp`` is held to).
* ``d2d``      baseline, the ceiling: ``dst.copy_(src)`` of the same number of bytes, one
               contiguous device-to-device copy in one process.
* ``gather``   baseline: ``torch.index_select`` of the same scattered blocks in one process.
* ``kernel``   diagnostic: the engine's batched copy alone (``kvtransfer._C.cuda_gather``: the
               same blocks as 64 KiB-or-smaller descriptors, uploaded, one launch, waited), in
               one process: what shm would reach with no transport around it.
* ``cpu``      baseline, the CPU-mediated path: a sender process gathers the blocks on its
               GPU, copies them to pinned host memory in 8 MiB chunks and pushes each chunk
               over ZeroMQ (loopback tcp) as soon as it is there; this process receives
               each into pinned memory and copies it to the device (non-blocking), then
               synchronizes.

Torch baselines are timed like the engine: wall clock from the call to the bytes in
place (``torch.cuda.synchronize()``). Ratios: shm/d2d, shm/gather, shm/cpu, tcp/tcp-host.
The engine's own CUDA streams are not ordered with torch's: destinations are zeroed and
synchronized before a verifying pass. The header names the GPU, the driver and how
batched copies run (``kvtransfer._C.cuda_copy_info()``).

Exit status: 0 when every pass ran and verified, 1 on a verification mismatch, 2 on any
other error (a failed read, a child process that died or went quiet).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import zmq

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this checkout's kvtransfer

import kvtransfer  # noqa: E402
from kvtransfer import Engine, KVTransferError, Peer, Region, RegionDescriptor, alloc_host  # noqa: E402
from kvtransfer.testing import children  # noqa: E402
from gather_sweep import descs as gather_descs  # bench/gather_sweep.py (no cupy at import)
from report import cpu_model, kv_lines, out_path_problem
import peers  # bench/peers.py: NIXL and Mooncake in the same run (--peers)
import remote  # bench/remote.py: --serve and --connect, two hosts
import kv_shapes  # bench/kv_shapes.py: --model-shape, one request's paged KV
import plot  # bench/plot.py: --plot (matplotlib imported only when drawing)
from kvtransfer.testing.target import parse_size, seeded_bytes

ENGINE_TRANSPORTS = ("verbs", "map", "shm", "tcp")
BASELINES = ("memcpy", "zmq")
SYSTEMS = ENGINE_TRANSPORTS + BASELINES
CUDA_SYSTEMS = ("shm", "tcp", "tcp-host", "d2d", "gather", "kernel", "cpu")
KERNEL_VARIANTS = ("kernel0", "kernel1")  # csrc/cuda_copy.c's shapes, on request
CUDA_RATIOS = (("shm", "d2d"), ("shm", "gather"), ("shm", "cpu"), ("tcp", "tcp-host"), ("kernel", "d2d"),
               ("shm", "kernel"))
COPY_CHUNK = 32 << 10  # csrc/cuda_copy.h KVT_COPY_CHUNK: how the transports cut long ranges
CUDA_CHUNK = 8 << 20  # the cpu baseline's message size
GPU_WARMUP_S = 0.25  # untimed passes per system and size, at least (after --warmup passes)
DEFAULT_SYSTEMS = ("shm", "tcp") + BASELINES  # verbs needs an RDMA device: ask for it
COLUMNS = ("#bytes", "#blocks", "BW avg[GB/s]", "BW peak[GB/s]", "MsgRate[Mops]", "p50[us]", "p99[us]")
RATIOS = (("map", "memcpy"), ("shm", "memcpy"), ("tcp", "zmq"))

STARTUP_TIMEOUT_S = 60.0  # for a child to print its descriptors (it fills --total bytes first)
PASS_TIMEOUT_S = 60.0     # for one pass (transfer.wait)
RECV_TIMEOUT_S = 10.0     # for any one zmq message
STOP_TIMEOUT_S = 10.0     # for a child to exit once its stdin is closed

SYSTEM_TITLES = {
    "verbs": "kvtransfer READ over verbs (RDMA READ, {verbs_qps} queue pairs)",
    "map": "kvtransfer READ over map (the target's shared memory mapped once, memcpy, {shm_threads} threads)",
    "shm": "kvtransfer READ over shm (process_vm_readv, {shm_threads} copy threads)",
    "tcp": "kvtransfer READ over tcp (loopback, {tcp_connections} connections)",
    "memcpy": "baseline: single-thread gather copy in one process (np.take), the ceiling for shm",
    "zmq": "baseline: CPU-mediated ZeroMQ PUSH/PULL on loopback, one message per block, copied in place",
    "nixl-sm": "peer: NIXL READ, UCX backend over shared memory (bench/peer_nixl.py)",
    "nixl-tcp": "peer: NIXL READ, UCX backend over tcp on loopback (bench/peer_nixl.py)",
    "mooncake-tcp": "peer: Mooncake Transfer Engine READ over tcp on loopback (bench/peer_mooncake.py)",
    "tcp-host": "kvtransfer READ over tcp (loopback, {tcp_connections} connections), host memory on both ends",
    "d2d": "baseline, the ceiling: one contiguous device-to-device copy_ of the same bytes, one process",
    "gather": "baseline: torch.index_select of the same scattered blocks, one process",
    "cpu": "baseline: CPU-mediated: GPU gather, device->pinned host, ZeroMQ (8 MiB messages), host->device",
    "kernel": "diagnostic: kvtransfer's batched copy alone (one launch of the same blocks, one process, waited)",
    **{f"kernel{k}": f"diagnostic: the same with gather kernel shape {k} (csrc/cuda_copy.c: 0 device, 1 staged)"
       for k in range(2)},
}
CUDA_TITLES = {"shm": "kvtransfer READ over shm (CUDA IPC, batched device copies, {shm_threads} threads)",
               "tcp": "kvtransfer READ over tcp (loopback, {tcp_connections} connections), device memory, "
                      "pinned staging"}


class BenchError(Exception):
    """The benchmark could not run (exit status 2)."""


class VerifyError(BenchError):
    """A verifying pass read the wrong bytes (exit status 1)."""


# --------------------------------------------------------------------------- layout

@dataclass(frozen=True)
class Layout:
    """One block size: ``blocks`` blocks, remote block ``perm[i]`` goes to local block ``i``."""

    block_bytes: int
    blocks: int
    perm: np.ndarray

    @property
    def pass_bytes(self) -> int:
        return self.block_bytes * self.blocks

    def view(self, buf: np.ndarray) -> np.ndarray:
        """``buf`` as a (blocks, block_bytes) array."""
        return buf[:self.pass_bytes].reshape(self.blocks, self.block_bytes)


def make_layout(block_bytes: int, total: int, seed: int) -> Layout:
    blocks = total // block_bytes
    perm = np.random.default_rng([seed, block_bytes]).permutation(blocks).astype(np.int64)
    return Layout(block_bytes, blocks, perm)


def gather(src: np.ndarray, layout: Layout, out: np.ndarray) -> np.ndarray:
    """``out`` block i = ``src`` block perm[i], single-threaded. mode="clip" (perm is in
    range anyway): with the default mode="raise" and ``out``, numpy copies through a
    temporary buffer of the whole output, which made this several times slower."""
    return np.take(layout.view(src), layout.perm, axis=0, out=layout.view(out), mode="clip")


# --------------------------------------------------------------------------- systems

class Runner(Protocol):
    """One system: ``prepare`` once per block size (untimed), then ``run_pass`` reads every
    block of the layout into the destination and returns once all bytes are in place."""

    def prepare(self, layout: Layout, dst: np.ndarray) -> None: ...

    def run_pass(self) -> None: ...


class EngineRunner:
    """kvtransfer: one ``read_blocks`` batch per pass over one peer."""

    def __init__(self, peer: Peer, local: Region, remote: RegionDescriptor):
        self.peer, self.local, self.remote = peer, local, remote
        self.block_bytes = 0
        self.local_offs = self.remote_offs = np.empty(0, np.int64)
        self.submit_ns: list[int] = []

    def prepare(self, layout: Layout, dst: np.ndarray) -> None:
        self.submit_ns = []
        self.block_bytes = layout.block_bytes
        self.local_offs = np.arange(layout.blocks, dtype=np.int64) * layout.block_bytes
        self.remote_offs = layout.perm * layout.block_bytes

    def run_pass(self) -> None:
        t0 = time.perf_counter_ns()
        t = self.peer.read_blocks(self.local, self.local_offs, self.remote, self.remote_offs, self.block_bytes)
        self.submit_ns.append(time.perf_counter_ns() - t0)  # the call alone: packing, checks, queueing
        t.wait(PASS_TIMEOUT_S)


class MemcpyRunner:
    """Baseline: the same gather as a single-thread copy inside one process."""

    def __init__(self, src: np.ndarray):
        self.src = src
        self.layout: Layout | None = None
        self.dst = src

    def prepare(self, layout: Layout, dst: np.ndarray) -> None:
        self.layout, self.dst = layout, dst

    def run_pass(self) -> None:
        assert self.layout is not None
        gather(self.src, self.layout, self.dst)


class ZmqRunner:
    """Baseline: blocks pushed by bench/zmq_sender.py, received and copied into place."""

    def __init__(self, info: dict):
        self.ctx = zmq.Context()
        self.ctrl = self.ctx.socket(zmq.REQ)
        self.pull = self.ctx.socket(zmq.PULL)
        for s in (self.ctrl, self.pull):
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RCVTIMEO, int(RECV_TIMEOUT_S * 1000))
            s.setsockopt(zmq.SNDTIMEO, int(RECV_TIMEOUT_S * 1000))
        self.ctrl.connect(info["ctrl"])
        self.pull.connect(info["data"])
        self.dst_blocks = np.empty((0, 0), np.uint8)

    def request(self, *parts: bytes) -> None:
        try:
            self.ctrl.send_multipart(parts)
            reply = self.ctrl.recv()
        except zmq.Again:
            raise BenchError(f"zmq sender did not answer {parts[0].decode()!r} in {RECV_TIMEOUT_S} s") from None
        if reply != b"ok":
            raise BenchError(f"zmq sender refused {parts[0].decode()!r}: {reply.decode(errors='replace')}")

    def prepare(self, layout: Layout, dst: np.ndarray) -> None:
        self.request(b"perm", str(layout.block_bytes).encode(), layout.perm.tobytes())
        self.dst_blocks = layout.view(dst)

    def run_pass(self) -> None:
        self.request(b"go")
        dst_blocks = self.dst_blocks
        for i in range(len(dst_blocks)):
            try:
                frame = self.pull.recv(copy=False)
            except zmq.Again:
                raise BenchError(f"zmq: block {i} of {len(dst_blocks)} did not come in {RECV_TIMEOUT_S} s") from None
            try:
                dst_blocks[i] = np.frombuffer(frame.buffer, np.uint8)
            except ValueError:
                raise BenchError(f"zmq: block {i} is {len(frame.buffer)} bytes, expected "
                                 f"{dst_blocks.shape[1]}") from None

    def close(self) -> None:
        self.ctrl.close(linger=0)
        self.pull.close(linger=0)
        self.ctx.term()


# --------------------------------------------------------------------------- child processes

def start_child(cmd: list[str], what: str, stack: contextlib.ExitStack) -> tuple[subprocess.Popen, dict]:
    """Starts ``cmd`` (stopped when ``stack`` unwinds) and parses the JSON line it prints."""
    try:
        proc, hello = children.start_child(cmd, STARTUP_TIMEOUT_S, what)
    except children.ChildError as e:
        raise BenchError(str(e)) from None
    stack.callback(children.stop_child, proc, STOP_TIMEOUT_S)
    return proc, hello


# --------------------------------------------------------------------------- measuring

@dataclass
class Result:
    system: str
    block_bytes: int
    blocks: int
    pass_ns: list[int]

    @property
    def iters(self) -> int:
        return len(self.pass_ns)

    @property
    def bw_avg_gbps(self) -> float:  # bytes per ns is GB/s
        return self.block_bytes * self.blocks * self.iters / sum(self.pass_ns)

    @property
    def bw_peak_gbps(self) -> float:
        return self.block_bytes * self.blocks / min(self.pass_ns)

    @property
    def mops(self) -> float:
        return self.blocks * self.iters / sum(self.pass_ns) * 1e3

    def percentile_us(self, q: float) -> float:
        return float(np.percentile(self.pass_ns, q)) / 1e3

    def record(self) -> dict:
        return {"system": self.system, "block_bytes": self.block_bytes, "blocks": self.blocks,
                "iters": self.iters, "bw_avg_gbps": self.bw_avg_gbps, "bw_peak_gbps": self.bw_peak_gbps,
                "mops": self.mops, "p50_us": self.percentile_us(50), "p99_us": self.percentile_us(99)}


def verify(system: str, layout: Layout, dst: np.ndarray, expected: np.ndarray) -> None:
    """Raises VerifyError naming the first block of ``dst`` that differs from ``expected``."""
    got, want = layout.view(dst), layout.view(expected)
    if np.array_equal(got, want):
        return
    bad = np.flatnonzero((got != want).any(axis=1))
    i = int(bad[0])
    byte = int(np.flatnonzero(got[i] != want[i])[0])
    hint = " (still zero: nothing wrote it)" if not got[i].any() else ""
    raise VerifyError(f"{system}, {layout.block_bytes}-byte blocks: {len(bad)} of {layout.blocks} blocks differ; "
                      f"first: local block {i} (remote block {int(layout.perm[i])}){hint}, byte {byte}: "
                      f"got {int(got[i, byte]):#04x}, expected {int(want[i, byte]):#04x}")


def first_passes(system: str, runner, layout: Layout, dst: np.ndarray, expected: np.ndarray, warmup: int) -> None:
    """A zeroed-destination verifying pass, then ``warmup`` passes (the timed ones come
    interleaved with the other systems', :func:`timed_passes`).
    A peer checks its own bytes, after we checked it reads our permutation."""
    if isinstance(runner, peers.PeerRunner):
        runner.prepare_verified(layout.perm, layout.block_bytes)
        if warmup:
            runner.passes(warmup)
        return
    runner.prepare(layout, dst)
    dst[:] = 0
    runner.run_pass()
    verify(system, layout, dst, expected)
    for _ in range(warmup):
        runner.run_pass()


def timed_passes(runner, iters: int) -> list[int]:
    """The time of each of ``iters`` passes, in ns, from the call that starts it to the
    last byte in place (a peer times its own, in its process)."""
    if isinstance(runner, peers.PeerRunner):
        return runner.passes(iters)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter_ns()
        runner.run_pass()
        times.append(time.perf_counter_ns() - t0)
    return times


# --------------------------------------------------------------------------- report

def human(nbytes: int) -> str:
    """16384 -> '16K' (exact powers of 1024 only, else the plain number)."""
    for unit, mult in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes % mult == 0:
            return f"{nbytes // mult}{unit}"
    return str(nbytes)


def gbps(x: float) -> str:
    """Two decimals, as perftest prints; four for the slow links of emulated NICs."""
    return f"{x:.2f}" if x >= 1 else f"{x:.4f}"


def row_cells(r: Result) -> list[str]:
    return [str(r.block_bytes), str(r.blocks), gbps(r.bw_avg_gbps), gbps(r.bw_peak_gbps), f"{r.mops:.6f}",
            f"{r.percentile_us(50):.1f}", f"{r.percentile_us(99):.1f}"]


def table_lines(rows: list[list[str]]) -> list[str]:
    """perftest layout: left-aligned, two spaces after each column title; a column
    widens only when a value would not fit in it."""
    widths = [max([len(c) + 2] + [len(row[j]) + 1 for row in rows]) for j, c in enumerate(COLUMNS)]

    def line(cells: list[str] | tuple[str, ...]) -> str:
        return " " + "".join(f"{c:<{w}}" for c, w in zip(cells, widths)).rstrip()

    return [line(COLUMNS)] + [line(row) for row in rows]


def report(header: list[tuple[str, str]], systems: list[str], sizes: list[int], results: dict,
           engine_opts: dict, ratios: tuple = RATIOS, titles: dict | None = None,
           missing: dict | None = None) -> str:
    rule = "-" * 90
    out = [rule, *kv_lines(header)]
    titles = {**SYSTEM_TITLES, **(titles or {})}
    for system in systems:
        out += [rule, f" {system}: {titles[system].format(**engine_opts)}", rule]
        if missing and system in missing:
            out.append(f" NOT RUN: {missing[system]}")
        out += table_lines([row_cells(results[system, size]) if (system, size) in results
                            else [str(size), "FAILED", "-", "-", "-", "-", "-"] for size in sizes])
    pairs = [(a, b) for a, b in ratios if a in systems and b in systems]
    if pairs:
        for title, key in (("Ratios of BW avg:", lambda r: r.bw_avg_gbps),
                           ("Ratios at the median pass (p50 times; robust to a few disturbed passes):",
                            lambda r: 1.0 / r.percentile_us(50))):
            out += [rule, " " + title]
            for size in sizes:
                cells = [f"{a}/{b} {key(results[a, size]) / key(results[b, size]):5.2f}x"
                         if (a, size) in results and (b, size) in results else f"{a}/{b}     -"
                         for a, b in pairs]
                out.append(f" {human(size) + ' blocks':<17}: " + "   ".join(cells))
    out.append(rule)
    return "\n".join(out)


# --------------------------------------------------------------------------- main

def parse_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def engine_default(name: str) -> int:
    return inspect.signature(Engine).parameters[name].default


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:6]))
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="memory to move: host (cpu) or GPU (cuda, see above) (default %(default)s)")
    ap.add_argument("--sizes", default=None, help="block sizes, comma-separated (default 16K,256K,4M; "
                                                  "cuda: 32K,256K,512M)")
    ap.add_argument("--total", type=parse_size, default=None, help="bytes per pass (default 256M; cuda: 512M)")
    ap.add_argument("--iters", type=int, default=10, help="timed passes per size (default %(default)s)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed passes per size (default %(default)s)")
    ap.add_argument("--transports", default=None,
                    help="systems to run: engine transports verbs,map,shm,tcp and baselines memcpy,zmq "
                         f"(default {','.join(DEFAULT_SYSTEMS)}); cuda: {','.join(CUDA_SYSTEMS)} (all by default)")
    ap.add_argument("--peers", default="",
                    help="other libraries in the same run: nixl (nixl-sm, nixl-tcp), mooncake (mooncake-tcp); "
                         "from .venv-peers (make bench-peers)")
    ap.add_argument("--peers-python", default=str(peers.PEERS_PYTHON), help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=1,
                    help="repetitions of --iters timed passes, systems interleaved (default %(default)s)")
    ap.add_argument("--serve", action="store_true",
                    help="two hosts: run only the target (seeded bytes, registered) and print how to reach it")
    ap.add_argument("--listen-host", default="127.0.0.1", help="--serve: address to listen on (default %(default)s)")
    ap.add_argument("--port", type=int, default=remote.DEFAULT_PORT,
                    help="--serve: hello port; the engine listens on the next one (default %(default)s)")
    ap.add_argument("--serve-seconds", type=float, default=None, help=argparse.SUPPRESS)  # tests: stop by itself
    ap.add_argument("--connect", metavar="HOST:PORT", help="two hosts: read from a --serve target (tcp or verbs)")
    ap.add_argument("--model-shape", choices=tuple(kv_shapes.MODEL_SHAPES),
                    help="KV-shaped workload: one request's paged KV of this model, layer by layer")
    ap.add_argument("--prompt-tokens", type=int, default=2048, help="--model-shape: tokens of the request "
                                                                    "(default %(default)s)")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # cuda-target | cuda-zmq: the other process
    ap.add_argument("--bytes", type=parse_size, help=argparse.SUPPRESS)
    ap.add_argument("--json", metavar="FILE", help="write the results as a JSON list of records")
    ap.add_argument("--plot", metavar="FILE.png", help="draw the results (bench/plot.py: GB/s against block size, "
                                                      "or a --model-shape run's times)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the bytes and the permutations")
    ap.add_argument("--tcp-connections", type=int, default=engine_default("tcp_connections"),
                    help="Engine(tcp_connections=) (default %(default)s)")
    ap.add_argument("--shm-threads", type=int, default=engine_default("shm_threads"),
                    help="Engine(shm_threads=) (default %(default)s)")
    ap.add_argument("--verbs-qps", type=int, default=engine_default("verbs_qps"),
                    help="Engine(verbs_qps=) (default %(default)s)")
    args = ap.parse_args(argv)
    if args.child:
        return args
    for opt, path, suffix in (("--json", args.json, None), ("--plot", args.plot, ".png")):
        problem = path and out_path_problem(path, suffix)
        if problem:  # refused before any work: a long run must not end unable to write
            ap.error(f"{opt}: {problem}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            ap.error("--plot needs matplotlib (pip install -e '.[bench]'; make setup installs it)")
    cuda = args.device == "cuda"
    if args.sizes is None:
        args.sizes = "32K,256K,512M" if cuda else "16K,256K,4M"
    if args.total is None:
        args.total = (512 if cuda else 256) << 20
    if args.transports is None:
        args.transports = ",".join(CUDA_SYSTEMS if cuda else ("tcp",) if args.connect else DEFAULT_SYSTEMS)
    try:
        args.sizes = [parse_size(s) for s in parse_list(args.sizes)]
    except ValueError:
        ap.error(f"--sizes: cannot parse {args.sizes!r}; expected sizes like 16K,256K,4M")
    try:
        peer_systems = peers.expand(parse_list(args.peers))
    except ValueError as e:
        ap.error(f"--peers: {e}")
    args.systems = list(dict.fromkeys(parse_list(args.transports) + peer_systems))  # in order, without repeats
    known = (CUDA_SYSTEMS + KERNEL_VARIANTS if cuda else SYSTEMS) + tuple(peer_systems)
    unknown = [s for s in args.systems if s not in known]
    if unknown or not args.systems:
        ap.error(f"--transports: unknown {', '.join(unknown) or 'empty list'}; choose from {','.join(known)}")
    if args.connect:
        across = [s for s in args.systems if s not in remote.CROSS_HOST]
        if across or cuda:
            ap.error(f"--connect reads from another host: {', '.join(across) or '--device cuda'} cannot "
                     "(shm reads another process's memory on the same host; memcpy and zmq run here); "
                     f"choose from {','.join(remote.CROSS_HOST)}")
        try:
            remote.split_hostport(args.connect)
        except ValueError as e:
            ap.error(str(e))
    if not args.sizes or any(s <= 0 or s > args.total for s in args.sizes):
        ap.error(f"--sizes must be between 1 and --total ({args.total}) bytes")
    if cuda and (peer_systems or args.reps > 1 or args.model_shape):
        ap.error("--peers, --reps and --model-shape move host memory; on a GPU, scripts/gpu_nixl.sh runs NIXL "
                 "beside our CUDA path")
    if args.model_shape and not 1 <= args.prompt_tokens <= 1 << 20:
        ap.error("--prompt-tokens must be between 1 and 1048576")
    if args.iters < 1 or args.warmup < 0 or args.reps < 1:
        ap.error("--iters and --reps must be >= 1 and --warmup >= 0")
    if args.tcp_connections < 1 or not 1 <= args.shm_threads <= 64:
        # the engine would quietly use its defaults (or 64 threads) instead of the header's numbers
        ap.error("--tcp-connections must be >= 1 and --shm-threads between 1 and 64")
    return args


def connect_engine(args: argparse.Namespace, dst: np.ndarray, stack: contextlib.ExitStack,
                   runners: dict, header: list[tuple[str, str]]) -> None:
    """Starts the target, registers ``dst`` and connects one peer per engine transport."""
    shared = ["--shared"] if "map" in args.systems else []  # map reads shared memory; shm reads either
    if args.connect:
        info = args.hello
        where = f"{args.connect} (transfer_bw.py --serve)"
    else:
        _, info = start_child([sys.executable, "-m", "kvtransfer.testing.target", "--bytes", str(args.total),
                               "--seed", str(args.seed), *shared], "kvtransfer.testing.target", stack)
        where = f"pid {info['pid']} (python -m kvtransfer.testing.target)"
    region = RegionDescriptor.from_bytes(bytes.fromhex(info["region"]))
    if region.nbytes < args.total:
        raise BenchError(f"target region is {region.nbytes} bytes, expected {args.total}")
    eng = stack.enter_context(Engine(tcp_connections=args.tcp_connections, shm_threads=args.shm_threads,
                                     verbs_qps=args.verbs_qps))
    local, _ = eng.register(dst)
    connected = []
    for name in (s for s in args.systems if s in ENGINE_TRANSPORTS):
        peer = eng.connect(bytes.fromhex(info["engine"]), transport=name)
        runners[name] = EngineRunner(peer, local, region)
        connected.append(f"{name} -> {peer.transport}")
    header += [("Target", f"{where}, region {region.nbytes} bytes"),
               ("Peer transports", ", ".join(connected)),
               ("Engine", f"kvtransfer {kvtransfer.__version__}, tcp_connections={args.tcp_connections}, "
                          f"shm_threads={args.shm_threads}, verbs_qps={args.verbs_qps}")]


def run(args: argparse.Namespace) -> int:
    total, sizes, systems = args.total, args.sizes, args.systems
    header = [("Benchmark", "READ"),
              ("Transports", ",".join(s for s in systems if s in ENGINE_TRANSPORTS) or "none"),
              ("Baselines", ",".join(s for s in systems if s in BASELINES) or "none"),
              ("Block sizes", ",".join(map(str, sizes)) + f" ({','.join(map(human, sizes))})"),
              ("Bytes per pass", f"{total} ({human(total)}), blocks in a random permutation, one batch"),
              ("Iterations", f"{args.iters} timed per size, after 1 verifying + {args.warmup} warmup"),
              ("Host", f"{socket.gethostname()}, Linux {platform.release()}"),
              ("CPUs", f"{len(os.sched_getaffinity(0))} usable of {os.cpu_count()} ({cpu_model()})")]
    with contextlib.ExitStack() as stack:
        reference = seeded_bytes(total, args.seed, alloc_host(total))  # what the target serves
        dst = alloc_host(total)
        expected = alloc_host(total)
        runners: dict[str, Runner] = {}
        if any(s in ENGINE_TRANSPORTS for s in systems):
            connect_engine(args, dst, stack, runners, header)
        if "memcpy" in systems:
            runners["memcpy"] = MemcpyRunner(reference)
        if "zmq" in systems:
            sender = str(Path(__file__).with_name("zmq_sender.py"))
            _, info = start_child([sys.executable, sender, "--bytes", str(total), "--seed", str(args.seed)],
                                  "zmq_sender", stack)
            zr = ZmqRunner(info)
            stack.callback(zr.close)
            runners["zmq"] = zr
            header.append(("ZeroMQ", f"libzmq {zmq.zmq_version()}, pyzmq {zmq.__version__}, sender pid "
                                     f"{info['pid']}, data {info['data']}"))

        missing: dict[str, str] = {}
        start_peers(args, stack, runners, missing, header)
        reps: dict[tuple[str, int], list[Result]] = {}
        for size in sizes:
            layout = make_layout(size, total, args.seed)
            gather(reference, layout, expected)
            live = []
            for system in (s for s in systems if s not in missing):
                try:
                    first_passes(system, runners[system], layout, dst, expected, args.warmup)
                    live.append(system)
                except peers.PeerError as e:  # a peer's failure is its row; ours end the run
                    missing[system] = str(e)
            for _ in range(args.reps):  # interleaved: A B C A B C, so drift hits every system alike
                for system in live:
                    try:
                        ns = timed_passes(runners[system], args.iters)
                    except peers.PeerError as e:
                        missing[system] = str(e)
                        continue
                    reps.setdefault((system, size), []).append(Result(system, size, layout.blocks, ns))
            for system in live:
                if (system, size) in reps:
                    r = merged(reps[system, size])
                    print(f"[transfer_bw] {system:<12} {human(size):>5} blocks: verified, "
                          f"{r.bw_avg_gbps:6.2f} GB/s avg", file=sys.stderr, flush=True)

    results = {key: merged(rs) for key, rs in reps.items()}
    header.append(("Verified", f"yes (first pass of each of {len(results)} system/size pairs, destination "
                               "zeroed before it; peers check their own and read our permutation)"))
    text = report(header, systems, sizes, results,
                  {"shm_threads": args.shm_threads, "tcp_connections": args.tcp_connections,
                   "verbs_qps": args.verbs_qps}, missing=missing)
    print(text + "\n" + "\n".join(reps_lines(systems, sizes, reps)), flush=True)
    recs = records(systems, sizes, reps, missing)
    if args.json:
        write_json(args.json, recs)
    if args.plot:
        plot.draw(args.plot, recs, None, f"READ, {human(total)} per pass, {socket.gethostname()}")
    return 0


# --------------------------------------------------------------------------- peers and repetitions

def start_peers(args: argparse.Namespace, stack: contextlib.ExitStack, runners: dict, missing: dict,
                header: list[tuple[str, str]]) -> None:
    """A PeerRunner per peer system; one that cannot start goes to ``missing`` with why."""
    for system in (s for s in args.systems if s in peers.PEER_SYSTEMS):
        try:
            pr = peers.PeerRunner(system, args.total, args.seed, Path(args.peers_python))
        except (peers.PeerUnavailable, peers.PeerError) as e:
            missing[system] = str(e)
            header.append((system, f"NOT RUN: {e}"))
            continue
        stack.callback(pr.close)
        runners[system] = pr
        header.append((system, ", ".join(f"{k}={v}" for k, v in pr.config.items())))


def merged(rs: list[Result]) -> Result:
    """All repetitions' passes as one Result (the table's columns)."""
    return Result(rs[0].system, rs[0].block_bytes, rs[0].blocks, [ns for r in rs for ns in r.pass_ns])


def ratio_pairs(systems: list[str]) -> list[tuple[str, str]]:
    return [(a, b) for a, b in RATIOS + peers.PEER_RATIOS if a in systems and b in systems]


def spread(xs: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return float(np.median(xs)), min(xs), max(xs)


def pair_ratios(reps: dict, a: str, b: str, size: int) -> list[float]:
    """BW avg of ``a`` over ``b``, repetition by repetition (same position in the interleave)."""
    return [ra.bw_avg_gbps / rb.bw_avg_gbps for ra, rb in zip(reps.get((a, size), []), reps.get((b, size), []))]


def reps_lines(systems: list[str], sizes: list[int], reps: dict) -> list[str]:
    """Per system and size: median [min-max] of the repetitions' BW avg; then the ratios."""
    n = max((len(v) for v in reps.values()), default=0)
    out = [f" Repetitions: {n}, systems interleaved; GB/s median [min-max] of each repetition's BW avg"]
    out.append(" " + f"{'system':<18}" + "".join(f"{human(s):>24}" for s in sizes))
    for system in systems:
        cells = []
        for size in sizes:
            rs = reps.get((system, size))
            cells.append("-" if not rs else "{:.2f} [{:.2f}-{:.2f}]".format(*spread([r.bw_avg_gbps for r in rs])))
        out.append(" " + f"{system:<18}" + "".join(f"{c:>24}" for c in cells))
    pairs = ratio_pairs(systems)
    if pairs:
        out.append(" Ratios, pair by pair within each repetition: median [min-max]")
        for a, b in pairs:
            cells = []
            for size in sizes:
                rs = pair_ratios(reps, a, b, size)
                cells.append("-" if not rs else "{:.2f}x [{:.2f}-{:.2f}]".format(*spread(rs)))
            out.append(" " + f"{a + '/' + b:<18}" + "".join(f"{c:>24}" for c in cells))
    out.append("-" * 90)
    return out


def records(systems: list[str], sizes: list[int], reps: dict, missing: dict) -> list[dict]:
    """The --json records: Result.record() over all passes, with the repetitions' spread and,
    for a compared system, its ratios; a system that did not run says why."""
    out = []
    for system in systems:
        for size in sizes:
            rs = reps.get((system, size))
            if not rs:
                out.append({"system": system, "block_bytes": size, "unavailable": missing.get(system, "not run")})
                continue
            rec = merged(rs).record()
            med, lo, hi = spread([r.bw_avg_gbps for r in rs])
            rec.update(reps=len(rs), bw_median_gbps=med, bw_min_gbps=lo, bw_max_gbps=hi,
                       rep_bw_gbps=[r.bw_avg_gbps for r in rs])
            for a, b in ratio_pairs(systems):
                if b == system and pair_ratios(reps, a, b, size):
                    rec.setdefault("ratios", {})[f"{a}/{b}"] = dict(zip(("median", "min", "max"),
                                                                        spread(pair_ratios(reps, a, b, size))))
            out.append(rec)
    return out


# --------------------------------------------------------------------------- KV-shaped

def kv_request(runner, plans: list[np.ndarray]) -> list[int]:
    """One request's KV, every layer's batch posted in order: ns from the start to each
    layer's last byte (decode streams layers, so the first one's time matters)."""
    t0 = time.perf_counter_ns()
    ts = [runner.peer.read_blocks(runner.local, p["dst_off"].astype(np.int64), runner.remote,
                                  p["src_off"].astype(np.int64), p["len"].astype(np.int64)) for p in plans]
    out = []
    for t in ts:
        t.wait(PASS_TIMEOUT_S)
        out.append(time.perf_counter_ns() - t0)
    return out


def kv_summary(w: "kv_shapes.KVWorkload", reqs: list[list[int]]) -> dict:
    """Medians over requests: total and first-layer time, each layer's own time; GB/s of the total."""
    a = np.asarray(reqs, np.float64) / 1e3  # us, (requests, layers)
    total = a[:, -1]
    own = np.diff(a, axis=1, prepend=0.0)
    return {"total_us": float(np.median(total)), "total_min_us": float(total.min()),
            "total_max_us": float(total.max()), "first_layer_us": float(np.median(a[:, 0])),
            "per_layer_us": np.median(own, axis=0).tolist(), "bw_gbps": w.kv_bytes / float(np.median(total)) / 1e3,
            "requests": len(reqs)}


def run_kv(args: argparse.Namespace) -> int:
    """--model-shape: per system, one request's KV moved layer by layer, verified first."""
    w = kv_shapes.build(args.model_shape, args.prompt_tokens, args.seed)
    args.total = w.nbytes
    systems = [s for s in args.systems if s in ENGINE_TRANSPORTS or s in peers.PEER_SYSTEMS]
    header = [("Benchmark", f"READ of one request's KV: {w.shape}, {w.tokens} tokens"),
              ("KV layout", f"{w.layout.kind}, {w.layout.num_layers} layers, block size {w.layout.block_size}, "
                            f"{w.layout.num_kv_heads} KV heads x {w.layout.head_dim}, bf16, pool of "
                            f"{w.layout.num_blocks} blocks, fragmented block tables (runs of 1-8 ids)"),
              ("Request", f"{w.kv_bytes} bytes ({w.kv_bytes / 2**20:.1f} MiB) in {w.entries} ranges, "
                          "one batch per layer, all posted, waited in layer order"),
              ("Iterations", f"{args.iters} requests per repetition, {args.reps} repetitions interleaved, "
                             f"after 1 verifying + {args.warmup} warmup"),
              ("Host", f"{socket.gethostname()}, Linux {platform.release()}"),
              ("CPUs", f"{len(os.sched_getaffinity(0))} usable of {os.cpu_count()} ({cpu_model()})")]
    reqs: dict[str, list[list[int]]] = {}
    missing: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        reference = seeded_bytes(w.nbytes, args.seed, alloc_host(w.nbytes))
        dst = alloc_host(w.nbytes)
        expected = w.expected(reference, alloc_host(w.nbytes))
        runners: dict = {}
        if any(s in ENGINE_TRANSPORTS for s in systems):
            connect_engine(args, dst, stack, runners, header)
        start_peers(args, stack, runners, missing, header)
        ranges = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "ranges.json"
        ranges.write_text(json.dumps({"layers": w.ranges()}))
        live = []
        for system in (s for s in systems if s not in missing):
            r = runners[system]
            try:
                if isinstance(r, peers.PeerRunner):
                    r.prepare_ranges(ranges)
                    if args.warmup:
                        r.layer_times(args.warmup)
                else:
                    dst[:] = 0
                    kv_request(r, w.plans)
                    if not np.array_equal(dst, expected):
                        bad = int(np.flatnonzero(dst != expected)[0])
                        raise VerifyError(f"{system}: KV request read wrong bytes from byte {bad} on")
                    for _ in range(args.warmup):
                        kv_request(r, w.plans)
                live.append(system)
            except peers.PeerError as e:
                missing[system] = str(e)
        for _ in range(args.reps):
            for system in live:
                r = runners[system]
                try:
                    got = (r.layer_times(args.iters) if isinstance(r, peers.PeerRunner)
                           else [kv_request(r, w.plans) for _ in range(args.iters)])
                except peers.PeerError as e:
                    missing[system] = str(e)
                    continue
                reqs.setdefault(system, []).extend(got)
    header.append(("Verified", "yes (first request of each system, destination zeroed before it)"))
    rule = "-" * 90
    out = [rule, *kv_lines(header), rule,
           f" {'system':<14}{'total ms median [min-max]':>30}{'first layer ms':>16}{'layer ms':>10}{'GB/s':>8}"]
    recs = []
    for system in systems:
        if system not in reqs:
            out.append(f" {system:<14} NOT RUN: {missing.get(system, 'not run')}")
            recs.append({"system": system, "model_shape": w.shape, "unavailable": missing.get(system, "not run")})
            continue
        k = kv_summary(w, reqs[system])
        out.append(f" {system:<14}{k['total_us'] / 1e3:>12.2f} [{k['total_min_us'] / 1e3:.2f}-"
                   f"{k['total_max_us'] / 1e3:.2f}]".ljust(45) + f"{k['first_layer_us'] / 1e3:>15.3f}"
                   f"{np.median(k['per_layer_us']) / 1e3:>10.3f}{k['bw_gbps']:>8.2f}")
        recs.append({"system": system, "model_shape": w.shape, "prompt_tokens": w.tokens, "kv_bytes": w.kv_bytes,
                     "layers": len(w.plans), "entries": w.entries, **k})
    out.append(rule)
    print("\n".join(out), flush=True)
    if args.json:
        write_json(args.json, recs)
    if args.plot:
        plot.draw(args.plot, None, recs, socket.gethostname())
    return 0


def write_json(path: str, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=1) + "\n")


# --------------------------------------------------------------------------- cuda

class TorchRunner:
    """A baseline in this process: ``op()`` then ``torch.cuda.synchronize()``."""

    def __init__(self, torch, op):
        self.torch, self.op = torch, op

    def prepare(self, layout: Layout, dst) -> None:
        self.fn = self.op(layout)

    def run_pass(self) -> None:
        self.fn()
        self.torch.cuda.synchronize()


class CpuMediatedRunner:
    """Baseline: the sender process (``--child cuda-zmq``) gathers on its GPU and pushes
    8 MiB chunks from pinned memory; this process receives each into pinned memory and
    copies it to the device, in order, so block i lands in place i."""

    def __init__(self, torch, info: dict, dst, total: int):
        self.torch = torch
        self.z = ZmqRunner(info)
        self.dst = dst
        self.pinned = torch.empty(total, dtype=torch.uint8, pin_memory=True)
        self.pinned_np = self.pinned.numpy()
        self.chunks: list[tuple[int, int]] = []

    def prepare(self, layout: Layout, dst) -> None:
        self.z.request(b"perm", str(layout.block_bytes).encode(), layout.perm.tobytes())
        n = layout.pass_bytes
        self.chunks = [(a, min(a + CUDA_CHUNK, n)) for a in range(0, n, CUDA_CHUNK)]

    def run_pass(self) -> None:
        self.z.request(b"go")
        for a, b in self.chunks:
            try:
                got = self.z.pull.recv_into(memoryview(self.pinned_np[a:b]))
            except zmq.Again:
                raise BenchError(f"cpu baseline: chunk at {a} did not come in {RECV_TIMEOUT_S} s") from None
            if got != b - a:
                raise BenchError(f"cpu baseline: chunk at {a} is {got} bytes, expected {b - a}")
            self.dst[a:b].copy_(self.pinned[a:b], non_blocking=True)
        self.torch.cuda.synchronize()

    def close(self) -> None:
        self.z.close()


def child_cuda_target(nbytes: int, seed: int) -> int:
    """The other process of shm and tcp: seeded bytes in a CUDA tensor, registered."""
    import torch

    src = torch.from_numpy(seeded_bytes(nbytes, seed)).to("cuda:0")
    torch.cuda.synchronize()
    with Engine() as eng:
        region, desc = eng.register(src)
        print(json.dumps({"engine": eng.descriptor.to_bytes().hex(), "region": desc.to_bytes().hex(),
                          "pid": os.getpid()}), flush=True)
        for _ in sys.stdin:
            pass
        region.close()
    return 0


def child_cuda_zmq(nbytes: int, seed: int) -> int:
    """The sender of the cpu baseline (see CpuMediatedRunner)."""
    import torch

    src = torch.from_numpy(seeded_bytes(nbytes, seed)).to("cuda:0")
    staging = torch.empty_like(src)
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pinned_np = pinned.numpy()
    ctx = zmq.Context()
    ctrl, push = ctx.socket(zmq.REP), ctx.socket(zmq.PUSH)
    for sock in (ctrl, push):
        sock.setsockopt(zmq.LINGER, 0)
    push.setsockopt(zmq.SNDTIMEO, 30000)
    ctrl.bind("tcp://127.0.0.1:*")
    push.bind("tcp://127.0.0.1:*")
    print(json.dumps({"ctrl": ctrl.getsockopt_string(zmq.LAST_ENDPOINT),
                      "data": push.getsockopt_string(zmq.LAST_ENDPOINT), "pid": os.getpid()}), flush=True)
    import threading

    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()  # end of stdin: exit
    parent = os.getppid()
    perm_t, bs = None, 0
    while os.getppid() == parent:
        if not ctrl.poll(1000):
            continue
        msg = ctrl.recv_multipart()
        if msg[0] == b"perm":
            bs = int(msg[1])
            perm_t = torch.from_numpy(np.frombuffer(msg[2], np.int64).copy()).to("cuda:0")
            ctrl.send(b"ok")
        elif msg[0] == b"go" and perm_t is not None:
            ctrl.send(b"ok")
            n = len(perm_t) * bs
            torch.index_select(src[:n].view(-1, bs), 0, perm_t, out=staging[:n].view(-1, bs))
            events = []
            for a in range(0, n, CUDA_CHUNK):
                b = min(a + CUDA_CHUNK, n)
                pinned[a:b].copy_(staging[a:b], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record()
                events.append((a, b, ev))
            for a, b, ev in events:
                ev.synchronize()
                push.send(memoryview(pinned_np[a:b]), copy=False)
        else:
            ctrl.send(b"error: unknown request")
    return 0


def measure_cuda(system: str, runner, layout: Layout, dst, expected, warmup: int, iters: int, torch) -> Result:
    """first_passes() and timed_passes(), for a destination that is a CUDA tensor (or, for tcp-host, a numpy
    array with its own expected bytes)."""
    runner.prepare(layout, dst)
    n = layout.pass_bytes
    if isinstance(dst, np.ndarray):
        dst[:n] = 0
    else:
        dst[:n].zero_()
        torch.cuda.synchronize()  # the engine's streams are not ordered with torch's
    runner.run_pass()
    if isinstance(dst, np.ndarray):
        verify(system, layout, dst, expected)
    elif not torch.equal(dst[:n], expected[:n]):
        got, want = dst[:n].view(layout.blocks, -1), expected[:n].view(layout.blocks, -1)
        bad = torch.nonzero((got != want).any(dim=1)).flatten().tolist()
        raise VerifyError(f"{system}, {layout.block_bytes}-byte blocks: {len(bad)} of {layout.blocks} blocks differ; "
                          f"first: local block {bad[0]}" + (" (still zero)" if not got[bad[0]].any() else ""))
    # at least `warmup` passes and GPU_WARMUP_S of them: a GPU left idle (the slow
    # systems run for seconds) clocks down, and the first timed passes would pay for it
    t_end = time.perf_counter() + GPU_WARMUP_S
    done = 0
    while done < warmup or time.perf_counter() < t_end:
        runner.run_pass()
        done += 1
    return Result(system, layout.block_bytes, layout.blocks, timed_passes(runner, iters))


def run_cuda(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        raise BenchError("--device cuda: torch sees no CUDA device")
    from kvtransfer import _C

    total, sizes, systems = args.total, args.sizes, args.systems
    dev = torch.device("cuda:0")
    props = torch.cuda.get_device_properties(0)
    copy_ok, copy_info = _C.cuda_copy_info()
    header = [("Benchmark", "READ, CUDA memory"),
              ("Systems", ",".join(systems)),
              ("Block sizes", ",".join(map(str, sizes)) + f" ({','.join(map(human, sizes))})"),
              ("Bytes per pass", f"{total} ({human(total)}), blocks in a random permutation, one batch"),
              ("Iterations", f"{args.iters} timed per size, after 1 verifying + {args.warmup} warmup passes "
                             f"and at least {GPU_WARMUP_S} s of them"),
              ("GPU", f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, "
                      f"torch {torch.__version__}"),
              ("CUDA copies", copy_info if copy_ok else f"UNAVAILABLE: {copy_info}"),
              ("Host", f"{socket.gethostname()}, Linux {platform.release()}"),
              ("CPUs", f"{len(os.sched_getaffinity(0))} usable of {os.cpu_count()} ({cpu_model()})")]
    me = str(Path(__file__).resolve())
    results: dict[tuple[str, int], Result] = {}
    failures: list[tuple[str, int, Exception]] = []
    with contextlib.ExitStack() as stack:
        reference = seeded_bytes(total, args.seed, alloc_host(total))
        ref = torch.from_numpy(reference).to(dev)
        dst = torch.empty(total, dtype=torch.uint8, device=dev)
        expected = torch.empty_like(dst)
        runners: dict = {}
        dsts: dict = {}
        engine_systems = [s for s in systems if s in ("shm", "tcp", "tcp-host")]
        if engine_systems:
            eng = stack.enter_context(Engine(tcp_connections=args.tcp_connections, shm_threads=args.shm_threads))
            local, _ = eng.register(dst)
            connected = []
        if any(s in ("shm", "tcp") for s in systems):
            _, info = start_child([sys.executable, me, "--child", "cuda-target", "--bytes", str(total), "--seed",
                                   str(args.seed)], "cuda target", stack)
            remote = RegionDescriptor.from_bytes(bytes.fromhex(info["region"]))
            for name in (s for s in systems if s in ("shm", "tcp")):
                peer = eng.connect(bytes.fromhex(info["engine"]), transport=name)
                runners[name], dsts[name] = EngineRunner(peer, local, remote), dst
                connected.append(f"{name} -> {peer.transport}")
        if "tcp-host" in systems:
            _, hinfo = start_child([sys.executable, "-m", "kvtransfer.testing.target", "--bytes", str(total), "--seed",
                                    str(args.seed)], "kvtransfer.testing.target", stack)
            host_dst = alloc_host(total)
            host_local, _ = eng.register(host_dst)
            hremote = RegionDescriptor.from_bytes(bytes.fromhex(hinfo["region"]))
            peer = eng.connect(bytes.fromhex(hinfo["engine"]), transport="tcp")
            runners["tcp-host"], dsts["tcp-host"] = EngineRunner(peer, host_local, hremote), host_dst
            connected.append(f"tcp-host -> {peer.transport}")
        if engine_systems:
            header.append(("Peer transports", ", ".join(connected)))
        if "d2d" in systems:
            runners["d2d"] = TorchRunner(torch, lambda lay: lambda: dst[:lay.pass_bytes].copy_(ref[:lay.pass_bytes]))
            dsts["d2d"] = dst

        def gather_op(lay: Layout):
            perm_t = torch.from_numpy(lay.perm).to(dev)
            n = lay.pass_bytes
            return lambda: torch.index_select(ref[:n].view(lay.blocks, -1), 0, perm_t,
                                              out=dst[:n].view(lay.blocks, -1))

        if "gather" in systems:
            runners["gather"], dsts["gather"] = TorchRunner(torch, gather_op), dst

        def kernel_op(lay: Layout, variant: int = -1):
            descs = gather_descs(ref.data_ptr(), dst.data_ptr(), lay.perm, lay.block_bytes, COPY_CHUNK).tobytes()
            return lambda: _C.cuda_gather(0, descs, variant)

        for name, variant in (("kernel", -1),) + tuple((name, k) for k, name in enumerate(KERNEL_VARIANTS)):
            if name in systems:
                runners[name] = TorchRunner(torch, lambda lay, v=variant: kernel_op(lay, v))
                runners[name].run_pass = lambda r=runners[name]: r.fn()  # it waits itself
                dsts[name] = dst
        if "cpu" in systems:
            _, zinfo = start_child([sys.executable, me, "--child", "cuda-zmq", "--bytes", str(total), "--seed",
                                    str(args.seed)], "cuda zmq sender", stack)
            cr = CpuMediatedRunner(torch, zinfo, dst, total)
            stack.callback(cr.close)
            runners["cpu"], dsts["cpu"] = cr, dst
            header.append(("ZeroMQ", f"libzmq {zmq.zmq_version()}, pyzmq {zmq.__version__}, data {zinfo['data']}"))

        host_expected = alloc_host(total) if "tcp-host" in systems else None
        for size in sizes:
            layout = make_layout(size, total, args.seed)
            n = layout.pass_bytes
            perm_t = torch.from_numpy(layout.perm).to(dev)
            torch.index_select(ref[:n].view(layout.blocks, -1), 0, perm_t, out=expected[:n].view(layout.blocks, -1))
            if host_expected is not None:
                gather(reference, layout, host_expected)
            for system in systems:
                want = ref if system == "d2d" else host_expected if system == "tcp-host" else expected
                try:
                    r = measure_cuda(system, runners[system], layout, dsts[system], want, args.warmup, args.iters,
                                     torch)
                except (VerifyError, KVTransferError, BenchError) as e:
                    # one broken system must not hide the others' numbers: reported, exit status 1 or 2
                    failures.append((system, size, e))
                    print(f"[transfer_bw] {system:<8} {human(size):>5} blocks: FAILED: {type(e).__name__}: {e}",
                          file=sys.stderr, flush=True)
                    continue
                results[system, size] = r
                sub = getattr(runners[system], "submit_ns", None)
                extra = f", read_blocks call p50 {np.median(sub) / 1e3:.1f} us" if sub else ""
                print(f"[transfer_bw] {system:<8} {human(size):>5} blocks: verified, {r.bw_avg_gbps:8.2f} GB/s avg, "
                      f"pass p50 {r.percentile_us(50):.1f} us{extra}", file=sys.stderr, flush=True)

    header.append(("Verified", f"yes (first pass of each of {len(results)} system/size pairs, destination "
                               "zeroed before it)" + (f"; {len(failures)} FAILED" if failures else "")))
    print(report(header, systems, sizes, results,
                 {"shm_threads": args.shm_threads, "tcp_connections": args.tcp_connections,
                  "verbs_qps": args.verbs_qps}, CUDA_RATIOS, CUDA_TITLES), flush=True)
    for system, size, e in failures:
        print(f" FAILED {system} {human(size)}: {type(e).__name__}: {e}", flush=True)
    cuda_records = [dict(results[system, size].record(), device="cuda") for system in systems for size in sizes
                    if (system, size) in results]
    if args.json:
        write_json(args.json, cuda_records)
    if args.plot:
        plot.draw(args.plot, cuda_records, None, f"READ, CUDA memory, {props.name}")
    if failures:
        return 1 if all(isinstance(e, VerifyError) for _, _, e in failures) else 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child == "cuda-target":
        return child_cuda_target(args.bytes, args.seed)
    if args.child == "cuda-zmq":
        return child_cuda_zmq(args.bytes, args.seed)
    try:
        if args.serve:
            return remote.serve(args.total, args.seed, args.listen_host, args.port,
                                {"tcp_connections": args.tcp_connections, "shm_threads": args.shm_threads,
                                 "verbs_qps": args.verbs_qps}, args.serve_seconds)
        if args.connect:  # the server's size and seed: the bytes we check are the ones it holds
            args.hello = remote.hello(args.connect)
            if any(s > args.hello["total"] for s in args.sizes):
                raise BenchError(f"--sizes: the server holds {args.hello['total']} bytes")
            args.total, args.seed = args.hello["total"], args.hello["seed"]
        if args.device == "cuda":
            return run_cuda(args)
        if args.model_shape:
            return run_kv(args)
        return run(args)
    except VerifyError as e:
        print(f"transfer_bw: VERIFY FAILED: {e}", file=sys.stderr)
        return 1
    except (BenchError, KVTransferError, zmq.ZMQError, remote.RemoteError) as e:
        print(f"transfer_bw: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
