"""Tokens on the tcp server (the engine side of the authenticated data plane).

A target process that requires tokens refuses hellos without an allowed one with
EACCES ("token refused"); allowed tokens read the right bytes; revoking a token (or
letting it expire) drops the connections that presented it and refuses new ones.
"""

from __future__ import annotations

import errno
import os
import time

import pytest

from kvtransfer import Engine, InvalidArgumentError, TransferError, TransportUnavailableError
from support import WAIT_S, good_read
from test_tcp_limits import dial_from, stats
from test_tcp_wire import HELLO, HELLO_MAGIC, VERSION, recv_exact

HELLO_TOKEN = 0x1


@pytest.fixture
def token_target(start_target):
    return start_target(4 << 20, 9, "--require-tokens", "--io-timeout", "2")


def allow(target, token: bytes, ttl: float | None = None) -> None:
    target.command(f"allow {token.hex()}" + (f" {ttl}" if ttl else ""), "allowed")


def revoke(target, token: bytes) -> int:
    target.proc.stdin.write(f"revoke {token.hex()}\n")
    target.proc.stdin.flush()
    return int(target.readline())


def refused(engine, target, token: bytes | None) -> TransportUnavailableError:
    with pytest.raises(TransportUnavailableError, match="token refused") as ei:
        engine.connect(target.engine, transport="tcp", token=token)
    assert ei.value.errno == errno.EACCES
    return ei.value


@pytest.mark.timeout(60)
def test_without_an_allowed_token_the_hello_is_refused_with_eacces(engine, token_target):
    refused(engine, token_target, None)
    refused(engine, token_target, os.urandom(32))
    with dial_from(token_target) as s:
        s.sendall(HELLO.pack(HELLO_MAGIC, VERSION, HELLO_TOKEN, 0, 0, token_target.engine.engine_id)
                  + os.urandom(32))
        assert HELLO.unpack(recv_exact(s, HELLO.size))[3] == -errno.EACCES
    assert stats(token_target)["refused_token"] >= 3


@pytest.mark.timeout(60)
def test_an_allowed_token_reads_and_a_revoked_one_is_dropped(engine, token_target):
    token, other = os.urandom(32), os.urandom(32)
    allow(token_target, token)
    allow(token_target, other)
    peer = engine.connect(token_target.engine, transport="tcp", token=token)
    bystander = engine.connect(token_target.engine, transport="tcp", token=other)
    good_read(engine, peer, token_target, nbytes=1 << 20, remote_off=3)
    assert revoke(token_target, token) == 4  # the engine's four connections
    with pytest.raises(TransferError, match="token refused") as ei:
        good_read(engine, peer, token_target)
    assert ei.value.errno == errno.EACCES
    refused(engine, token_target, token)
    good_read(engine, bystander, token_target, nbytes=100_000)  # other tokens unaffected
    assert stats(token_target)["dropped_revoked"] == 4


@pytest.mark.timeout(60)
def test_a_token_expires_with_its_connections(engine, token_target):
    token = os.urandom(32)
    allow(token_target, token, ttl=1.0)
    peer = engine.connect(token_target.engine, transport="tcp", token=token)
    good_read(engine, peer, token_target)
    time.sleep(1.5)
    assert stats(token_target)["dropped_revoked"] == 4
    refused(engine, token_target, token)
    allow(token_target, token)  # allowed again: the same peer reads on
    good_read(engine, peer, token_target, nbytes=300_000)


@pytest.mark.timeout(60)
def test_tokens_are_ignored_until_required(engine, shared_target):
    peer = engine.connect(shared_target.engine, transport="tcp", token=os.urandom(32))
    good_read(engine, peer, shared_target)


def test_token_arguments_are_checked():
    with Engine(use_verbs=False) as eng:
        for bad in (b"short", "x" * 32, bytearray(32)):
            with pytest.raises(InvalidArgumentError, match="32 bytes"):
                eng.allow_token(bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="ttl_s"):
            eng.allow_token(bytes(32), ttl_s=0)
        with pytest.raises(InvalidArgumentError, match="32 bytes"):
            eng.connect(eng.descriptor, transport="tcp", token=b"1" * 31)
        assert eng.revoke_token(bytes(32)) == 0


@pytest.mark.timeout(120)
def test_verbs_setup_rides_on_the_token(engine, token_target):
    """Queue pairs are set up over the tcp server: no token, no verbs peer."""
    if not (engine.descriptor.verbs and token_target.engine.verbs):
        pytest.skip(f"no RDMA device here: {engine.verbs_unavailable or 'the target has none'}")
    with pytest.raises(TransportUnavailableError, match="token refused") as ei:
        engine.connect(token_target.engine, transport="verbs")
    assert ei.value.errno == errno.EACCES
    token = os.urandom(32)
    allow(token_target, token)
    peer = engine.connect(token_target.engine, transport="verbs", token=token)
    assert peer.transport == "verbs"
    good_read(engine, peer, token_target, nbytes=1 << 20, remote_off=5)
    assert revoke(token_target, token) == 1  # the bootstrap connection, queue pairs with it
    with pytest.raises(TransferError):
        for _ in range(50):  # the reader notices the bootstrap's end within a poll
            good_read(engine, peer, token_target)
            time.sleep(0.1)
