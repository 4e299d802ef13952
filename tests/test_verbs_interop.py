"""Interoperability over real verbs with an implementation nobody here wrote.

The other side is ``tests/rdma/pyverbs_peer.py``, a program on rdma-core's own Python
bindings (Debian's python3-pyverbs, run with ``/usr/bin/python3``) that speaks the
engine's tcp bootstrap from the wire format alone (csrc/wire.h):

- pyverbs registers seeded bytes and serves queue pairs; our engine RDMA READs them
  (scattered blocks and the whole buffer), and a wrong rkey is refused by the NIC
  (RemoteAccessError, EACCES) without spoiling the next read on the same peer;
- our engine (``python -m kvtransfer.testing.target``) serves; pyverbs RDMA READs its region,
  and a wrong rkey gets pyverbs a remote access error while the target lives on.

Runs where this machine has an RDMA device the engine can open and pyverbs imports,
i.e. in the soft-RoCE guest::

    PYTHONPATH=$PWD scripts/rxe/run_in_rxe_vm.sh .venv/bin/python -m pytest -q tests/test_verbs_interop.py

Elsewhere every test skips, saying why. Every subprocess runs under a deadline and is
killed by pid at teardown.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import random
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from kvtransfer import EngineDescriptor, RegionDescriptor, RemoteAccessError
from kvtransfer.testing.children import stop_child
from support import (MiB, Target, TargetLauncher, alloc_dst, assert_bytes, close_within, make_engine, plan,
                     pump_lines, tail_file)

PEER = Path(__file__).resolve().parent / "rdma" / "pyverbs_peer.py"
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, where python3-pyverbs lives

#: Everything is slow in the guest (TCG, rxe at ~20-30 MB/s, Python imports in seconds).
PEER_STARTUP_S = 120.0  # a loaded 2-core host: ~45 s seen for the target's imports
COMMAND_S = 60.0
PEER_READ_S = 120.0
EXIT_S = 15.0
WAIT_S = 60.0
IO_TIMEOUT_S = 20.0

SERVE_BYTES = 2 * MiB + 13  # odd: the last byte is unaligned
SERVE_SEED = 4242
TARGET_BYTES = 3 * MiB + 7  # more than one pyverbs READ chunk (1 MiB), odd tail
TARGET_SEED = 777


def _peer_env() -> dict[str, str]:
    """The environment for /usr/bin/python3: the caller's (it carries
    KVTRANSFER_IB_DEVICE / _GID_INDEX) minus the project's Python paths."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="module")
def rdma() -> None:
    """Skips the module unless the engine has verbs here and pyverbs imports."""
    eng = make_engine()
    try:
        why = eng.verbs_unavailable
    finally:
        close_within(eng)
    if why is not None:
        pytest.skip(f"no RDMA device the engine can open: {why}")
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} not found (pyverbs runs on the system Python)")
    try:
        r = subprocess.run([SYSTEM_PYTHON, "-c", "import pyverbs.device, pyverbs.qp"], env=_peer_env(),
                           capture_output=True, text=True, timeout=PEER_STARTUP_S)
    except subprocess.TimeoutExpired:
        pytest.skip(f"{SYSTEM_PYTHON} -c 'import pyverbs' took over {PEER_STARTUP_S} s")
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"pyverbs is not importable by {SYSTEM_PYTHON} (python3-pyverbs): {last}")


def _stderr_file(prefix: str) -> tuple[int, str]:
    return tempfile.mkstemp(prefix=prefix, suffix=".stderr")


class PyverbsServer:
    """A running ``pyverbs_peer.py serve`` and what it announced."""

    def __init__(self, nbytes: int, seed: int):
        fd, self.stderr_path = _stderr_file("kvt-pyverbs-serve-")
        with os.fdopen(fd, "w") as err:
            self.proc = subprocess.Popen([SYSTEM_PYTHON, str(PEER), "serve", "--bytes", str(nbytes),
                                          "--seed", str(seed)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err, text=True, bufsize=1, env=_peer_env())
        lines: "queue.Queue[str | None]" = queue.Queue()
        threading.Thread(target=pump_lines, args=(self.proc.stdout, lines), daemon=True,
                         name=f"pyverbs-{self.proc.pid}-stdout").start()
        try:
            line = lines.get(timeout=PEER_STARTUP_S)
        except queue.Empty:
            line = "<nothing>"
        if not line or not line.startswith("{"):
            self.stop()
            pytest.fail(f"pyverbs server pid {self.proc.pid} printed {line!r} within {PEER_STARTUP_S} s, not its "
                        f"JSON line (exit code {self.proc.poll()}); stderr:\n{tail_file(self.stderr_path)}")
        self.info = json.loads(line)
        assert self.info["nbytes"] == nbytes

    def stderr(self) -> str:
        return tail_file(self.stderr_path)

    def stop(self) -> None:
        stop_child(self.proc, EXIT_S)


@pytest.fixture
def pyverbs_server(rdma) -> Iterator[PyverbsServer]:
    srv = PyverbsServer(SERVE_BYTES, SERVE_SEED)
    try:
        yield srv
    finally:
        srv.stop()
        rc = srv.proc.returncode
        text = srv.stderr()
        os.unlink(srv.stderr_path)
        assert rc == 0, f"pyverbs server exited {rc}; stderr:\n{text}"


@pytest.fixture
def reader_engine(rdma):
    eng = make_engine(io_timeout=IO_TIMEOUT_S)
    try:
        yield eng
    finally:
        close_within(eng, timeout=60.0)


def _descriptors(info: dict, key: int | None = None) -> tuple[EngineDescriptor, RegionDescriptor]:
    """What the pyverbs server would publish, were it an engine: built by hand."""
    eid = bytes.fromhex(info["engine_id"])
    eng = EngineDescriptor(engine_id=eid, hostname="pyverbs-peer", boot_id="", pid=0, pidns=0, table_fd=0,
                           table_addr=0, tcp_host="127.0.0.1", tcp_port=info["port"], verbs=True,
                           ib_device=os.environ.get("KVTRANSFER_IB_DEVICE", ""), gid=bytes.fromhex(info["gid"]))
    region = RegionDescriptor(engine_id=eid, region_id=1, addr=info["addr"], nbytes=info["nbytes"], device="cpu",
                              device_index=-1, key=info["rkey"] if key is None else key)
    return eng, region


def _expected_python_random(nbytes: int, seed: int) -> np.ndarray:
    return np.frombuffer(random.Random(seed).randbytes(nbytes), dtype=np.uint8)


# ------------------------------------------------------------ pyverbs serves, we read

def test_engine_reads_pyverbs_memory(reader_engine, pyverbs_server):
    info = pyverbs_server.info
    src = _expected_python_random(SERVE_BYTES, SERVE_SEED)
    eng_desc, region_desc = _descriptors(info)
    peer = reader_engine.connect(eng_desc, transport="verbs")
    assert peer.transport == "verbs"

    # 64 scattered, unaligned blocks of 4099 bytes, packed at unaligned local offsets.
    rng = np.random.default_rng(11)
    n, blk = 64, 4099
    remote = rng.integers(0, SERVE_BYTES - blk + 1, n)
    remote[0], remote[-1] = 0, SERVE_BYTES - blk  # both ends of the buffer
    local = 3 + np.arange(n) * (blk + 5)
    dst, dst_region = alloc_dst(reader_engine, int(local[-1]) + blk + 3)
    try:
        want = plan(dst, src, local, remote, blk)
        peer.read_blocks(dst_region, local, region_desc, remote, blk).wait(timeout=WAIT_S)
        assert_bytes(dst, want, "64 scattered blocks read from pyverbs memory")
    finally:
        dst_region.close()

    # The whole buffer in one entry.
    whole, whole_region = alloc_dst(reader_engine, SERVE_BYTES)
    try:
        whole[:] = ~src
        peer.read([(whole_region, 0, region_desc, 0, SERVE_BYTES)]).wait(timeout=WAIT_S)
        assert_bytes(whole, src, "whole pyverbs buffer")
    finally:
        whole_region.close()
    peer.close()


def test_engine_wrong_rkey_on_pyverbs_memory_then_recovers(reader_engine, pyverbs_server):
    info = pyverbs_server.info
    src = _expected_python_random(SERVE_BYTES, SERVE_SEED)
    eng_desc, good = _descriptors(info)
    _, bad = _descriptors(info, key=info["rkey"] ^ 0x1)
    peer = reader_engine.connect(eng_desc, transport="verbs")
    dst, dst_region = alloc_dst(reader_engine, 64 * 1024 + 2)
    try:
        with pytest.raises(RemoteAccessError) as ei:
            peer.read([(dst_region, 1, bad, 4096, 64 * 1024)]).wait(timeout=WAIT_S)
        assert ei.value.errno == errno.EACCES, ei.value
        assert ei.value.transport == "verbs"
        assert ei.value.entry == 0

        # Same peer: the engine rebuilds its queue pairs (a new bootstrap connection
        # to the pyverbs server) and reads again.
        want = plan(dst, src, [1], [SERVE_BYTES - 64 * 1024], [64 * 1024])
        peer.read([(dst_region, 1, good, SERVE_BYTES - 64 * 1024, 64 * 1024)]).wait(timeout=WAIT_S)
        assert_bytes(dst, want, "good read after the refused one")
    finally:
        dst_region.close()
        peer.close()


# ------------------------------------------------------------ we serve, pyverbs reads

@pytest.fixture(scope="module")
def engine_target(rdma) -> Iterator[Target]:
    """One ``kvtransfer.testing.target`` for both tests below (its start is the slow part in
    the guest); stopped, then killed by pid if need be, at the end of the module."""
    launcher = TargetLauncher()
    try:
        yield launcher.start(TARGET_BYTES, TARGET_SEED, startup_timeout=PEER_STARTUP_S)
    finally:
        launcher.close()


def _pyverbs_read(target: Target, out: Path, *, rkey: int | None = None) -> subprocess.CompletedProcess:
    e, r = target.engine, target.region
    assert e.verbs, f"the target engine has no verbs (gid {e.gid.hex()}); stderr:\n{target.stderr()}"
    cmd = [SYSTEM_PYTHON, str(PEER), "read", "--host", e.tcp_host, "--port", str(e.tcp_port),
           "--engine-id", e.engine_id.hex(), "--addr", str(r.addr),
           "--rkey", str((r.key & 0xFFFFFFFF) if rkey is None else rkey), "--nbytes", str(r.nbytes),
           "--out", str(out), "--timeout", str(PEER_READ_S - 20)]
    # subprocess.run kills (by pid) and reaps the child if it overruns.
    return subprocess.run(cmd, env=_peer_env(), capture_output=True, text=True, timeout=PEER_READ_S)


def _check_read(target: Target, out: Path, what: str) -> None:
    got = np.frombuffer(out.read_bytes(), dtype=np.uint8)
    assert_bytes(got, target.expected, what)


def test_pyverbs_reads_engine_memory(engine_target, tmp_path):
    out = tmp_path / "read.bin"
    r = _pyverbs_read(engine_target, out)
    assert r.returncode == 0, (f"pyverbs read exited {r.returncode}:\n{r.stderr}\n"
                               f"target stderr:\n{engine_target.stderr()}")
    _check_read(engine_target, out, "target region read by pyverbs")
    engine_target.command("ping", "pong", timeout=COMMAND_S)  # still serving


def test_pyverbs_wrong_rkey_on_engine_memory(engine_target, tmp_path):
    out = tmp_path / "refused.bin"
    r = _pyverbs_read(engine_target, out, rkey=(engine_target.region.key & 0xFFFFFFFF) ^ 0x1)
    assert r.returncode == 1, f"pyverbs read with a wrong rkey exited {r.returncode}:\n{r.stderr}"
    assert "remote access error" in r.stderr.lower(), r.stderr
    assert not out.exists()
    engine_target.command("ping", "pong", timeout=COMMAND_S)  # the refusal left the target serving
    r = _pyverbs_read(engine_target, out)
    assert r.returncode == 0, f"pyverbs read after the refusal exited {r.returncode}:\n{r.stderr}"
    _check_read(engine_target, out, "target region read by pyverbs after a refused read")
