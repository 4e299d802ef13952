"""Test support: target processes, destinations, byte checks and deadlines.

"The other process" is ``python -m kvtransfer.testing.target`` (see kvtransfer/testing/target.py): it
prints one JSON line with its engine and region descriptors, then serves reads from C
threads while it takes commands on stdin. Every wait here has a deadline: the JSON
line, command replies and process exits are read through a thread and a queue, and a
target that does not exit on end of stdin is killed by pid (only processes started
here are ever signalled).
"""

from __future__ import annotations

import errno
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import kvtransfer
from kvtransfer import Engine, EngineDescriptor, Region, RegionDescriptor
from kvtransfer.testing.children import stop_child
from kvtransfer.testing.target import seeded_bytes

ROOT = Path(__file__).resolve().parent.parent

#: The transports every transfer test is parametrized over: map, shm and tcp on any
#: Linux machine (targets hold their bytes in shared memory, which map needs); the
#: soft-RoCE guest (scripts/rxe/) sets KVTRANSFER_TEST_TRANSPORTS=verbs.
TRANSPORTS = tuple(os.environ.get("KVTRANSFER_TEST_TRANSPORTS", "map,shm,tcp").split(","))


def refusal_errno(transport: str, code: int) -> int:
    """The errno a refusal carries: tcp and shm targets say why (EACCES, ERANGE,
    ENOENT...); over verbs the NIC refuses, and says only "remote access error"."""
    return errno.EACCES if transport == "verbs" else code

STARTUP_DEADLINE_S = 120.0  # ~2 s here for 256 MiB; a busy soft-RoCE guest needs over a minute
COMMAND_DEADLINE_S = 10.0
EXIT_DEADLINE_S = 10.0
#: Deadline for a transfer that should succeed (the biggest is 256 MiB).
WAIT_S = 30.0

MiB = 1 << 20
#: The long-lived target most read tests share: over 64 MiB (the largest single read)
#: plus room for unaligned offsets, and an odd size so the last byte is unaligned too.
SHARED_TARGET_BYTES = 64 * MiB + MiB + 17
SHARED_TARGET_SEED = 1234


def tail_file(path: str) -> str:
    """The last 4000 characters of a child's stderr file, for failure messages."""
    try:
        with open(path, errors="replace") as f:
            return f.read()[-4000:]
    except OSError:
        return "<stderr unavailable>"


def pump_lines(stream, q: "queue.Queue[str | None]") -> None:
    """Moves lines of a target's stdout into a queue; None marks end of file."""
    try:
        for line in stream:
            q.put(line.rstrip("\n"))
    except (OSError, ValueError):
        pass
    finally:
        q.put(None)


@dataclass
class Target:
    """A running ``kvtransfer.testing.target`` process and what it serves."""

    proc: subprocess.Popen
    lines: "queue.Queue[str | None]"
    stderr_path: str
    nbytes: int
    seed: int
    engine: EngineDescriptor
    region: RegionDescriptor
    _expected: np.ndarray | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def expected(self) -> np.ndarray:
        """The bytes this target serves (computed once, on first use)."""
        if self._expected is None:
            self._expected = seeded_bytes(self.nbytes, self.seed)
        return self._expected

    def readline(self, timeout: float = COMMAND_DEADLINE_S) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"target pid {self.pid}: no output within {timeout} s; stderr:\n{self.stderr()}")
        if line is None:
            pytest.fail(f"target pid {self.pid} closed its stdout (exit code {self.proc.poll()}); "
                        f"stderr:\n{self.stderr()}")
        return line

    def command(self, cmd: str, reply: str, timeout: float = COMMAND_DEADLINE_S) -> None:
        """Sends one stdin command and checks its one-line reply, within ``timeout``."""
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        got = self.readline(timeout)
        assert got == reply, f"target answered {got!r} to {cmd!r}, expected {reply!r}"

    def ping(self) -> None:
        self.command("ping", "pong")

    def deregister(self) -> None:
        self.command("deregister", "deregistered")

    def signal(self, sig: int) -> None:
        """Signals this target (by pid; only processes this suite started)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def freeze(self, timeout: float = COMMAND_DEADLINE_S) -> None:
        """SIGSTOP, then waits until every thread of the target is stopped (signals are
        delivered asynchronously; a server thread could otherwise still answer)."""
        self.signal(signal.SIGSTOP)
        end = time.monotonic() + timeout
        while True:
            states = []
            try:
                for tid in os.listdir(f"/proc/{self.pid}/task"):
                    with open(f"/proc/{self.pid}/task/{tid}/stat") as f:
                        states.append(f.read().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:
                states.append("?")  # a thread went away while we looked: look again
            if states and all(st in "tT" for st in states):
                return
            if time.monotonic() > end:
                pytest.fail(f"target pid {self.pid} not stopped {timeout} s after SIGSTOP (states {states})")
            time.sleep(0.005)

    def thaw(self) -> None:
        self.signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL (which ends a stopped process too: no SIGCONT first, that would let
        it run and serve for a moment), then reaps it within a deadline."""
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=EXIT_DEADLINE_S)

    def stderr(self) -> str:
        return tail_file(self.stderr_path)

    def stop(self) -> None:
        """Ends the target: end of stdin, a bounded wait, then SIGKILL by pid."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)  # a SIGSTOPped target cannot see end of stdin
            except ProcessLookupError:
                pass
        stop_child(self.proc, EXIT_DEADLINE_S)
        try:
            os.unlink(self.stderr_path)
        except OSError:
            pass


class TargetLauncher:
    """Starts targets and stops every one of them at ``close()``."""

    def __init__(self) -> None:
        self.targets: list[Target] = []

    def start(self, nbytes: int, seed: int = 0, *extra: str,
              startup_timeout: float = STARTUP_DEADLINE_S) -> Target:
        fd, stderr_path = tempfile.mkstemp(prefix="kvt-target-", suffix=".stderr")
        with os.fdopen(fd, "w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "kvtransfer.testing.target", "--bytes", str(nbytes), "--seed", str(seed),
                 "--shared", *extra],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1, cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines: "queue.Queue[str | None]" = queue.Queue()
        threading.Thread(target=pump_lines, args=(proc.stdout, lines), daemon=True,
                         name=f"target-{proc.pid}-stdout").start()
        t = Target(proc, lines, stderr_path, nbytes, seed, None, None)  # type: ignore[arg-type]
        self.targets.append(t)
        line = t.readline(startup_timeout)
        try:
            hello = json.loads(line)
            t.engine = EngineDescriptor.from_bytes(bytes.fromhex(hello["engine"]))
            t.region = RegionDescriptor.from_bytes(bytes.fromhex(hello["region"]))
        except (ValueError, KeyError) as e:
            pytest.fail(f"target pid {proc.pid} printed {line!r}, not its descriptors: {e}")
        assert hello["pid"] == proc.pid == t.engine.pid
        assert t.region.nbytes == nbytes
        return t

    def close(self) -> None:
        errors = []
        for t in self.targets:
            try:
                t.stop()
            except Exception as e:  # stop the others anyway
                errors.append(f"pid {t.pid}: {e!r}")
        self.targets.clear()
        assert not errors, f"targets did not stop: {errors}"


def close_within(closable, timeout: float = 30.0) -> None:
    """``closable.close()`` in a thread; fails the test if it does not return in time."""
    err: list[BaseException] = []

    def run() -> None:
        try:
            closable.close()
        except BaseException as e:
            err.append(e)

    th = threading.Thread(target=run, daemon=True, name=f"close-{type(closable).__name__}")
    th.start()
    th.join(timeout)
    assert not th.is_alive(), f"{closable!r}.close() still running after {timeout} s"
    if err:
        raise err[0]


def make_engine(**kwargs) -> Engine:
    kwargs.setdefault("io_timeout", 5.0)
    return Engine(**kwargs)


def alloc_dst(eng: Engine, nbytes: int) -> tuple[np.ndarray, Region]:
    """A zeroed, page-aligned destination of ``nbytes`` registered with ``eng``."""
    arr = kvtransfer.alloc_host(nbytes)
    arr[:] = 0
    region, _ = eng.register(arr)
    return arr, region


def plan(dst: np.ndarray, src: np.ndarray, local_offs, remote_offs, lengths) -> np.ndarray:
    """What ``dst`` must hold after reading each ``src[ro:ro+n]`` to ``dst[lo:lo+n]``.

    It also poisons the destination ranges with the complement of the bytes due there,
    so that every byte a read should write differs from what it finds: a skipped or
    misplaced byte cannot pass for a right one. Local ranges must not overlap.
    """
    want = dst.copy()
    lengths = np.broadcast_to(np.asarray(lengths), np.shape(local_offs))
    for lo, ro, n in zip(np.asarray(local_offs).tolist(), np.asarray(remote_offs).tolist(), lengths.tolist()):
        want[lo:lo + n] = src[ro:ro + n]
        dst[lo:lo + n] = ~src[ro:ro + n]
    return want


def assert_bytes(got: np.ndarray, want: np.ndarray, what: str = "destination") -> None:
    """Byte-exact comparison with a short report of the first mismatch."""
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if not np.array_equal(got, want):
        bad = np.flatnonzero(got != want)
        pytest.fail(f"{what}: {bad.size} of {got.size} bytes wrong, first at offset {int(bad[0])} "
                    f"(got {int(got[bad[0]])}, want {int(want[bad[0]])})")


def connect(eng: Engine, target: Target, transport: str):
    """``eng.connect`` forced to ``transport``, checking the transport it reports."""
    peer = eng.connect(target.engine, transport=transport)
    assert peer.transport == transport
    return peer


def good_read(eng: Engine, peer, target: Target, nbytes: int = 64 * 1024 + 3, remote_off: int = 4097) -> None:
    """One read that must succeed: proves ``target`` (and ``peer``) still serve."""
    arr = kvtransfer.alloc_host(nbytes + 1)
    region, _ = eng.register(arr)
    try:
        want = plan(arr, target.expected, [1], [remote_off], [nbytes])
        peer.read([(region, 1, target.region, remote_off, nbytes)]).wait(timeout=WAIT_S)
        assert_bytes(arr, want, "good read after the event")
    finally:
        region.close()


def scattered_blocks(rng: np.random.Generator, n: int, remote_nbytes: int, max_len: int):
    """``n`` blocks of random lengths in [1, max_len] at random (unaligned) remote
    offsets, packed back to back at unaligned local offsets. Returns (local offsets,
    remote offsets, lengths, local bytes needed)."""
    lengths = rng.integers(1, max_len + 1, n)
    remote = rng.integers(0, remote_nbytes - lengths + 1)
    gaps = rng.integers(0, 8, n)  # unaligned holes between blocks, never written
    local = np.cumsum(gaps + np.concatenate(([0], lengths[:-1]))) + 1
    return local.astype(np.int64), remote.astype(np.int64), lengths.astype(np.int64), int(local[-1] + lengths[-1] + 1)


class Deadline:
    """A monotonic deadline for polling loops."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.seconds = seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def passed(self) -> bool:
        return time.monotonic() >= self.end
