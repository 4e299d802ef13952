"""The tcp server against hostile and unlucky clients (issue 18, weaknesses 1-5).

Real sockets from raw clients on loopback against a target process: idle holders
after the hello, a server out of descriptors, slow readers against deregistration and
engine close, a byte-a-second client, an oversized request. Each test bounds what the
server may keep (connections, threads, CPU, time) and then reads with an engine,
bytes checked, to show the server still serves.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from kvtransfer import Engine, TransportUnavailableError
from support import ROOT, good_read
from test_tcp_wire import (ENT, HDR, HELLO, HELLO_MAGIC, REQ_MAGIC, VERSION, assert_dropped, entry, recv_exact,
                           request, response, valid_hello)

IO_TIMEOUT = 2.0
IDLE_TIMEOUT = 1.5
PER_PEER = 24
TOTAL = 32
SLACK = 2.5  # the acceptor checks deadlines every 0.1 s; a loaded machine adds more
REFUSED_TOTAL, REFUSED_PEER = 1, 2


def start(start_target, nbytes: int = 8 << 20, *extra: str):
    return start_target(nbytes, 5, "--io-timeout", str(IO_TIMEOUT), "--idle-timeout", str(IDLE_TIMEOUT),
                        "--max-conns", str(TOTAL), "--max-conns-per-peer", str(PER_PEER), *extra)


def stats(target) -> dict:
    target.proc.stdin.write("stats\n")
    target.proc.stdin.flush()
    return json.loads(target.readline())


def dial_from(target, source: str = "127.0.0.1", rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.bind((source, 0))
    s.settimeout(5.0)
    s.connect((target.engine.tcp_host, target.engine.tcp_port))
    return s


def hello_reply(s: socket.socket, target) -> tuple:
    """Sends a hello and returns the server's (status, reserved)."""
    s.sendall(HELLO.pack(HELLO_MAGIC, VERSION, 0, 0, 0, target.engine.engine_id))
    _m, _v, _f, status, reserved, _eid = HELLO.unpack(recv_exact(s, HELLO.size))
    return status, reserved


def wait_dropped(socks: list[socket.socket], within: float) -> float:
    """Seconds until the server closed every one of ``socks`` (fails after ``within``)."""
    t0 = time.monotonic()
    for s in socks:
        assert_dropped(s, within=max(0.1, within - (time.monotonic() - t0)))
    return time.monotonic() - t0


@pytest.mark.timeout(60)
def test_idle_holders_are_capped_refused_readably_and_dropped(start_target, engine):
    """Weakness 1: idle connections after the hello filled every slot, forever."""
    target = start(start_target)
    holders = [dial_from(target) for _ in range(PER_PEER)]
    try:
        for s in holders:
            valid_hello(s, target)
        # one address over its cap: a hello that says so, not a reset
        with dial_from(target) as s:
            assert hello_reply(s, target) == (-errno.EBUSY, REFUSED_PEER)
        with pytest.raises(TransportUnavailableError, match="too many connections from this address") as ei:
            engine.connect(target.engine, transport="tcp")
        assert ei.value.errno == errno.EBUSY
        # the total cap, from other loopback addresses
        more = [dial_from(target, "127.0.0.2") for _ in range(TOTAL - PER_PEER)]
        holders += more
        for s in more:
            valid_hello(s, target)
        with dial_from(target, "127.0.0.3") as s:
            assert hello_reply(s, target) == (-errno.EBUSY, REFUSED_TOTAL)
        st = stats(target)
        assert st["connections"] == TOTAL and st["threads"] == TOTAL + 1, st
        took = wait_dropped(holders, IDLE_TIMEOUT + SLACK)
        print(f"{TOTAL} idle holders held the server at its cap and were dropped {took:.2f} s later")
    finally:
        for s in holders:
            s.close()
    peer = engine.connect(target.engine, transport="tcp")
    good_read(engine, peer, target, nbytes=1 << 20, remote_off=7)
    st = stats(target)
    assert st["dropped_idle"] >= TOTAL and st["refused_busy"] >= 3, repr(st)


@pytest.mark.timeout(60)
def test_a_peer_idle_past_the_servers_timeout_reads_on(start_target, engine):
    """The engine's own connections are dropped when idle too; the next read dials anew."""
    target = start(start_target)
    peer = engine.connect(target.engine, transport="tcp")
    good_read(engine, peer, target, nbytes=100_000)
    time.sleep(IDLE_TIMEOUT + 1.0)
    assert stats(target)["connections"] == 0
    good_read(engine, peer, target, nbytes=3 << 20, remote_off=11)


EMFILE_CHILD = r"""
import json, os, resource, socket, sys, time
from kvtransfer import Engine
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
with Engine(use_verbs=False) as eng:
    held = []
    try:
        while True:
            held.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    print(json.dumps({"port": eng.descriptor.tcp_port}), flush=True)
    sys.stdin.readline()  # the parent's client is in the backlog
    t0, c0 = time.monotonic(), time.process_time()
    time.sleep(2.0)
    cpu, wall = time.process_time() - c0, time.monotonic() - t0
    for fd in held:
        os.close(fd)
    print(json.dumps({"cpu": cpu, "wall": wall, "stats": eng.server_stats()}), flush=True)
    sys.stdin.readline()  # the parent's hello went through
"""


@pytest.mark.timeout(60)
def test_out_of_descriptors_backs_off_instead_of_spinning():
    """Weakness 2: accept4 failing with EMFILE was retried at once (~92% of a core)."""
    proc = subprocess.Popen([sys.executable, "-c", EMFILE_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)
    try:
        port = json.loads(proc.stdout.readline())["port"]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            proc.stdin.write("go\n")
            proc.stdin.flush()
            got = json.loads(proc.stdout.readline())
            print(f"acceptor out of descriptors: {got['cpu']:.3f} s CPU in {got['wall']:.2f} s")
            assert got["cpu"] < 0.25 * got["wall"], got
            assert got["stats"]["accept_backoffs"] > 0, got
            # descriptors back: the queued client is served, not lost
            s.settimeout(10)
            s.sendall(HELLO.pack(HELLO_MAGIC, VERSION, 0, 0, 0, b"\0" * 16))
            assert HELLO.unpack(recv_exact(s, HELLO.size))[3] == 0
            proc.stdin.write("done\n")
            proc.stdin.flush()
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


class SlowReader:
    """A raw client that asks for the whole region, then drains it a little at a time
    (about 40 KiB/s: each recv makes progress, so a per-call timeout never fires)."""

    def __init__(self, target):
        self.sock = dial_from(target, rcvbuf=16 << 10)
        valid_hello(self.sock, target)
        request(self.sock, [entry(target, 0, target.nbytes)], 1)
        self.got = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        while self.got == 0 and self.thread.is_alive():
            time.sleep(0.01)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                chunk = self.sock.recv(2048)
            except OSError:
                return
            if not chunk:
                return
            self.got += len(chunk)
            time.sleep(0.05)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("close", ["region", "engine"])
def test_close_is_bounded_against_a_slow_reader(start_target, close):
    """Weakness 3: Region.close() (and so Engine.close()) waited for a slow reader for
    as long as it read; now the reader's frame deadline ends it."""
    target = start(start_target)
    reader = SlowReader(target)
    try:
        t0 = time.monotonic()
        if close == "region":
            target.command("deregister", "deregistered", timeout=IO_TIMEOUT + SLACK + 5)
        else:
            target.proc.stdin.write("exit\n")
            target.proc.stdin.flush()
            target.proc.wait(timeout=IO_TIMEOUT + SLACK + 5)
        took = time.monotonic() - t0
        print(f"{close} close against a slow reader: {took:.2f} s (io timeout {IO_TIMEOUT} s; "
              f"the reader had {reader.got} of {target.nbytes} bytes)")
        assert took < IO_TIMEOUT + SLACK
        assert reader.got < target.nbytes
    finally:
        reader.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("phase", ["hello", "request"])
def test_a_byte_a_second_client_is_dropped_within_the_io_timeout(start_target, engine, phase):
    """Weakness 4: each byte restarted the per-call timeout, so a trickle held a
    connection and its thread forever. Now a hello or frame has io_timeout in all."""
    target = start(start_target)
    with dial_from(target) as s:
        if phase == "hello":
            frame = HELLO.pack(HELLO_MAGIC, VERSION, 0, 0, 0, target.engine.engine_id)
        else:
            valid_hello(s, target)
            frame = HDR.pack(REQ_MAGIC, 4, 1) + b"".join(ENT.pack(*entry(target, 0, 64)) for _ in range(4))
        t0 = time.monotonic()
        for b in frame:
            try:
                s.send(bytes([b]))
            except OSError:
                break
            if time.monotonic() - t0 > IO_TIMEOUT + SLACK:
                pytest.fail(f"the server still took bytes {IO_TIMEOUT + SLACK} s into a trickled {phase}")
            time.sleep(0.25)
        assert_dropped(s, within=max(0.1, IO_TIMEOUT + SLACK - (time.monotonic() - t0)))
        print(f"a byte-every-0.25-s {phase} was dropped after {time.monotonic() - t0:.2f} s")
    peer = engine.connect(target.engine, transport="tcp")
    good_read(engine, peer, target, nbytes=200_000)


@pytest.mark.timeout(60)
def test_a_request_over_the_frame_limit_is_refused_whole(start_target):
    """Weakness 5: a 32 KiB request could ask for 8 GiB (here) or 64 GiB (a bigger
    region). Over the bytes-per-frame limit, every entry gets -EMSGSIZE, no bytes are
    sent, and the connection stays usable."""
    target = start(start_target)
    with dial_from(target) as s:
        valid_hello(s, target)
        huge = [entry(target, 0, target.nbytes)] * 1024
        request(s, huge, 1)
        statuses, data = response(s, huge, 1)
        assert statuses == [-errno.EMSGSIZE] * 1024 and not any(data)
        small = [entry(target, 5, 1000)]
        request(s, small, 2)
        statuses, data = response(s, small, 2)
        assert statuses == [0] and data[0] == target.expected[5:1005].tobytes()
    assert stats(target)["refused_frames"] == 1


@pytest.mark.timeout(60)
def test_metrics_and_doctor_show_connections_threads_and_refusals(capsys):
    from prometheus_client import CollectorRegistry, generate_latest

    from kvtransfer import doctor
    from kvtransfer.engine_metrics import watch_engine

    registry = CollectorRegistry()
    with Engine(use_verbs=False, tcp_max_connections_per_peer=1) as eng:
        watch_engine(eng, registry)
        port = eng.descriptor.tcp_port
        with socket.create_connection(("127.0.0.1", port), timeout=5) as held, \
                socket.create_connection(("127.0.0.1", port), timeout=5) as over:
            held.sendall(HELLO.pack(HELLO_MAGIC, VERSION, 0, 0, 0, eng.descriptor.engine_id))
            recv_exact(held, HELLO.size)
            over.sendall(HELLO.pack(HELLO_MAGIC, VERSION, 0, 0, 0, eng.descriptor.engine_id))
            assert HELLO.unpack(recv_exact(over, HELLO.size))[3] == -errno.EBUSY
            text = generate_latest(registry).decode()
            eid = eng.id[:16]
            assert f'kvtransfer_tcp_connections{{engine="{eid}"}} 1.0' in text, text
            assert f'kvtransfer_tcp_threads{{engine="{eid}"}} 2.0' in text
            assert f'kvtransfer_tcp_refused_busy_total{{engine="{eid}"}} 1.0' in text
            facts = doctor.collect_engine(eng)["tcp_server"]
            assert facts["stats"]["connections"] == 1 and facts["stats"]["refused_busy"] == 1
            assert facts["limits"]["max_conns_per_peer"] == 1
    assert doctor.main(["--json"]) == 0
    assert '"tcp_server"' in capsys.readouterr().out
