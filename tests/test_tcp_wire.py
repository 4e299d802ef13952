"""The tcp server against hand-built bytes (format: csrc/wire.h, little-endian).

Malformed frames drop that connection and nothing else: the same target still serves
an engine's reads with the right bytes afterwards. Refused entries only get their
status (-errno) and the connection stays usable.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from typing import Iterator

import msgspec
import numpy as np
import pytest

from kvtransfer import TransportUnavailableError
from support import WAIT_S, Target, TargetLauncher, alloc_dst, assert_bytes, good_read, plan

HELLO = struct.Struct("<IHHiI16s")  # magic, version, flags, status, reserved, engine id
HDR = struct.Struct("<IIQ")  # magic, n, seq
ENT = struct.Struct("<QQQQ")  # region, key, offset, length
HELLO_MAGIC, REQ_MAGIC, RESP_MAGIC = 0x4854564B, 0x5254564B, 0x4154564B
VERSION = 1
MAX_ENTRIES = 1024

SERVER_IO_TIMEOUT = 2.0  # the target's io timeout: how long it waits inside a frame
SOCK_DEADLINE = 5.0


@pytest.fixture(scope="module")
def wire_target() -> Iterator[Target]:
    """A target whose server gives up on a stalled frame after 2 s."""
    launcher = TargetLauncher()
    yield launcher.start(8 << 20, 77, "--io-timeout", str(SERVER_IO_TIMEOUT))
    launcher.close()


@pytest.fixture
def tcp_peer(engine, wire_target):
    """An engine peer connected (tcp) before the raw tests misbehave."""
    peer = engine.connect(wire_target.engine, transport="tcp")
    assert peer.transport == "tcp"
    good_read(engine, peer, wire_target)
    return peer


def dial(target: Target) -> socket.socket:
    s = socket.create_connection((target.engine.tcp_host, target.engine.tcp_port), timeout=SOCK_DEADLINE)
    s.settimeout(SOCK_DEADLINE)
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    end = time.monotonic() + SOCK_DEADLINE
    while len(buf) < n:
        s.settimeout(max(0.01, end - time.monotonic()))
        try:
            chunk = s.recv(n - len(buf))
        except socket.timeout:
            pytest.fail(f"server sent {len(buf)} of {n} bytes within {SOCK_DEADLINE} s")
        if not chunk:
            pytest.fail(f"server closed the connection after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def hello(s: socket.socket, target: Target, *, magic: int = HELLO_MAGIC, version: int = VERSION) -> tuple:
    s.sendall(HELLO.pack(magic, version, 0, 0, 0, target.engine.engine_id))
    return HELLO.unpack(recv_exact(s, HELLO.size))


def valid_hello(s: socket.socket, target: Target) -> None:
    m, v, _flags, st, _res, eid = hello(s, target)
    assert (m, v, st, eid) == (HELLO_MAGIC, VERSION, 0, target.engine.engine_id)


def request(s: socket.socket, entries: list[tuple[int, int, int, int]], seq: int) -> None:
    s.sendall(HDR.pack(REQ_MAGIC, len(entries), seq) + b"".join(ENT.pack(*e) for e in entries))


def response(s: socket.socket, entries: list[tuple[int, int, int, int]], seq: int) -> tuple[list[int], list[bytes]]:
    """Reads one response: the statuses, then the bytes of every entry with status 0."""
    magic, n, rseq = HDR.unpack(recv_exact(s, HDR.size))
    assert (magic, n, rseq) == (RESP_MAGIC, len(entries), seq)
    statuses = list(struct.unpack(f"<{n}i", recv_exact(s, 4 * n)))
    data = [recv_exact(s, e[3]) if st == 0 else b"" for e, st in zip(entries, statuses)]
    return statuses, data


def assert_dropped(s: socket.socket, within: float = SOCK_DEADLINE) -> bytes:
    """The server closes the connection within ``within`` seconds (EOF or reset);
    returns what it sent before closing."""
    got = bytearray()
    end = time.monotonic() + within
    while True:
        left = end - time.monotonic()
        if left <= 0:
            pytest.fail(f"server kept the connection open for {within} s (sent {len(got)} bytes)")
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return bytes(got)
        if not chunk:
            return bytes(got)
        got += chunk


def send_quietly(s: socket.socket, data: bytes) -> None:
    """Sends what the server may refuse midway (it may close first)."""
    try:
        s.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def serves_still(engine, peer, target: Target) -> None:
    """The target serves an existing peer and a freshly connected one, bytes checked."""
    good_read(engine, peer, target, nbytes=300_001, remote_off=12_345)
    fresh = engine.connect(target.engine, transport="tcp")
    good_read(engine, fresh, target, nbytes=2 * 4096 + 1, remote_off=3)
    fresh.close()


def entry(target: Target, off: int, length: int, *, key: int | None = None, region: int | None = None):
    d = target.region
    return (d.region_id if region is None else region, d.key if key is None else key, off, length)


# --------------------------------------------------------------------------- hello


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["random_32_bytes", "wrong_magic", "wrong_version"])
def test_bad_hello_is_answered_eproto_and_dropped(engine, wire_target, tcp_peer, kind):
    s = dial(wire_target)
    with s:
        if kind == "random_32_bytes":
            junk = bytearray(os.urandom(HELLO.size))
            junk[0] ^= 0xFF if junk[:4] == struct.pack("<I", HELLO_MAGIC) else 0
            s.sendall(bytes(junk))
            reply = HELLO.unpack(recv_exact(s, HELLO.size))
        elif kind == "wrong_magic":
            reply = hello(s, wire_target, magic=0x12345678)
        else:
            reply = hello(s, wire_target, version=VERSION + 1)
        assert reply[0] == HELLO_MAGIC and reply[3] == -errno.EPROTO, reply
        assert assert_dropped(s) == b""
    serves_still(engine, tcp_peer, wire_target)


@pytest.mark.timeout(30)
def test_short_hello_then_close(engine, wire_target, tcp_peer):
    s = dial(wire_target)
    s.sendall(os.urandom(5))
    s.close()
    serves_still(engine, tcp_peer, wire_target)


@pytest.mark.timeout(30)
def test_short_hello_kept_open_is_dropped_after_the_io_timeout(engine, wire_target, tcp_peer):
    with dial(wire_target) as s:
        s.sendall(b"KVT")
        assert_dropped(s, within=SERVER_IO_TIMEOUT + 3.0)
    serves_still(engine, tcp_peer, wire_target)


@pytest.mark.timeout(30)
def test_silent_connection_is_dropped_after_the_io_timeout(engine, wire_target, tcp_peer):
    """A client that connects and says nothing does not hold a server thread forever."""
    with dial(wire_target) as s:
        assert_dropped(s, within=SERVER_IO_TIMEOUT + 3.0)
    serves_still(engine, tcp_peer, wire_target)


# ------------------------------------------------------------------ request frames


MALFORMED_FRAMES = {
    "n_zero": HDR.pack(REQ_MAGIC, 0, 1),
    "n_100000": HDR.pack(REQ_MAGIC, 100_000, 1),
    "n_1025": HDR.pack(REQ_MAGIC, MAX_ENTRIES + 1, 1),
    "n_uint32_max": HDR.pack(REQ_MAGIC, 0xFFFFFFFF, 1),
    "bad_magic": HDR.pack(0xDEADBEEF, 1, 1) + ENT.pack(1, 1, 0, 1),
    "response_magic": HDR.pack(RESP_MAGIC, 1, 1) + ENT.pack(1, 1, 0, 1),
    "hello_again": HELLO.pack(HELLO_MAGIC, VERSION, 0, 0, 0, bytes(16)),
    "megabyte_of_garbage": b"\x00\x01" + os.urandom(1 << 20),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", list(MALFORMED_FRAMES))
def test_malformed_frame_after_hello_drops_the_connection(engine, wire_target, tcp_peer, kind):
    with dial(wire_target) as s:
        valid_hello(s, wire_target)
        send_quietly(s, MALFORMED_FRAMES[kind])
        assert assert_dropped(s) == b"", "the server answered a malformed frame"
    serves_still(engine, tcp_peer, wire_target)


@pytest.mark.timeout(30)
def test_malformed_frame_after_good_requests(engine, wire_target, tcp_peer):
    """A connection that served requests is dropped by a bad frame all the same."""
    with dial(wire_target) as s:
        valid_hello(s, wire_target)
        ents = [entry(wire_target, 5, 100)]
        request(s, ents, 1)
        st, data = response(s, ents, 1)
        assert st == [0] and data[0] == wire_target.expected[5:105].tobytes()
        send_quietly(s, HDR.pack(REQ_MAGIC, 0, 2))
        assert assert_dropped(s) == b""
    serves_still(engine, tcp_peer, wire_target)


@pytest.mark.timeout(30)
def test_truncated_frame_then_close(engine, wire_target, tcp_peer):
    with dial(wire_target) as s:
        valid_hello(s, wire_target)
        ents = [entry(wire_target, i * 10, 10) for i in range(4)]
        s.sendall(HDR.pack(REQ_MAGIC, 4, 1) + b"".join(ENT.pack(*e) for e in ents[:2]) + b"\x01\x02\x03")
    serves_still(engine, tcp_peer, wire_target)


@pytest.mark.timeout(30)
def test_truncated_frame_kept_open_is_dropped_after_the_io_timeout(engine, wire_target, tcp_peer):
    with dial(wire_target) as s:
        valid_hello(s, wire_target)
        ents = [entry(wire_target, i * 10, 10) for i in range(4)]
        s.sendall(HDR.pack(REQ_MAGIC, 4, 1) + b"".join(ENT.pack(*e) for e in ents[:2]))
        assert assert_dropped(s, within=SERVER_IO_TIMEOUT + 3.0) == b""
    serves_still(engine, tcp_peer, wire_target)


@pytest.mark.timeout(30)
def test_truncated_header_then_close(engine, wire_target, tcp_peer):
    with dial(wire_target) as s:
        valid_hello(s, wire_target)
        s.sendall(HDR.pack(REQ_MAGIC, 1, 1)[:7])
    serves_still(engine, tcp_peer, wire_target)


@pytest.mark.timeout(60)
def test_many_garbage_connections_while_an_engine_reads(engine, wire_target, tcp_peer):
    """Forty misbehaving connections at once, while the engine reads 10,000 blocks."""
    socks = []
    try:
        for i in range(40):
            s = dial(wire_target)
            socks.append(s)
            if i % 2:
                valid_hello(s, wire_target)
                send_quietly(s, os.urandom(64))
            else:
                send_quietly(s, os.urandom(7))
        rng = np.random.default_rng(40)
        ro = rng.integers(0, wire_target.nbytes - 700, 10_000)
        lo = np.arange(10_000, dtype=np.int64) * 701 + 1
        dst, region = alloc_dst(engine, 10_000 * 701 + 1)
        want = plan(dst, wire_target.expected, lo, ro, 700)
        tcp_peer.read_blocks(region, lo, wire_target.region, ro, 700).wait(timeout=WAIT_S)
        assert_bytes(dst, want)
        for s in socks[1::2]:
            assert assert_dropped(s) == b""
    finally:
        for s in socks:
            s.close()
    serves_still(engine, tcp_peer, wire_target)


# ------------------------------------------------------------------ refused entries


@pytest.mark.timeout(30)
def test_wrong_key_gets_eacces_and_the_connection_stays_usable(engine, wire_target, tcp_peer):
    exp = wire_target.expected
    with dial(wire_target) as s:
        valid_hello(s, wire_target)
        bad = [entry(wire_target, 0, 4096, key=wire_target.region.key ^ 1)]
        request(s, bad, 7)
        st, data = response(s, bad, 7)
        assert st == [-errno.EACCES] and data == [b""]
        good = [entry(wire_target, 4097, 5000)]
        request(s, good, 8)
        st, data = response(s, good, 8)
        assert st == [0]
        assert data[0] == exp[4097:9097].tobytes()
    serves_still(engine, tcp_peer, wire_target)


@pytest.mark.timeout(30)
def test_mixed_request_statuses_and_data_in_order(engine, wire_target, tcp_peer):
    """Good and refused entries in one frame: a status each, then only the good
    entries' bytes, in order; then the connection serves another request."""
    exp, d = wire_target.expected, wire_target.region
    ents = [
        entry(wire_target, 1, 333),
        entry(wire_target, 0, 10, key=d.key + 1),
        entry(wire_target, d.nbytes - 5, 6),
        entry(wire_target, 0, 10, region=d.region_id + (1 << 32)),
        entry(wire_target, d.nbytes - 1, 1),
        entry(wire_target, 1 << 63, 1),
        entry(wire_target, 100_003, 65_537),
    ]
    with dial(wire_target) as s:
        valid_hello(s, wire_target)
        request(s, ents, 1)
        st, data = response(s, ents, 1)
        assert st == [0, -errno.EACCES, -errno.ERANGE, -errno.ENOENT, 0, -errno.ERANGE, 0]
        assert data[0] == exp[1:334].tobytes()
        assert data[4] == exp[-1:].tobytes()
        assert data[6] == exp[100_003:165_540].tobytes()
        again = [entry(wire_target, 77, 1)]
        request(s, again, 2)
        assert response(s, again, 2) == ([0], [exp[77:78].tobytes()])
    serves_still(engine, tcp_peer, wire_target)


@pytest.mark.timeout(30)
def test_pipelined_requests_and_the_largest_frame(engine, wire_target, tcp_peer):
    """Three requests sent before reading any answer (one of 1024 entries, the most a
    frame may carry) come back in order, with their sequence numbers."""
    exp = wire_target.expected
    rng = np.random.default_rng(1024)
    big = [entry(wire_target, int(o), 1 + i % 7) for i, o in enumerate(rng.integers(0, wire_target.nbytes - 8,
                                                                                    MAX_ENTRIES))]
    reqs = [([entry(wire_target, 3, 10)], 100), (big, 101), ([entry(wire_target, 9, 1)], 2**64 - 1)]
    with dial(wire_target) as s:
        valid_hello(s, wire_target)
        for ents, seq in reqs:
            request(s, ents, seq)
        for ents, seq in reqs:
            st, data = response(s, ents, seq)
            assert st == [0] * len(ents)
            for (_, _, off, n), got in zip(ents, data):
                assert got == exp[off:off + n].tobytes()
    serves_still(engine, tcp_peer, wire_target)


@pytest.mark.timeout(30)
def test_deregistered_region_over_the_wire(start_target, engine):
    """After deregistration the raw protocol answers -ENOENT and keeps the connection."""
    target = start_target(1 << 20, 3)
    with dial(target) as s:
        valid_hello(s, target)
        ents = [entry(target, 0, 16)]
        request(s, ents, 1)
        assert response(s, ents, 1) == ([0], [target.expected[:16].tobytes()])
        target.deregister()
        request(s, ents, 2)
        assert response(s, ents, 2) == ([-errno.ENOENT], [b""])
        request(s, ents, 3)
        assert response(s, ents, 3) == ([-errno.ENOENT], [b""])
    target.ping()


@pytest.mark.timeout(30)
def test_client_that_stops_reading_midway(engine, wire_target, tcp_peer):
    """A client asks for 8 MiB, reads a little, then closes: the server's send fails
    and that connection ends; others are unaffected."""
    with dial(wire_target) as s:
        valid_hello(s, wire_target)
        ents = [entry(wire_target, 0, wire_target.nbytes)]
        request(s, ents, 1)
        recv_exact(s, HDR.size + 4 + 1000)
    serves_still(engine, tcp_peer, wire_target)


@pytest.mark.timeout(30)
def test_engine_rejects_a_server_of_another_engine(engine, wire_target, other_target):
    """A descriptor whose tcp address is another engine's: the hello's engine id does
    not match, and connect refuses instead of reading the wrong engine's bytes."""
    wrong = msgspec.structs.replace(wire_target.engine, tcp_port=other_target.engine.tcp_port)
    with pytest.raises(TransportUnavailableError):
        engine.connect(wrong, transport="tcp")
    peer = engine.connect(wire_target.engine, transport="tcp")
    good_read(engine, peer, wire_target)
