#!/usr/bin/python3
"""A kvtransfer verbs peer written with rdma-core's pyverbs, for interoperability tests.

Run with Debian's ``/usr/bin/python3`` (python3-pyverbs, rdma-core 44); it uses only
pyverbs and the standard library: no kvtransfer code, no numpy. It speaks kvtransfer's
tcp bootstrap (csrc/wire.h, version 1) from the wire format alone, so a test that pairs
it with the engine checks the engine against an implementation nobody here wrote.

    pyverbs_peer.py serve --bytes N --seed S
        Registers N bytes of random.Random(S).randbytes(N) for REMOTE_READ on the device
        KVTRANSFER_IB_DEVICE (port KVTRANSFER_IB_PORT, default 1; GID index
        KVTRANSFER_IB_GID_INDEX, default 0), listens on a random loopback tcp port,
        prints one JSON line
            {"engine_id": HEX, "port": P, "addr": A, "rkey": R, "nbytes": N, "gid": HEX}
        and answers bootstrap connections: hello, then "KVTV" frames, each creating that
        many RC queue pairs (one CQ) connected to the client's; they live as long as the
        connection. Exits at end of stdin.

    pyverbs_peer.py read --host H --port P --engine-id HEX --addr A --rkey R --nbytes N --out FILE
        Connects to an engine's bootstrap (checking its engine id), connects one RC
        queue pair, RDMA READs [A, A+N) with rkey R in chunks of at most 1 MiB, checks
        every completion, writes the bytes to FILE. Exit 0 on success, else 1 with a
        message on stderr. Every step has a deadline (--timeout, default 60 s).

Wire format (little-endian), as in csrc/wire.h:
    hello   <IHHiI16s   magic "KVTH", version 1, flags, status, reserved, engine id
    header  <IIQ        magic, n, seq
    verbs   <iHBB16s8I8II status, lid, mtu (enum ibv_mtu), nqp, gid, qpn[8], psn[8], rd_depth
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import select
import socket
import struct
import sys
import threading
import time

from pyverbs.addr import GID, AHAttr, GlobalRoute
from pyverbs.cq import CQ, cqe_status_to_str
from pyverbs.device import Context
from pyverbs.mr import MR
from pyverbs.pd import PD
from pyverbs.pyverbs_error import PyverbsError, PyverbsRDMAError
from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
from pyverbs.wr import SGE, SendWR
import pyverbs.enums as e

HELLO = struct.Struct("<IHHiI16s")
HDR = struct.Struct("<IIQ")
VERBS = struct.Struct("<iHBB16s8I8II")
assert HELLO.size == 32 and HDR.size == 16 and VERBS.size == 92

HELLO_MAGIC = 0x4854564B  # "KVTH"
VERBS_MAGIC = 0x5654564B  # "KVTV"
WIRE_VERSION = 1
MAX_QPS = 8
CHUNK = 1 << 20  # bytes per RDMA READ work request

# ibv_qp_attr_mask bits (verbs.h), spelled out so the masks are explicit here.
MASK_INIT = e.IBV_QP_STATE | e.IBV_QP_PKEY_INDEX | e.IBV_QP_PORT | e.IBV_QP_ACCESS_FLAGS
MASK_RTR = (e.IBV_QP_STATE | e.IBV_QP_AV | e.IBV_QP_PATH_MTU | e.IBV_QP_DEST_QPN | e.IBV_QP_RQ_PSN
            | e.IBV_QP_MAX_DEST_RD_ATOMIC | e.IBV_QP_MIN_RNR_TIMER)
MASK_RTS = (e.IBV_QP_STATE | e.IBV_QP_TIMEOUT | e.IBV_QP_RETRY_CNT | e.IBV_QP_RNR_RETRY | e.IBV_QP_SQ_PSN
            | e.IBV_QP_MAX_QP_RD_ATOMIC)


class PeerError(Exception):
    """A failure worth one line on stderr (and exit status 1)."""


def log(msg: str) -> None:
    print(f"pyverbs_peer[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ sockets

def recv_exact(sock: socket.socket, n: int, what: str) -> bytes:
    """n bytes or PeerError (end of stream, timeout, reset): the socket's timeout bounds it."""
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except socket.timeout:
            raise PeerError(f"timed out receiving {what} ({len(buf)} of {n} bytes)") from None
        except OSError as ex:
            raise PeerError(f"receiving {what}: {ex}") from None
        if not chunk:
            raise EOFError(f"connection closed during {what} ({len(buf)} of {n} bytes)")
        buf += chunk
    return bytes(buf)


# ------------------------------------------------------------------ the device

def gid_to_str(raw: bytes) -> str:
    """16 raw bytes -> pyverbs' 'xxxx:xxxx:...:xxxx' form."""
    h = raw.hex()
    return ":".join(h[i:i + 4] for i in range(0, 32, 4))


class Device:
    """An opened RDMA port: context, protection domain, GID, limits."""

    def __init__(self) -> None:
        name = os.environ.get("KVTRANSFER_IB_DEVICE", "")
        if not name:
            raise PeerError("KVTRANSFER_IB_DEVICE is not set (the RDMA device to use, e.g. rxe0)")
        self.port = int(os.environ.get("KVTRANSFER_IB_PORT", "1"))
        self.gid_index = int(os.environ.get("KVTRANSFER_IB_GID_INDEX", "0"))
        try:
            self.ctx = Context(name=name)
        except PyverbsError as ex:
            raise PeerError(f"cannot open RDMA device {name}: {ex}") from None
        self.name = name
        self.pd = PD(self.ctx)
        self.dev = self.ctx.query_device()
        pa = self.ctx.query_port(self.port)
        if pa.state != e.IBV_PORT_ACTIVE:
            raise PeerError(f"{name} port {self.port} is not active (state {pa.state})")
        self.lid = pa.lid
        self.mtu = pa.active_mtu
        self.gid = bytes.fromhex(self.ctx.query_gid(self.port, self.gid_index).gid.replace(":", ""))
        if self.gid == bytes(16):
            raise PeerError(f"{name} port {self.port} GID index {self.gid_index} is empty")
        # Responder resources (READs we answer at once) and initiator depth (READs we
        # issue at once), each bounded by the device limit and by the 8-bit field.
        self.max_dest_rd_atomic = max(1, min(self.dev.max_qp_rd_atom, 255))
        self.max_rd_atomic = max(1, min(self.dev.max_qp_init_rd_atom, 255))

    def close(self) -> None:
        self.ctx.close()  # closes every PD, MR, CQ and QP made from it


class QPSet:
    """n RC queue pairs on one CQ, taken to INIT at once and to RTS by connect()."""

    def __init__(self, d: Device, n: int, send_depth: int) -> None:
        self.d = d
        self.cq = CQ(d.ctx, max(16, min(n * (send_depth + 1), d.dev.max_cqe)))
        self.send_depth = send_depth
        self.qps: list[QP] = []
        self.psns: list[int] = []
        self.mtu = d.mtu
        for _ in range(n):
            cap = QPCap(max_send_wr=send_depth, max_recv_wr=1, max_send_sge=1, max_recv_sge=1)
            init = QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self.cq, rcq=self.cq, cap=cap, sq_sig_all=0)
            qp = QP(d.pd, init)
            a = QPAttr(qp_state=e.IBV_QPS_INIT, port_num=d.port)
            a.pkey_index = 0
            a.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_READ
            qp.modify(a, MASK_INIT)
            self.qps.append(qp)
            self.psns.append(random.getrandbits(24))

    def local(self, status: int = 0) -> bytes:
        qpn = [qp.qp_num for qp in self.qps] + [0] * (MAX_QPS - len(self.qps))
        psn = self.psns + [0] * (MAX_QPS - len(self.psns))
        return VERBS.pack(status, self.d.lid, self.mtu, len(self.qps), self.d.gid, *qpn, *psn,
                          self.d.max_dest_rd_atomic)

    def connect(self, remote: tuple) -> None:
        _status, lid, mtu, nqp, gid, *rest = remote
        qpns, psns, their_depth = rest[:MAX_QPS], rest[MAX_QPS:2 * MAX_QPS], rest[2 * MAX_QPS]
        # our READs in flight: our initiator limit, never above what the peer answers
        self.rd_atomic = max(1, min(self.d.max_rd_atomic, their_depth))
        if nqp != len(self.qps):
            raise PeerError(f"peer has {nqp} queue pairs, we have {len(self.qps)}")
        self.mtu = min(self.d.mtu, mtu)
        for i, qp in enumerate(self.qps):
            gr = GlobalRoute(dgid=GID(gid_to_str(gid)), sgid_index=self.d.gid_index, hop_limit=64)
            ah = AHAttr(dlid=lid, port_num=self.d.port, is_global=1, gr=gr)
            rtr = QPAttr(qp_state=e.IBV_QPS_RTR, cur_qp_state=e.IBV_QPS_INIT, port_num=self.d.port,
                         path_mtu=self.mtu)
            rtr.dest_qp_num = qpns[i]
            rtr.rq_psn = psns[i]
            rtr.max_dest_rd_atomic = self.d.max_dest_rd_atomic
            rtr.min_rnr_timer = 12
            rtr.ah_attr = ah
            try:
                qp.modify(rtr, MASK_RTR)
            except PyverbsRDMAError as ex:
                raise PeerError(f"qpn {qp.qp_num} INIT->RTR (dest qpn {qpns[i]}, mtu enum {self.mtu}, "
                                f"dgid {gid.hex()}, sgid index {self.d.gid_index}): {ex}") from ex
            rts = QPAttr(qp_state=e.IBV_QPS_RTS, cur_qp_state=e.IBV_QPS_RTR, port_num=self.d.port)
            rts.timeout = 14
            rts.retry_cnt = 7
            rts.rnr_retry = 7
            rts.sq_psn = self.psns[i]
            rts.max_rd_atomic = self.rd_atomic
            try:
                qp.modify(rts, MASK_RTS)
            except PyverbsRDMAError as ex:
                raise PeerError(f"qpn {qp.qp_num} RTR->RTS: {ex}") from ex

    def close(self) -> None:
        for qp in self.qps:
            qp.close()
        self.qps = []
        self.cq.close()


def rdma_errno(ex: Exception) -> int:
    code = getattr(ex, "error_code", -1)
    return code if isinstance(code, int) and code > 0 else errno.EIO


# ------------------------------------------------------------------ serve

class Server:
    def __init__(self, nbytes: int, seed: int) -> None:
        self.d = Device()
        self.nbytes = nbytes
        self.mr = MR(self.d.pd, nbytes, e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_READ)
        self.mr.write(random.Random(seed).randbytes(nbytes), nbytes)
        self.engine_id = os.urandom(16)
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.lock = threading.Lock()  # guards verbs object creation/destruction and conns
        self.conns: set[socket.socket] = set()
        self.threads: list[threading.Thread] = []

    def announce(self) -> None:
        print(json.dumps({"engine_id": self.engine_id.hex(), "port": self.lsock.getsockname()[1],
                          "addr": self.mr.buf, "rkey": self.mr.rkey, "nbytes": self.nbytes,
                          "gid": self.d.gid.hex()}), flush=True)

    def run(self) -> None:
        """Accepts until end of stdin."""
        stdin = sys.stdin.fileno()
        while True:
            ready, _, _ = select.select([self.lsock, stdin], [], [])
            if stdin in ready and not os.read(stdin, 4096):
                break
            if self.lsock in ready:
                conn, _ = self.lsock.accept()
                with self.lock:
                    self.conns.add(conn)
                t = threading.Thread(target=self.serve_conn, args=(conn,), daemon=True)
                t.start()
                self.threads.append(t)

    def serve_conn(self, conn: socket.socket) -> None:
        qs: QPSet | None = None
        conn.settimeout(30.0)  # once a frame starts, its bytes come promptly
        try:
            magic, version, _flags, _status, _res, _want = HELLO.unpack(recv_exact(conn, HELLO.size, "hello"))
            ok = magic == HELLO_MAGIC and version == WIRE_VERSION
            conn.sendall(HELLO.pack(HELLO_MAGIC, WIRE_VERSION, 0, 0 if ok else -errno.EPROTO, 0, self.engine_id))
            if not ok:
                log(f"bad hello (magic {magic:#x}, version {version}): closing")
                return
            while True:
                conn.settimeout(None)  # idle between frames: no deadline
                first = recv_exact(conn, 1, "frame header")
                conn.settimeout(30.0)
                magic, n, seq = HDR.unpack(first + recv_exact(conn, HDR.size - 1, "frame header"))
                if magic != VERBS_MAGIC:
                    log(f"frame magic {magic:#x} is not KVTV (this peer serves verbs only): closing")
                    return
                theirs = VERBS.unpack(recv_exact(conn, VERBS.size, "verbs endpoint"))
                status, reply = 0, None
                if qs is not None:
                    status = -errno.EALREADY
                elif not (1 <= n <= MAX_QPS) or theirs[3] != n:
                    status = -errno.EINVAL
                else:
                    try:
                        with self.lock:
                            qs = QPSet(self.d, n, send_depth=16)
                            qs.connect(theirs)
                        reply = qs.local(0)
                    except (PyverbsError, PeerError) as ex:
                        log(f"queue pairs for {n}: {ex}")
                        status = -rdma_errno(ex.__cause__ or ex)
                        if qs is not None:
                            with self.lock:
                                qs.close()
                            qs = None
                if reply is None:
                    reply = VERBS.pack(status, 0, 0, 0, bytes(16), *([0] * 16), 0)
                conn.sendall(HDR.pack(VERBS_MAGIC, n, seq) + reply)
        except EOFError:
            pass  # the client closed: its queue pairs go with the connection
        except (PeerError, OSError) as ex:
            log(f"connection: {ex}")
        finally:
            with self.lock:
                if qs is not None:
                    qs.close()
                self.conns.discard(conn)
            conn.close()

    def close(self) -> None:
        self.lsock.close()
        with self.lock:
            for c in self.conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for t in self.threads:
            t.join(timeout=5.0)
        with self.lock:
            self.d.close()


def cmd_serve(args: argparse.Namespace) -> int:
    srv = Server(args.bytes, args.seed)
    try:
        srv.announce()
        srv.run()
    finally:
        srv.close()
    return 0


# ------------------------------------------------------------------ read

def cmd_read(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout

    def left() -> float:
        t = deadline - time.monotonic()
        if t <= 0:
            raise PeerError(f"deadline of {args.timeout} s passed")
        return t

    want_id = bytes.fromhex(args.engine_id)
    if len(want_id) != 16:
        raise PeerError("--engine-id must be 16 bytes of hex")
    if args.nbytes < 1:
        raise PeerError("--nbytes must be at least 1")
    d = Device()
    sock = socket.create_connection((args.host, args.port), timeout=left())
    qs = None
    try:
        sock.settimeout(left())
        sock.sendall(HELLO.pack(HELLO_MAGIC, WIRE_VERSION, 0, 0, 0, want_id))
        magic, version, _flags, status, _res, got_id = HELLO.unpack(recv_exact(sock, HELLO.size, "hello reply"))
        if magic != HELLO_MAGIC or version != WIRE_VERSION or status != 0:
            raise PeerError(f"{args.host}:{args.port} is not a kvtransfer v{WIRE_VERSION} engine "
                            f"(magic {magic:#x}, version {version}, status {status})")
        if got_id != want_id:
            raise PeerError(f"{args.host}:{args.port} serves engine {got_id.hex()}, not {want_id.hex()}")

        depth = max(1, min(64, d.dev.max_qp_wr))
        qs = QPSet(d, 1, send_depth=depth)
        sock.settimeout(left())
        sock.sendall(HDR.pack(VERBS_MAGIC, 1, 1) + qs.local(0))
        magic, n, seq = HDR.unpack(recv_exact(sock, HDR.size, "verbs reply header"))
        theirs = VERBS.unpack(recv_exact(sock, VERBS.size, "verbs reply"))
        if magic != VERBS_MAGIC or n != 1 or seq != 1:
            raise PeerError(f"bad verbs reply header (magic {magic:#x}, n {n}, seq {seq})")
        if theirs[0] != 0:
            raise PeerError(f"engine refused queue pairs: status {theirs[0]} ({os.strerror(-theirs[0])})")
        qs.connect(theirs)

        mr = MR(d.pd, args.nbytes, e.IBV_ACCESS_LOCAL_WRITE)
        chunks = [(off, min(CHUNK, args.nbytes - off)) for off in range(0, args.nbytes, CHUNK)]
        qp = qs.qps[0]
        window = max(1, min(depth, qs.rd_atomic))
        posted = done = 0
        while done < len(chunks):
            while posted < len(chunks) and posted - done < window:
                off, ln = chunks[posted]
                wr = SendWR(wr_id=posted, opcode=e.IBV_WR_RDMA_READ, num_sge=1,
                            sg=[SGE(mr.buf + off, ln, mr.lkey)], send_flags=e.IBV_SEND_SIGNALED)
                wr.set_wr_rdma(args.rkey, args.addr + off)
                try:
                    qp.post_send(wr)
                except PyverbsRDMAError as ex:
                    raise PeerError(f"ibv_post_send of READ {posted} ({ln} bytes at {args.addr + off:#x}): {ex}")
                posted += 1
            npolled, wcs = qs.cq.poll(num_entries=16)
            if npolled == 0:
                left()
                time.sleep(0.0005)
                continue
            for wc in wcs[:npolled]:
                if wc.status != e.IBV_WC_SUCCESS:
                    off, ln = chunks[wc.wr_id] if 0 <= wc.wr_id < len(chunks) else (-1, -1)
                    raise PeerError(f"RDMA READ {wc.wr_id} ({ln} bytes at {args.addr + off:#x}, rkey "
                                    f"{args.rkey:#x}) failed: {cqe_status_to_str(wc.status)} "
                                    f"(status {wc.status}, vendor_err {wc.vendor_err:#x})")
                if wc.opcode != e.IBV_WC_RDMA_READ:
                    raise PeerError(f"unexpected completion opcode {wc.opcode} for wr_id {wc.wr_id}")
                done += 1
        data = mr.read(args.nbytes, 0)
        with open(args.out, "wb") as f:
            f.write(data)
        return 0
    finally:
        if qs is not None:
            qs.close()
        sock.close()
        d.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve", help="register seeded bytes and answer bootstrap connections")
    s.add_argument("--bytes", type=int, required=True)
    s.add_argument("--seed", type=int, required=True)
    r = sub.add_parser("read", help="read a kvtransfer engine's region with RDMA READ")
    r.add_argument("--host", default="127.0.0.1")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--engine-id", required=True)
    r.add_argument("--addr", type=lambda x: int(x, 0), required=True)
    r.add_argument("--rkey", type=lambda x: int(x, 0), required=True)
    r.add_argument("--nbytes", type=int, required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args(argv)
    try:
        return cmd_serve(args) if args.mode == "serve" else cmd_read(args)
    except (PeerError, PyverbsError, OSError, EOFError) as ex:
        log(f"{args.mode} failed: {type(ex).__name__}: {ex}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
