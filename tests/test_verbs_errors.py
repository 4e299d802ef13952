"""Bad input on the verbs path: each gives an error that names the call and the values,
never a hang or a crash. Needs an RDMA device (the soft-RoCE guest, scripts/rxe/).

The peer here is a fake bootstrap server in this process, speaking csrc/wire.h, so it
can advertise what a real engine never would: an unreachable GID, queue pairs that do
not exist, a path MTU that is not one, or a refusal."""

from __future__ import annotations

import socket
import struct
import threading
import time

import msgspec
import pytest

from kvtransfer import Engine, EngineDescriptor, TransferError, TransportUnavailableError

from support import MiB, WAIT_S, alloc_dst, close_within

HELLO = struct.Struct("<IHHiI16s")
HDR = struct.Struct("<IIQ")
VERBS = struct.Struct("<iHBB16s8I8II")  # kvt_wire_verbs, 92 bytes (csrc/wire.h)
HELLO_MAGIC, VERBS_MAGIC = 0x4854564B, 0x5654564B


@pytest.fixture(scope="module")
def rdma_engine():
    eng = Engine(io_timeout=3.0)
    if eng.verbs_unavailable is not None:
        eng.close()
        pytest.skip(f"no RDMA device: {eng.verbs_unavailable}")
    yield eng
    close_within(eng)


class FakePeer:
    """Answers one bootstrap connection: hello, then one KVTV frame with `reply(theirs)`."""

    def __init__(self, reply):
        self.engine_id = bytes(range(16))
        self.reply = reply
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(WAIT_S)
        self.port = self.sock.getsockname()[1]
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
            with conn:
                conn.settimeout(WAIT_S)
                self._recv(conn, HELLO.size)
                conn.sendall(HELLO.pack(HELLO_MAGIC, 1, 0, 0, 0, self.engine_id))
                hdr = HDR.unpack(self._recv(conn, HDR.size))
                theirs = VERBS.unpack(self._recv(conn, VERBS.size))
                conn.sendall(HDR.pack(VERBS_MAGIC, hdr[1], hdr[2]) + self.reply(theirs))
                # keep the connection (and so the peer's view of "alive") until it goes
                conn.recv(1)
        except (OSError, struct.error) as e:
            self.errors.append(e)

    @staticmethod
    def _recv(conn: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("peer closed")
            buf += chunk
        return buf

    def descriptor(self, like: EngineDescriptor) -> EngineDescriptor:
        return msgspec.structs.replace(like, engine_id=self.engine_id, tcp_host="127.0.0.1", tcp_port=self.port,
                                       boot_id="elsewhere", pid=1, verbs=True)

    def close(self) -> None:
        self.sock.close()
        self.thread.join(timeout=WAIT_S)

    def __enter__(self) -> "FakePeer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reply(gid: bytes, qpn: int = 0x1234, mtu: int = 3, status: int = 0, nqp: int | None = None):
    def make(theirs: tuple) -> bytes:
        n = theirs[3] if nqp is None else nqp
        qpns = [qpn + i for i in range(8)]
        return VERBS.pack(status, 0, mtu, n, gid, *qpns, *[0] * 8, 16)
    return make


def _v4_gid(a: int, b: int, c: int, d: int) -> bytes:
    return bytes(10) + b"\xff\xff" + bytes([a, b, c, d])


def _connect_and_read(eng: Engine, fake: FakePeer) -> BaseException:
    """Connects to the fake peer over verbs and reads from it; returns the error, which
    must come within the io timeout plus slack."""
    t0 = time.monotonic()
    dst, region = alloc_dst(eng, MiB)
    try:
        peer = eng.connect(fake.descriptor(eng.descriptor), transport="verbs")
    except TransportUnavailableError as e:
        err: BaseException = e
    else:
        _, remote = eng.register(bytearray(4096))  # any descriptor shape; the address is the fake's
        remote = msgspec.structs.replace(remote, engine_id=fake.engine_id)
        with pytest.raises(TransferError) as ei:
            peer.read([(region, 0, remote, 0, 4096)]).wait(timeout=WAIT_S)
        err = ei.value
        peer.close()
    assert time.monotonic() - t0 < 3.0 + 10, "the error took longer than the io timeout allows"
    return err


@pytest.mark.timeout(60)
def test_unreachable_gid_fails_with_the_call_and_the_gid(rdma_engine):
    """A GID on no route (TEST-NET-1) or on the link with nobody there: connect names
    ibv_modify_qp and the GID, or the first read fails after the NIC's retries."""
    for gid in (_v4_gid(192, 0, 2, 1), _v4_gid(10, 99, 0, 77)):
        with FakePeer(_reply(gid)) as fake:
            err = _connect_and_read(rdma_engine, fake)
        text = str(err)
        assert any(s in text for s in ("ibv_modify_qp", "RDMA READ", "no completion")), text
        if "ibv_modify_qp" in text:
            assert "dgid=" in text and "INIT->RTR" in text, text


@pytest.mark.timeout(60)
def test_queue_pairs_that_cannot_reach_rts(rdma_engine):
    """A path MTU that is no MTU, and a queue-pair count that does not match: refused at
    connect with the values."""
    gid = rdma_engine.descriptor.gid
    with FakePeer(_reply(gid, mtu=9)) as fake:
        with pytest.raises(TransportUnavailableError, match="peer advertised path MTU code 9"):
            rdma_engine.connect(fake.descriptor(rdma_engine.descriptor), transport="verbs")
    with FakePeer(_reply(gid, nqp=1)) as fake:
        with pytest.raises(TransportUnavailableError, match="peer has 1 queue pairs, we have 2"):
            rdma_engine.connect(fake.descriptor(rdma_engine.descriptor), transport="verbs")


@pytest.mark.timeout(60)
def test_peer_that_refuses_queue_pairs(rdma_engine):
    with FakePeer(_reply(bytes(16), status=-19)) as fake:  # -ENODEV: "no RDMA device here"
        with pytest.raises(TransportUnavailableError, match="refused RDMA queue pairs: No such device"):
            rdma_engine.connect(fake.descriptor(rdma_engine.descriptor), transport="verbs")


@pytest.mark.timeout(60)
def test_engine_without_rdma_is_refused_clearly(rdma_engine):
    """Forcing verbs to an engine that opened no device says so, before any traffic."""
    with Engine(use_verbs=False) as plain:
        assert plain.verbs_unavailable == "verbs not requested"
        with pytest.raises(TransportUnavailableError, match="peer engine has no RDMA device"):
            rdma_engine.connect(plain.descriptor, transport="verbs")
        with pytest.raises(TransportUnavailableError, match="verbs not requested"):
            plain.connect(rdma_engine.descriptor, transport="verbs")


def test_registration_reports_how_the_nic_got_the_memory(rdma_engine):
    """Host memory goes to the NIC with ibv_reg_mr ("host"); the key's low 32 bits are
    the rkey, so a reader holding only the descriptor can read over verbs."""
    region, desc = rdma_engine.register(bytearray(8192))
    assert region.verbs_registration == "host"
    assert desc.key & 0xFFFFFFFF and desc.key >> 32
    region.close()
