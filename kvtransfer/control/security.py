"""CurveZMQ for the control plane: authentication and encryption, keys in files.

The prefill side (server) has a key pair and a folder of the public keys of the decode
workers it accepts; a decode side (client) has its own key pair and the server's public
key. Keys are ZeroMQ certificate files as written by :func:`generate_keys` (or
``zmq.auth.create_certificates``): ``NAME.key`` (public) and ``NAME.key_secret``.

Without keys the control plane is plaintext and unauthenticated: anyone who reaches the
socket can fetch region descriptors (and so read the KV pool over tcp) and hold leases.
That is fine on loopback; a server that binds beyond loopback without keys logs a
warning at start.
"""

from __future__ import annotations

import ipaddress
import logging
import os
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
