"""CurveZMQ for the control plane: authentication and encryption, keys in files.

The prefill side (server) has a key pair and a folder of the public keys of the decode
workers it accepts; a decode side (client) has its own key pair and the server's public
key. Keys are ZeroMQ certificate files as written by :func:`generate_keys` (or
``zmq.auth.create_certificates``): ``NAME.key`` (public) and ``NAME.key_secret``.

Without keys the control plane is plaintext and unauthenticated: anyone who reaches the
socket can fetch region descriptors and so read registered memory over the engine's tcp
port, and hold leases. That is fine on loopback; a server that binds beyond loopback
without keys logs a warning at start, and ``kvtransfer doctor`` lists the kvtransfer
processes of this host that listen beyond loopback without keys
(:func:`exposed_listeners`). With keys, the engine's tcp server admits only the
token of an authenticated session (see :mod:`.server`).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from ..errors import InvalidArgumentError

log = logging.getLogger("kvtransfer.control")


def generate_keys(folder: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Writes a new key pair ``NAME.key`` / ``NAME.key_secret`` into ``folder``;
    returns (public file, secret file)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(folder), name)
    return Path(public), Path(secret)


def _load(path: str | os.PathLike, *, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret_key = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise InvalidArgumentError(f"cannot load CURVE key file {path}: {e}", op="curve") from None
    if secret and not secret_key:
        raise InvalidArgumentError(f"{path} holds no secret key (expected a .key_secret file)", op="curve")
    return public, secret_key


@dataclass(frozen=True)
class CurveServerKeys:
    """The prefill side: its secret key file and the folder of accepted clients' public keys."""
    secret_file: str | os.PathLike
    clients_dir: str | os.PathLike

    def apply(self, ctx: zmq.Context, sock: zmq.Socket) -> ThreadAuthenticator:
        """Makes ``sock`` a CURVE server accepting only the keys in ``clients_dir``; the
        returned authenticator (one per context) must be stopped after the socket closes."""
        if not zmq.has("curve"):
            raise InvalidArgumentError("this libzmq has no CURVE support", op="curve")
        if not Path(self.clients_dir).is_dir():
            raise InvalidArgumentError(f"CURVE clients folder {self.clients_dir} does not exist", op="curve")
        public, secret = _load(self.secret_file, secret=True)
        auth = ThreadAuthenticator(ctx, log=logging.getLogger("kvtransfer.control.auth"))
        auth.start()
        try:
            auth.configure_curve(domain="*", location=str(self.clients_dir))
            sock.curve_secretkey = secret
            sock.curve_publickey = public
            sock.curve_server = True
        except BaseException:
            auth.stop()  # else its thread keeps the context alive and ctx.term() waits for ever
            raise
        return auth


@dataclass(frozen=True)
class CurveClientKeys:
    """The decode side: its secret key file and the server's public key file."""
    secret_file: str | os.PathLike
    server_public_file: str | os.PathLike

    def apply(self, sock: zmq.Socket) -> None:
        if not zmq.has("curve"):
            raise InvalidArgumentError("this libzmq has no CURVE support", op="curve")
        public, secret = _load(self.secret_file, secret=True)
        server_public, _ = _load(self.server_public_file, secret=False)
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_serverkey = server_public


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for ``ipc://``/``inproc://`` and tcp endpoints bound to a loopback address."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name or a hostname: assume it is reachable from outside


def warn_if_exposed(endpoint: str, keys: object | None) -> None:
    if keys is None and not is_loopback_endpoint(endpoint):
        log.warning("control plane listens on %s beyond loopback WITHOUT CurveZMQ keys: anyone who reaches it can "
                    "fetch the KV pool's descriptors and hold leases; pass curve=CurveServerKeys(...) "
                    "(see kvtransfer.control.security)", endpoint)


def exposed_listeners(proc: str = "/proc") -> list[dict]:
    """The TCP ports of this host's kvtransfer processes (those that mapped its C
    extension) that listen beyond loopback: ``pid``, ``command``, ``address``,
    ``port`` and ``curve`` (whether the command line configures CurveZMQ keys, as the
    workers' ``--curve-secret`` does). Processes this user may not inspect, and this
    one (doctor's own engine), are skipped."""
    found = []
    for pid in sorted((int(d) for d in os.listdir(proc) if d.isdigit() and int(d) != os.getpid())):
        try:
            with open(f"{proc}/{pid}/maps") as f:
                if "kvtransfer/_C" not in f.read():
                    continue
            with open(f"{proc}/{pid}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            inodes = {m.group(1) for fd in os.listdir(f"{proc}/{pid}/fd")
                      if (m := re.fullmatch(r"socket:\[(\d+)\]", _readlink(f"{proc}/{pid}/fd/{fd}")))}
            listening = _listening(f"{proc}/{pid}/net")
        except OSError:  # gone, or not ours to read
            continue
        for inode, (address, port) in listening.items():
            if inode in inodes and not ipaddress.ip_address(address).is_loopback:
                found.append({"pid": pid, "command": " ".join(argv[:3]), "address": address, "port": port,
                              "curve": "--curve-secret" in argv})
    return found


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def _listening(net: str) -> dict[str, tuple[str, int]]:
    """socket inode -> (address, port) of the LISTEN sockets in ``/proc/PID/net/tcp{,6}``
    (addresses there are hex, in host byte order per 32-bit word)."""
    out = {}
    for name in ("tcp", "tcp6"):
        try:
            with open(f"{net}/{name}") as f:
                rows = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] != "0A":  # TCP_LISTEN
                continue
            hex_addr, hex_port = cols[1].split(":")
            raw = b"".join(int(hex_addr[i:i + 8], 16).to_bytes(4, "little") for i in range(0, len(hex_addr), 8))
            addr = ipaddress.ip_address(raw)
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
                addr = addr.ipv4_mapped
            out[cols[9]] = (str(addr), int(hex_port, 16))
    return out
