"""A Subscribe that waits for its request to open: it attaches when the prefill side
opens the id (the bytes land), is refused ``unknown_request`` once its wait passes, is
refused at once for a retired id, and waits are bounded per session and in all, end
with their session and with a Release. Real ZeroMQ sockets; the synthetic prefill runs
in its own process or, where its limits and metrics are needed, in this one."""

from __future__ import annotations

import json
import time

import pytest
from prometheus_client import CollectorRegistry

from kvtransfer import Engine
from kvtransfer.control import ControlError, Limits
from kvtransfer.control import messages as m
from kvtransfer.errors import InvalidArgumentError
from kvtransfer.kv import KVLayout
from kvtransfer.testing.synthetic import check_request
from control_support import BASE, PrefillLauncher, Raw, decode_side, payload, prefill_here, wait_until

WAIT = 20.0


@pytest.fixture(scope="module")
def prefill():
    launcher = PrefillLauncher()
    yield launcher.start(KVLayout(**BASE), lease=0.5)  # renewals (every lease/3) run while a Subscribe waits
    launcher.close()


def test_a_subscribe_that_comes_first_attaches_when_the_request_opens(prefill):
    layout = KVLayout(**BASE)
    registry = CollectorRegistry()
    with decode_side(layout) as d, d.client(prefill, registry=registry) as c:
        dst = d.pool.alloc(3)
        pull = c.pull("early", dst, wait_s=WAIT)
        wait_until(lambda: prefill.stats()["waiting"] == 1, WAIT)
        time.sleep(1.0)  # two leases: renewals of a waiting id must not fail the pull
        assert not pull.done() and pull.error is None
        prefill.command("open early 33 21")
        assert json.loads(pull.wait(WAIT))["num_tokens"] == 33
        check_request(layout, d.buffers, dst, 33, 21)
        t = pull.timings
        assert t.bytes == layout.num_layers * 3 * layout.block_bytes
    # the wait has its own histogram; the pull's time counts from the open
    assert 1.0 <= t.waited_s <= t.pinned_s <= t.total_s
    sample = registry.get_sample_value
    assert sample("kvtransfer_pull_wait_seconds_sum", {"transport": t.transport}) == pytest.approx(t.waited_s)
    assert sample("kvtransfer_pull_seconds_sum", {"transport": t.transport}) == pytest.approx(t.total_s - t.waited_s)
    assert prefill.wait_pool_idle(WAIT)["waiting"] == 0


def test_the_wait_ends_unknown_request_at_its_deadline_and_others_are_served(prefill):
    layout = KVLayout(**BASE)
    with decode_side(layout) as d, d.client(prefill) as c:
        t0 = time.monotonic()
        waiting = c.pull("never-opened", d.pool.alloc(1), wait_s=1.0)
        dst = d.pool.alloc(2)
        c.pull("served-meanwhile", dst, payload=payload(20, 4)).wait(WAIT)
        check_request(layout, d.buffers, dst, 20, 4)
        with pytest.raises(ControlError) as e:
            waiting.wait(WAIT)
        took = time.monotonic() - t0
        assert e.value.code == "unknown_request" and "not opened" in str(e.value)
        assert 1.0 <= took < 1.0 + 5.0, took  # after the deadline; slack for a loaded machine
    assert prefill.wait_pool_idle(WAIT)["waiting"] == 0


def test_a_retired_id_is_refused_at_once(prefill):
    layout = KVLayout(**BASE)
    with decode_side(layout) as d, d.client(prefill) as c:
        c.pull("retired", d.pool.alloc(2), payload=payload(20, 5)).wait(WAIT)  # read and released
        t0 = time.monotonic()
        with pytest.raises(ControlError) as e:
            c.pull("retired", d.pool.alloc(2), wait_s=30.0).wait(WAIT)
        assert e.value.code == "unknown_request" and "released" in str(e.value)
        assert time.monotonic() - t0 < 15.0  # refused, not left waiting 30 s
    assert prefill.wait_pool_idle(WAIT)["waiting"] == 0


def test_wait_s_is_checked_on_both_sides(prefill):
    layout = KVLayout(**BASE)
    with decode_side(layout) as d, d.client(prefill) as c:
        for bad in (-1.0, m.MAX_SUBSCRIBE_WAIT_S + 1, float("nan")):
            with pytest.raises(InvalidArgumentError, match="wait_s"):
                c.pull("bad-wait", [0], wait_s=bad)
        with pytest.raises(InvalidArgumentError, match="only when subscribing"):
            c.pull("bad-wait", [0], payload=payload(1, 1), wait_s=1.0)
    raw = Raw(prefill.endpoint)
    try:
        with Engine() as eng:
            raw.hello(eng, layout)
        for bad in (-1.0, m.MAX_SUBSCRIBE_WAIT_S + 1):
            raw.send_msg(m.Subscribe(request_id="bad-wait", wait_s=bad))
            reply = raw.recv()
            assert isinstance(reply, m.Error) and reply.code == "malformed" and "wait_s" in reply.message, reply
        raw.alive()
    finally:
        raw.close()
    # without a wait the message is what it was before wait_s existed
    assert m.encode(m.Subscribe(request_id="r"))[1] == m._encoder.encode({"type": "subscribe", "request_id": "r"})


def test_waits_are_bounded_and_attach_with_the_usual_checks():
    """Two waits per session, three in all: beyond them quota_exceeded, counted. When the
    id opens for one reader, the first waiter takes the slot and the second is refused
    not_owner, as an immediate Subscribe would be."""
    layout = KVLayout(**BASE)
    registry = CollectorRegistry()
    with prefill_here(layout, limits=Limits(session_waits=2, max_waits=3), registry=registry) as p, \
            Engine() as eng:
        a, b = Raw(p.server.endpoint), Raw(p.server.endpoint)
        try:
            a.hello(eng, layout)
            b.hello(eng, layout)
            for rid in ("x", "y"):
                a.send_msg(m.Subscribe(request_id=rid, wait_s=30.0))
            a.send_msg(m.Subscribe(request_id="z", wait_s=30.0))
            err = a.recv()
            assert err.code == "quota_exceeded" and err.request_id == "z" and "2 Subscribes waiting" in err.message
            b.send_msg(m.Subscribe(request_id="x", wait_s=30.0))
            b.send_msg(m.Subscribe(request_id="w", wait_s=30.0))
            err = b.recv()
            assert err.code == "quota_exceeded" and err.request_id == "w" and "3 Subscribes" in err.message
            sample = registry.get_sample_value
            assert sample("kvtransfer_control_limit_refusals_total", {"limit": "session_waits"}) == 1
            assert sample("kvtransfer_control_limit_refusals_total", {"limit": "max_waits"}) == 1
            assert p.stats()["waiting"] == 3 and sample("kvtransfer_control_waiting_subscribes") == 3
            p.open("x", 20, 6)
            pinned = a.recv()
            assert isinstance(pinned, m.Pinned) and pinned.request_id == "x" and len(pinned.blocks) == 2
            err = b.recv()
            assert err.code == "not_owner" and err.request_id == "x" and "reader slot" in err.message
            assert p.stats()["waiting"] == 1  # a's wait for y
            while not isinstance(msg := a.recv(), m.Finished):
                assert isinstance(msg, m.Manifest)
            a.send_msg(m.Release(request_id="x"))
            assert a.recv() == m.Released(request_id="x", valid=True)
        finally:
            a.close()
            b.close()
        wait_until(lambda: p.stats()["used_blocks"] == 0, WAIT)


def test_waits_end_with_their_session_and_with_a_release():
    layout = KVLayout(**BASE)
    registry = CollectorRegistry()
    with prefill_here(layout, limits=Limits(session_idle_s=0.5), registry=registry) as p, \
            decode_side(layout) as d:
        with d.client(p.server.endpoint) as c:
            pull = c.pull("given-up", d.pool.alloc(2), wait_s=30.0)
            wait_until(lambda: p.stats()["waiting"] == 1, WAIT)
            pull.cancel()
            with pytest.raises(ControlError) as e:
                pull.wait(WAIT)
            assert e.value.code == "cancelled" and p.stats()["waiting"] == 0
            p.open("given-up", 20, 7)  # no reader slot is taken by the one that gave up
            dst = d.pool.alloc(2)
            c.pull("given-up", dst).wait(WAIT)
            check_request(layout, d.buffers, dst, 20, 7)
        silent = Raw(p.server.endpoint)
        try:
            with Engine() as eng:
                silent.hello(eng, layout)
            silent.send_msg(m.Subscribe(request_id="pruned", wait_s=30.0))
            wait_until(lambda: p.stats()["waiting"] == 1, WAIT)
            wait_until(lambda: p.stats()["sessions"] == 0, WAIT)  # silent for session_idle_s: dropped
            assert p.stats()["waiting"] == 0 and registry.get_sample_value("kvtransfer_control_waiting_subscribes") == 0
        finally:
            silent.close()
        wait_until(lambda: p.stats()["used_blocks"] == 0, WAIT)


def test_a_waiting_subscribe_is_told_when_the_server_shuts_down():
    layout = KVLayout(**BASE)
    with decode_side(layout) as d:
        with prefill_here(layout) as p:
            c = d.client(p.server.endpoint)
            pull = c.pull("never", d.pool.alloc(1), wait_s=30.0)
            wait_until(lambda: p.stats()["waiting"] == 1, WAIT)
        try:
            with pytest.raises(ControlError) as e:
                pull.wait(WAIT)
            assert e.value.code == "shutting_down"
        finally:
            c.close()
