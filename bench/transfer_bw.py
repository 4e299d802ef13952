"""READ bandwidth of the transfer engine between two processes, in the style of ib_read_bw.

    .venv/bin/python bench/transfer_bw.py                                   # shm, tcp, memcpy, zmq
    .venv/bin/python bench/transfer_bw.py --sizes 16K,256K,4M --total 256M --iters 10 --json bw.json
    .venv/bin/python bench/transfer_bw.py --transports tcp,zmq --tcp-connections 8
    make bench BENCH_ARGS="--total 64M"

A target process (``python -m kvtransfer.target``) registers ``--total`` seeded random
bytes; this process registers a destination of the same size (``alloc_host``: huge
pages, pre-faulted) and reads the target's bytes with one-sided READs. The buffer is
cut into blocks of each ``--sizes`` size, and blocks are read the way KV pages are: in a
random permutation, remote block ``perm[i]`` into local block ``i``. One pass reads every
block, all in ONE ``peer.read_blocks(...)`` batch, then ``transfer.wait()``.

For every (system, size): one verifying pass (destination zeroed first, then every byte
checked against the seeded bytes gathered by the permutation; a mismatch names the
block and exits 1), ``--warmup`` untimed passes, then ``--iters`` timed passes.

Systems (``--transports``, default all four, run over the same bytes and permutation):

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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import zmq

import kvtransfer
from kvtransfer import Engine, KVTransferError, Peer, Region, RegionDescriptor, alloc_host
from kvtransfer import target
from kvtransfer.target import parse_size, seeded_bytes

ENGINE_TRANSPORTS = ("verbs", "shm", "tcp")
BASELINES = ("memcpy", "zmq")
SYSTEMS = ENGINE_TRANSPORTS + BASELINES
DEFAULT_SYSTEMS = ("shm", "tcp") + BASELINES  # verbs needs an RDMA device: ask for it
COLUMNS = ("#bytes", "#blocks", "BW avg[GB/s]", "BW peak[GB/s]", "MsgRate[Mops]", "p50[us]", "p99[us]")
RATIOS = (("shm", "memcpy"), ("tcp", "zmq"))

STARTUP_TIMEOUT_S = 60.0  # for a child to print its descriptors (it fills --total bytes first)
PASS_TIMEOUT_S = 60.0     # for one pass (transfer.wait)
RECV_TIMEOUT_S = 10.0     # for any one zmq message
STOP_TIMEOUT_S = 10.0     # for a child to exit once its stdin is closed

SYSTEM_TITLES = {
    "verbs": "kvtransfer READ over verbs (RDMA READ, {verbs_qps} queue pairs)",
    "shm": "kvtransfer READ over shm (process_vm_readv, {shm_threads} copy threads)",
    "tcp": "kvtransfer READ over tcp (loopback, {tcp_connections} connections)",
    "memcpy": "baseline: single-thread gather copy in one process (np.take), the ceiling for shm",
    "zmq": "baseline: CPU-mediated ZeroMQ PUSH/PULL on loopback, one message per block, copied in place",
}


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

    def prepare(self, layout: Layout, dst: np.ndarray) -> None:
        self.block_bytes = layout.block_bytes
        self.local_offs = np.arange(layout.blocks, dtype=np.int64) * layout.block_bytes
        self.remote_offs = layout.perm * layout.block_bytes

    def run_pass(self) -> None:
        t = self.peer.read_blocks(self.local, self.local_offs, self.remote, self.remote_offs, self.block_bytes)
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
        proc, hello = target.start_child(cmd, STARTUP_TIMEOUT_S, what)
    except target.ChildError as e:
        raise BenchError(str(e)) from None
    stack.callback(target.stop_child, proc, STOP_TIMEOUT_S)
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


def measure(system: str, runner: Runner, layout: Layout, dst: np.ndarray, expected: np.ndarray,
            warmup: int, iters: int) -> Result:
    """A zeroed-destination verifying pass, ``warmup`` passes, then ``iters`` timed ones."""
    runner.prepare(layout, dst)
    dst[:] = 0
    runner.run_pass()
    verify(system, layout, dst, expected)
    for _ in range(warmup):
        runner.run_pass()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter_ns()
        runner.run_pass()
        times.append(time.perf_counter_ns() - t0)
    return Result(system, layout.block_bytes, layout.blocks, times)


# --------------------------------------------------------------------------- report

def human(nbytes: int) -> str:
    """16384 -> '16K' (exact powers of 1024 only, else the plain number)."""
    for unit, mult in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes % mult == 0:
            return f"{nbytes // mult}{unit}"
    return str(nbytes)


def kv_lines(pairs: list[tuple[str, str]]) -> list[str]:
    return [f" {k:<17}: {v}" for k, v in pairs]


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


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
           engine_opts: dict) -> str:
    rule = "-" * 90
    out = [rule, *kv_lines(header)]
    for system in systems:
        out += [rule, f" {system}: {SYSTEM_TITLES[system].format(**engine_opts)}", rule]
        out += table_lines([row_cells(results[system, size]) for size in sizes])
    pairs = [(a, b) for a, b in RATIOS if a in systems and b in systems]
    if pairs:
        out += [rule, " Ratios of BW avg:"]
        for size in sizes:
            ratios = [f"{a}/{b} {results[a, size].bw_avg_gbps / results[b, size].bw_avg_gbps:5.2f}x"
                      for a, b in pairs]
            out.append(f" {human(size) + ' blocks':<17}: " + "   ".join(ratios))
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
    ap.add_argument("--sizes", default="16K,256K,4M", help="block sizes, comma-separated (default %(default)s)")
    ap.add_argument("--total", type=parse_size, default=256 << 20, help="bytes per pass (default 256M)")
    ap.add_argument("--iters", type=int, default=10, help="timed passes per size (default %(default)s)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed passes per size (default %(default)s)")
    ap.add_argument("--transports", default=",".join(DEFAULT_SYSTEMS),
                    help="systems to run: engine transports verbs,shm,tcp and baselines memcpy,zmq "
                         "(default %(default)s)")
    ap.add_argument("--json", metavar="FILE", help="write the results as a JSON list of records")
    ap.add_argument("--seed", type=int, default=0, help="seed of the bytes and the permutations")
    ap.add_argument("--tcp-connections", type=int, default=engine_default("tcp_connections"),
                    help="Engine(tcp_connections=) (default %(default)s)")
    ap.add_argument("--shm-threads", type=int, default=engine_default("shm_threads"),
                    help="Engine(shm_threads=) (default %(default)s)")
    ap.add_argument("--verbs-qps", type=int, default=engine_default("verbs_qps"),
                    help="Engine(verbs_qps=) (default %(default)s)")
    args = ap.parse_args(argv)
    try:
        args.sizes = [parse_size(s) for s in parse_list(args.sizes)]
    except ValueError:
        ap.error(f"--sizes: cannot parse {args.sizes!r}; expected sizes like 16K,256K,4M")
    args.systems = list(dict.fromkeys(parse_list(args.transports)))  # in order, without repeats
    unknown = [s for s in args.systems if s not in SYSTEMS]
    if unknown or not args.systems:
        ap.error(f"--transports: unknown {', '.join(unknown) or 'empty list'}; choose from {','.join(SYSTEMS)}")
    if not args.sizes or any(s <= 0 or s > args.total for s in args.sizes):
        ap.error(f"--sizes must be between 1 and --total ({args.total}) bytes")
    if args.iters < 1 or args.warmup < 0:
        ap.error("--iters must be >= 1 and --warmup >= 0")
    if args.tcp_connections < 1 or not 1 <= args.shm_threads <= 64:
        # the engine would quietly use its defaults (or 64 threads) instead of the header's numbers
        ap.error("--tcp-connections must be >= 1 and --shm-threads between 1 and 64")
    return args


def connect_engine(args: argparse.Namespace, dst: np.ndarray, stack: contextlib.ExitStack,
                   runners: dict, header: list[tuple[str, str]]) -> None:
    """Starts the target, registers ``dst`` and connects one peer per engine transport."""
    _, info = start_child([sys.executable, "-m", "kvtransfer.target", "--bytes", str(args.total),
                           "--seed", str(args.seed)], "kvtransfer.target", stack)
    remote = RegionDescriptor.from_bytes(bytes.fromhex(info["region"]))
    if remote.nbytes < args.total:
        raise BenchError(f"target region is {remote.nbytes} bytes, expected {args.total}")
    eng = stack.enter_context(Engine(tcp_connections=args.tcp_connections, shm_threads=args.shm_threads,
                                     verbs_qps=args.verbs_qps))
    local, _ = eng.register(dst)
    peers = []
    for name in (s for s in args.systems if s in ENGINE_TRANSPORTS):
        peer = eng.connect(bytes.fromhex(info["engine"]), transport=name)
        runners[name] = EngineRunner(peer, local, remote)
        peers.append(f"{name} -> {peer.transport}")
    header += [("Target", f"pid {info['pid']} (python -m kvtransfer.target), region {remote.nbytes} bytes"),
               ("Peer transports", ", ".join(peers)),
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

        results: dict[tuple[str, int], Result] = {}
        for size in sizes:
            layout = make_layout(size, total, args.seed)
            gather(reference, layout, expected)
            for system in systems:
                r = measure(system, runners[system], layout, dst, expected, args.warmup, args.iters)
                results[system, size] = r
                print(f"[transfer_bw] {system:<6} {human(size):>5} blocks: verified, "
                      f"{r.bw_avg_gbps:6.2f} GB/s avg", file=sys.stderr, flush=True)

    header.append(("Verified", f"yes (first pass of each of {len(results)} system/size pairs, destination "
                               "zeroed before it)"))
    print(report(header, systems, sizes, results,
                 {"shm_threads": args.shm_threads, "tcp_connections": args.tcp_connections,
                  "verbs_qps": args.verbs_qps}), flush=True)
    if args.json:
        records = [results[system, size].record() for system in systems for size in sizes]
        Path(args.json).write_text(json.dumps(records, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except VerifyError as e:
        print(f"transfer_bw: VERIFY FAILED: {e}", file=sys.stderr)
        return 1
    except (BenchError, KVTransferError, zmq.ZMQError) as e:
        print(f"transfer_bw: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
