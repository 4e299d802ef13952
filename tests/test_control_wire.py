"""The control plane's wire, spoken raw: malformed, oversized, out-of-order and
unauthenticated messages get an error reply (or no session), and the prefill worker
keeps serving. Property-based over the schema with hypothesis."""

from __future__ import annotations

import json
import logging
import shutil
import time

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtransfer import Engine
from kvtransfer.control import ControlError, CurveClientKeys, PeerLostError, generate_keys
from kvtransfer.control import messages as m
from kvtransfer.control.security import is_loopback_endpoint, warn_if_exposed
from kvtransfer.kv import CompatInfo, KVLayout
from kvtransfer.testing.synthetic import check_request
from control_support import BASE, MODEL, PrefillLauncher, Raw, decode_side, payload

@pytest.fixture(scope="module")
def prefill():
    launcher = PrefillLauncher()
    yield launcher.start(KVLayout(**BASE), lease=0.5)
    launcher.close()


@pytest.fixture
def raw(prefill):
    r = Raw(prefill.endpoint)
    yield r
    r.close()


def expect_error(raw: Raw, code: str) -> m.Error:
    reply = raw.recv()
    assert isinstance(reply, m.Error) and reply.code == code, reply
    return reply


@pytest.mark.parametrize("frames, code", [
    ([b"\xc1garbage"], "malformed"),
    ([m.PROTOCOL], "malformed"),
    ([m.PROTOCOL, b"\x81", b"extra"], "malformed"),
    ([m.PROTOCOL, b"\xc1"], "malformed"),
    ([m.PROTOCOL, msgspec.msgpack.encode({"type": "nonsense"})], "malformed"),
    ([m.PROTOCOL, msgspec.msgpack.encode({"type": "ping", "nonce": -1})], "malformed"),
    ([m.PROTOCOL, msgspec.msgpack.encode({"type": "ping", "extra_field": 1})], "malformed"),
    ([m.PROTOCOL, msgspec.msgpack.encode({"type": "submit", "request_id": ""})], "malformed"),
    ([m.PROTOCOL, msgspec.msgpack.encode({"type": "submit", "request_id": "x" * 300})], "malformed"),
    ([m.PROTOCOL, m.encode(m.Pong(nonce=1))[1]], "malformed"),  # a message of the other direction
    ([b"kvtransfer-control/2", m.encode(m.Ping())[1]], "unsupported_version"),
    ([m.PROTOCOL, b"\0" * (m.MAX_MESSAGE_BYTES + 1)], "too_large"),
])
def test_malformed_messages_get_an_error_reply(raw, frames, code):
    raw.send(*frames)
    expect_error(raw, code)
    raw.alive()


def test_out_of_order_messages_get_an_error_reply(raw, prefill):
    raw.send_msg(m.Submit(request_id="early", payload=payload(1, 1)))
    assert expect_error(raw, "no_handshake").request_id == "early"
    layout = KVLayout(**BASE)
    with Engine() as eng:
        raw.hello(eng, layout)
    raw.send_msg(m.Release(request_id="never-submitted"))
    expect_error(raw, "unknown_request")
    raw.send_msg(m.Subscribe(request_id="never-submitted"))
    expect_error(raw, "unknown_request")
    raw.send_msg(m.Renew(request_ids=["never-submitted"]))
    assert raw.recv() == m.Renewed(lease_s=0.5, lost=["never-submitted"])
    raw.send_msg(m.Hello(engine=b"\x00" * 10, layout=layout, compat=CompatInfo.of(layout, MODEL)))
    expect_error(raw, "malformed")
    raw.alive()


def test_release_after_the_lease_expired_is_answered_invalid(raw, prefill):
    """The reader is told its read may have overlapped reuse: valid=False."""
    with Engine() as eng:
        raw.hello(eng, KVLayout(**BASE))
    raw.send_msg(m.Submit(request_id="expires", payload=payload(20, 1)))
    pinned = raw.recv()
    assert isinstance(pinned, m.Pinned) and len(pinned.blocks) == 2
    time.sleep(1.0)  # twice the lease, no renewal
    while not isinstance(msg := raw.recv(), m.Failed):
        pass  # manifests and Finished came first
    assert msg.code == "lease_expired"
    raw.send_msg(m.Release(request_id="expires"))
    released = raw.recv()
    assert isinstance(released, m.Released) and released.valid is False and "expired" in released.message
    assert prefill.wait_pool_idle(10)["leases_expired"] >= 1


def test_a_frame_over_the_hard_limit_drops_only_that_connection(prefill):
    bad = Raw(prefill.endpoint)
    try:
        bad.send(m.PROTOCOL, b"\0" * (m.HARD_MAX_BYTES + 1))
        assert not bad.sock.poll(500)  # ZeroMQ dropped the connection: no reply
    finally:
        bad.close()
    good = Raw(prefill.endpoint)
    try:
        good.alive()
    finally:
        good.close()


# Any msgpack value under one of the known tags: most are malformed, a few valid.
_values = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=20)
                       | st.binary(max_size=40),
                       lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner,
                                                                                   max_size=5),
                       max_leaves=20)
_fields = st.dictionaries(st.sampled_from(["request_id", "payload", "readers", "request_ids", "nonce", "engine",
                                           "layout", "compat", "name", "blocks", "layers", "token", "refused",
                                           "x"]), _values,
                          max_size=5)
_tags = st.sampled_from(["hello", "submit", "subscribe", "renew", "release", "ping", "stats_query", "manifest",
                         "welcome", "error", ""])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tag=_tags, fields=_fields, raw_bytes=st.binary(max_size=64), use_raw=st.booleans())
def test_any_message_is_answered_and_the_worker_goes_on(raw, tag, fields, raw_bytes, use_raw):
    body = raw_bytes if use_raw else msgspec.msgpack.encode({"type": tag, **fields})
    raw.send(m.PROTOCOL, body)
    reply = raw.recv()
    assert isinstance(reply, (m.Error, m.Pong, m.Stats, m.Renewed)), reply
    raw.alive()


def test_curve_admits_known_keys_only(tmp_path, caplog):
    keys = tmp_path / "keys"
    clients = tmp_path / "clients"
    clients.mkdir()
    server_public, server_secret = generate_keys(keys, "server")
    client_public, client_secret = generate_keys(keys, "client")
    _, intruder_secret = generate_keys(keys, "intruder")
    shutil.copy(client_public, clients)
    launcher = PrefillLauncher()
    layout = KVLayout(**BASE)
    try:
        prefill = launcher.start(layout, extra=("--curve-secret", str(server_secret),
                                                "--curve-clients", str(clients)))
        with decode_side(layout) as d:
            with d.client(prefill, curve=CurveClientKeys(client_secret, server_public)) as c:
                dst = d.pool.alloc(2)
                c.pull("curve-ok", dst, payload=payload(20, 4)).wait(20)
                check_request(layout, d.buffers, dst, 20, 4)
            for curve in (CurveClientKeys(intruder_secret, server_public), None):
                t0 = time.monotonic()
                with pytest.raises(PeerLostError, match="no answer"):
                    d.client(prefill, curve=curve, timeout=1.0)
                assert time.monotonic() - t0 < 5.0
        prefill.wait_pool_idle(10)
    finally:
        launcher.close()


def test_listening_beyond_loopback_without_keys_warns(caplog):
    assert is_loopback_endpoint("tcp://127.0.0.1:5555") and is_loopback_endpoint("ipc:///tmp/x")
    assert not is_loopback_endpoint("tcp://0.0.0.0:5555") and not is_loopback_endpoint("tcp://*:5555")
    with caplog.at_level(logging.WARNING, logger="kvtransfer.control"):
        warn_if_exposed("tcp://127.0.0.1:5555", None)
        assert not caplog.records
        warn_if_exposed("tcp://0.0.0.0:5555", None)
    assert "WITHOUT CurveZMQ" in caplog.text


@settings(max_examples=100, deadline=None)
@given(lost=st.lists(st.text(min_size=1, max_size=20), max_size=5),
       refused=st.lists(st.text(min_size=1, max_size=20), max_size=5), token=st.binary(max_size=80))
def test_answers_that_name_owners_and_tokens_round_trip_or_are_refused(lost, refused, token):
    """The decode side's decoder keeps Renewed.refused and Welcome.token within their
    bounds: what fits round-trips, a token over 64 bytes is malformed."""
    renewed = m.Renewed(lease_s=1.0, lost=lost, refused=refused)
    assert m.decode_to_decode(m.encode(renewed)) == renewed
    layout = KVLayout(**BASE)
    welcome = m.Welcome(engine=b"e", regions=[], layout=layout, compat=CompatInfo.of(layout, MODEL), lease_s=1.0,
                        token=token)
    if len(token) <= 64:
        assert m.decode_to_decode(m.encode(welcome)) == welcome
    else:
        with pytest.raises(ControlError) as e:
            m.decode_to_decode(m.encode(welcome))
        assert e.value.code == "malformed"
