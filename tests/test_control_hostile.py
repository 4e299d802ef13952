"""The control plane against hostile and greedy clients: a session cannot touch
another's requests, cannot hold more than its quota or longer than the maximum lease,
cannot grow the server's session table without bound or flood its log, and with CURVE
cannot read the KV pool without the data plane token of an authenticated handshake.
Real ZeroMQ sockets on random loopback ports; every receive is timed."""

from __future__ import annotations

import time

import pytest

from kvtransfer import Engine
from kvtransfer.control import ControlError, new_request_id
from kvtransfer.control import messages as m
from kvtransfer.kv import KVLayout
from kvtransfer.synthetic import check_request
from control_support import BASE, PrefillLauncher, Raw, decode_side, payload

WAIT = 20.0


@pytest.fixture
def start_prefill():
    launcher = PrefillLauncher()
    yield launcher.start
    launcher.close()


def test_another_session_cannot_release_renew_or_subscribe_to_a_request(start_prefill):
    """Weakness 6: a stranger who knows a request id used to retire it with a Release
    (the owner then failed with LeaseExpiredError); now each of its messages is refused
    with not_owner naming the owner, and the owner's pull lands its bytes."""
    layout = KVLayout(**BASE)
    prefill = start_prefill(layout)
    stranger = Raw(prefill.endpoint)
    try:
        with decode_side(layout) as d, d.client(prefill, name="owner") as c, Engine() as eng:
            stranger.hello(eng, layout)
            dst = d.pool.alloc(4)
            pull = c.pull("victim", dst, payload=payload(60, 8, layer_delay=0.3))
            pull.wait_layer(0, timeout=WAIT)  # submitted and pinned: the request is live
            stranger.send_msg(m.Release(request_id="victim"))
            err = stranger.recv()
            assert isinstance(err, m.Error) and err.code == "not_owner" and err.request_id == "victim", err
            assert "owner (" in err.message  # names the owning session
            stranger.send_msg(m.Renew(request_ids=["victim"]))
            assert stranger.recv() == m.Renewed(lease_s=5.0, lost=[], refused=["victim"])
            stranger.send_msg(m.Subscribe(request_id="victim"))
            err = stranger.recv()
            assert isinstance(err, m.Error) and err.code == "not_owner", err
            json_result = pull.wait(WAIT)
            assert json_result and pull.done()
            check_request(layout, d.buffers, dst, 60, 8)
            # after it was released, the stranger is still not told anything it may act on
            stranger.send_msg(m.Release(request_id="victim"))
            err = stranger.recv()
            assert isinstance(err, m.Error) and err.code == "not_owner", err
        prefill.wait_pool_idle(WAIT)
    finally:
        stranger.close()


def test_request_ids_made_by_the_library_are_not_guessable():
    ids = {new_request_id("cmpl") for _ in range(1000)}
    assert len(ids) == 1000
    for rid in ids:
        prefix, token = rid.split("-")
        assert prefix == "cmpl" and len(token) == 32 and int(token, 16) >= 0  # 128 random bits
