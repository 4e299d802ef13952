"""Transport choice (Engine.connect): automatic, forced by argument or by
KVTRANSFER_TRANSPORT, and forced transports that cannot run are errors, not fallbacks."""

from __future__ import annotations

import os

import msgspec
import pytest

import kvtransfer
from kvtransfer import InvalidArgumentError, TransportUnavailableError
from support import good_read


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("KVTRANSFER_TRANSPORT", raising=False)
    return monkeypatch


@pytest.mark.timeout(30)
def test_automatic_choice_on_one_host_is_map(engine, shared_target, no_env):
    """The target holds its bytes in shared memory: map is preferred to shm."""
    assert engine.descriptor.boot_id == shared_target.engine.boot_id  # the premise: same host
    peer = engine.connect(shared_target.engine)
    assert peer.transport == "map"
    good_read(engine, peer, shared_target)


@pytest.mark.timeout(30)
def test_automatic_choice_without_shared_memory_is_shm(engine, engine_factory, no_env):
    """A same-host peer with no region in shared memory: map does not reach it, shm does."""
    target = engine_factory()
    src = kvtransfer.alloc_host(1 << 20)
    _region, _ = target.register(src)  # registered while the handle lives
    (reach,) = [r for r in engine.plan(target.descriptor) if r.name == "map"]
    assert not reach.ok and "no region in shared memory" in reach.why
    assert engine.connect(target.descriptor).transport == "shm"


@pytest.mark.timeout(30)
def test_connect_accepts_descriptor_bytes(engine, shared_target, no_env):
    peer = engine.connect(shared_target.engine.to_bytes())
    assert peer.transport == "map"
    good_read(engine, peer, shared_target)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["tcp", "shm", "map"])
def test_environment_variable_forces_the_transport(engine, shared_target, no_env, name):
    no_env.setenv("KVTRANSFER_TRANSPORT", name)
    peer = engine.connect(shared_target.engine)
    assert peer.transport == name
    good_read(engine, peer, shared_target)


@pytest.mark.timeout(30)
def test_argument_overrides_the_environment_variable(engine, shared_target, no_env):
    no_env.setenv("KVTRANSFER_TRANSPORT", "tcp")
    peer = engine.connect(shared_target.engine, transport="shm")
    assert peer.transport == "shm"
    good_read(engine, peer, shared_target)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["argument", "environment"])
@pytest.mark.parametrize("name", ["verbs_typo", "rdma", "shm,tcp", "ipc"])
def test_unknown_forced_transport_is_invalid(engine, shared_target, no_env, how, name):
    if how == "argument":
        with pytest.raises(InvalidArgumentError, match="transport"):
            engine.connect(shared_target.engine, transport=name)
    else:
        no_env.setenv("KVTRANSFER_TRANSPORT", name)
        with pytest.raises(InvalidArgumentError, match="transport"):
            engine.connect(shared_target.engine)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("field", ["boot_id", "pidns"])
def test_forced_shm_to_another_host_is_unavailable(engine, shared_target, no_env, field):
    value = "00000000-0000-0000-0000-000000000000" if field == "boot_id" else shared_target.engine.pidns + 1
    elsewhere = msgspec.structs.replace(shared_target.engine, **{field: value})
    with pytest.raises(TransportUnavailableError):
        engine.connect(elsewhere, transport="shm")
    no_env.setenv("KVTRANSFER_TRANSPORT", "shm")
    with pytest.raises(TransportUnavailableError):
        engine.connect(elsewhere)


@pytest.mark.timeout(30)
def test_automatic_choice_for_another_host_is_tcp(engine, shared_target, no_env):
    """Another boot id means another machine: shm is not tried, tcp is chosen (the
    address still reaches our target, so the read works)."""
    elsewhere = msgspec.structs.replace(shared_target.engine, boot_id="11111111-2222-3333-4444-555555555555")
    peer = engine.connect(elsewhere)
    assert peer.transport == "tcp"
    good_read(engine, peer, shared_target)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("transport_name", ["map", "shm", "tcp"])
def test_forced_transport_to_a_wrong_engine_id_is_unavailable(engine, shared_target, no_env, transport_name):
    """The descriptor's address is right but its engine id is not: both transports
    check whom they reached."""
    impostor = msgspec.structs.replace(shared_target.engine, engine_id=os.urandom(16))
    with pytest.raises(TransportUnavailableError):
        engine.connect(impostor, transport=transport_name)


@pytest.mark.timeout(30)
def test_forced_tcp_to_a_closed_port_is_unavailable(engine, shared_target, no_env):
    import socket
    with socket.socket() as s:  # a port that surely has no listener: bound, not listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        nowhere = msgspec.structs.replace(shared_target.engine, tcp_port=port)
        with pytest.raises(TransportUnavailableError):
            engine.connect(nowhere, transport="tcp")


@pytest.mark.timeout(30)
def test_automatic_choice_falls_back_to_tcp_when_shm_cannot_reach(engine, shared_target, no_env):
    """Same host, but the target's region table cannot be opened (a wrong fd number):
    map does not reach it, shm fails to connect, and the automatic choice moves on to
    tcp and says so through peer.transport and peer.tried."""
    broken = msgspec.structs.replace(shared_target.engine, table_fd=987654)
    with pytest.raises(TransportUnavailableError):
        engine.connect(broken, transport="shm")
    peer = engine.connect(broken)
    assert peer.transport == "tcp"
    assert [t.name for t in peer.tried] == ["shm"] and "/fd/987654" in peer.tried[0].why
    good_read(engine, peer, shared_target)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bad", [b"not a descriptor", 42, None], ids=["bytes", "int", "none"])
def test_connect_to_something_else_is_invalid(engine, no_env, bad):
    with pytest.raises(InvalidArgumentError):
        engine.connect(bad)
