"""The control plane against hostile and greedy clients: a session cannot touch
another's requests, cannot hold more than its quota or longer than the maximum lease,
cannot grow the server's session table without bound or flood its log, and with CURVE
cannot read the KV pool without the data plane token of an authenticated handshake.
Real ZeroMQ sockets on random loopback ports; every receive is timed."""

from __future__ import annotations

import errno
import logging
import json
import shutil
import subprocess
import sys
import time

import msgspec
import pytest
import zmq
from prometheus_client import CollectorRegistry

from kvtransfer import Engine, TransportUnavailableError
from kvtransfer.control import (ControlError, CurveClientKeys, CurveServerKeys, LeaseExpiredError, Limits,
                                generate_keys, new_request_id)
from kvtransfer.control import messages as m
from kvtransfer.errors import InvalidArgumentError
from kvtransfer.kv import CompatInfo, KVLayout
from kvtransfer.control.security import exposed_listeners
from kvtransfer.testing.synthetic import check_request
from kvtransfer.testing.children import start_child, stop_child
from control_support import BASE, MODEL, PrefillLauncher, Raw, decode_side, payload, prefill_here, wait_until

WAIT = 20.0


def test_another_session_cannot_release_renew_or_subscribe_to_a_request():
    """Weakness 6: a stranger who knows a request id used to retire it with a Release
    (the owner then failed with LeaseExpiredError); now each of its messages is refused
    with not_owner naming the owner, and the owner's pull lands its bytes."""
    layout = KVLayout(**BASE)
    launcher = PrefillLauncher()  # its own process: the stranger and the owner are both remote to it
    prefill = launcher.start(layout)
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
        launcher.close()


def test_request_ids_made_by_the_library_are_not_guessable():
    ids = {new_request_id("cmpl") for _ in range(1000)}
    assert len(ids) == 1000
    for rid in ids:
        prefix, token = rid.split("-")
        assert prefix == "cmpl" and len(token) == 32 and int(token, 16) >= 0  # 128 random bits


def test_a_session_that_keeps_renewing_cannot_hold_the_pool(caplog):
    """Weakness 7: a reader that renews for ever used to hold its blocks for ever, and
    one session could pin the whole pool. Now its request ends at the maximum lease
    (LeaseExpiredError), a Submit over its block quota is refused at once, another
    session is served meanwhile, and both limits are counted in Prometheus."""
    layout = KVLayout(**BASE)
    registry = CollectorRegistry()
    limits = Limits(session_blocks=4, max_lease_s=1.5)
    with prefill_here(layout, lease=0.5, limits=limits, registry=registry) as prefill, decode_side(layout) as d, \
            d.client(prefill.server.endpoint, name="greedy") as greedy, \
            d.client(prefill.server.endpoint, name="fair") as fair:
        t0 = time.monotonic()
        hog = greedy.pull("hog", d.pool.alloc(4), payload=payload(60, 1, layer_delay=0.8))  # 3.2 s of compute
        hog.wait_layer(0, timeout=WAIT)  # 4 blocks pinned: the greedy session's whole quota
        with pytest.raises(ControlError) as e:
            greedy.pull("more", d.pool.alloc(1), payload=payload(1, 2)).wait(WAIT)
        assert e.value.code == "quota_exceeded" and "greedy" in str(e.value) and "quota is 4" in str(e.value)
        dst = d.pool.alloc(2)
        fair_pull = fair.pull("fair", dst, payload=payload(20, 3))
        with pytest.raises(LeaseExpiredError, match="maximum lease of 1.5 s"):
            hog.wait(WAIT)  # renewed every lease/3 all along
        held = time.monotonic() - t0
        assert 1.5 <= held < 1.5 + 2.0, held
        fair_pull.wait(WAIT)
        check_request(layout, d.buffers, dst, 20, 3)
        wait_until(lambda: prefill.stats()["used_blocks"] == 0, WAIT)
    sample = registry.get_sample_value
    assert sample("kvtransfer_control_limit_refusals_total", {"limit": "session_blocks"}) == 1
    assert sample("kvtransfer_control_limit_refusals_total", {"limit": "max_lease"}) == 1


def test_limits_are_checked(tmp_path):
    layout = KVLayout(**BASE)
    for bad in (Limits(session_blocks=0), Limits(session_requests=0), Limits(max_lease_s=0.1),
                Limits(session_waits=5, max_waits=2)):
        with pytest.raises(InvalidArgumentError):
            with prefill_here(layout, lease=1.0, limits=bad):
                pass


def test_silent_sessions_are_dropped_and_refusals_are_logged_at_a_bounded_rate(caplog):
    """Weakness 8: the session table grew with every Hello and was never pruned, and
    every refused message logged a line. Now sessions silent for session_idle_s are
    dropped (a live client's heartbeats keep its own), and a flood of refused messages
    is answered in full but logged at most 20 lines per 10 s."""
    layout = KVLayout(**BASE)
    n = 300
    hello = m.Hello(engine=b"", layout=layout, compat=CompatInfo.of(layout, MODEL), name="silent")
    with prefill_here(layout, limits=Limits(session_idle_s=2.0)) as prefill, decode_side(layout) as d, \
            d.client(prefill.server.endpoint, name="alive") as alive:
        ctx = zmq.Context()
        try:
            raws = [Raw(prefill.server.endpoint, ctx) for _ in range(n)]
            try:
                hello = msgspec.structs.replace(hello, engine=d.engine.descriptor.to_bytes())
                for r in raws:  # all at once, then the answers: well within session_idle_s
                    r.send_msg(hello)
                for r in raws:
                    assert isinstance(r.recv(), m.Welcome)
            finally:
                for r in raws:
                    r.close()
            assert prefill.stats()["sessions"] == n + 1
            wait_until(lambda: prefill.stats()["sessions"] == 1, 2.0 + 5.0)
            errors_before = prefill.stats()["errors"]
            flood = Raw(prefill.server.endpoint, ctx)
            try:
                with caplog.at_level(logging.WARNING, logger="kvtransfer.control"):
                    for i in range(1000):
                        flood.send(m.PROTOCOL, b"\xc1 not msgpack")
                        assert flood.recv().code == "malformed"
            finally:
                flood.close()
        finally:
            ctx.term()
        assert prefill.stats()["errors"] - errors_before == 1000
        logged = [r for r in caplog.records if "refused a message" in r.getMessage()]
        assert 1 <= len(logged) <= 20, len(logged)
        assert alive.ping() < 1.0  # its heartbeats kept it


def test_with_curve_the_pool_is_read_only_with_an_authenticated_sessions_token(tmp_path):
    """Weakness 9: region descriptors were all a reader needed to read the pool over
    tcp. With CURVE, the prefill engine's tcp server now admits only the token that an
    authenticated session got in its Welcome: a client that has the descriptors (leaked,
    or sniffed off the wire) but no token, or a made-up token, is refused with EACCES,
    and a dropped session's token stops working."""
    server_public, server_secret = generate_keys(tmp_path / "keys", "server")
    client_public, client_secret = generate_keys(tmp_path / "keys", "client")
    (tmp_path / "clients").mkdir()
    shutil.copy(client_public, tmp_path / "clients")
    curve = CurveServerKeys(server_secret, tmp_path / "clients")
    layout = KVLayout(**BASE)
    with prefill_here(layout, curve=curve, limits=Limits(session_idle_s=0.5)) as prefill, \
            decode_side(layout) as d, Engine() as stranger:
        c = d.client(prefill.server.endpoint, transport="tcp", curve=CurveClientKeys(client_secret, server_public))
        try:
            dst = d.pool.alloc(3)
            c.pull("over-tcp", dst, payload=payload(40, 6)).wait(WAIT)
            check_request(layout, d.buffers, dst, 40, 6)  # the authenticated client reads over tcp
            engine_desc, region = prefill.engine.descriptor, c.remote_regions[0]
            token = c.token
            assert token is not None and len(token) == 32
        finally:
            c.close()
        for bad in (None, bytes(32), token[:-1] + bytes([token[-1] ^ 1])):
            with pytest.raises(TransportUnavailableError) as e:
                stranger.connect(engine_desc, transport="tcp", token=bad)
            assert e.value.errno == errno.EACCES, e.value
        wait_until(lambda: prefill.stats()["sessions"] == 0, 5.0)  # the client's session went silent
        with pytest.raises(TransportUnavailableError) as e:
            stranger.connect(engine_desc, transport="tcp", token=token)
        assert e.value.errno == errno.EACCES and region.nbytes > 0


def test_doctor_names_ports_beyond_loopback_without_curve(tmp_path):
    """Without CURVE anyone who reaches the ports can read registered memory: doctor
    lists a kvtransfer process listening beyond loopback and warns unless it has keys.
    The processes bind 0.0.0.0 inside network namespaces of their own (only a down
    loopback there): nothing is reachable from outside."""
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True, timeout=10)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a network namespace here: {probe.stderr.strip()}")
    server_public, server_secret = generate_keys(tmp_path, "server")
    layout = KVLayout(**BASE)
    base = ["unshare", "-n", sys.executable, "-m", "kvtransfer.testing.synthetic", "--model", MODEL, "--endpoint",
            "tcp://0.0.0.0:0", "--listen-host", "0.0.0.0", "--layout",
            json.dumps({f: getattr(layout, f) for f in layout.__struct_fields__})]
    children = []
    try:
        for extra in ([], ["--curve-secret", str(server_secret), "--curve-clients", str(tmp_path)]):
            children.append(start_child(base + extra, timeout=60, what="synthetic prefill in a netns")[0])
        bare, keyed = (c.pid for c in children)
        rows = exposed_listeners()
        for pid, curve in ((bare, False), (keyed, True)):
            mine = [r for r in rows if r["pid"] == pid]
            assert len(mine) == 2, rows  # the control port and the engine's tcp port
            assert {(r["address"], r["curve"]) for r in mine} == {("0.0.0.0", curve)}
        out = subprocess.run([sys.executable, "-m", "kvtransfer", "doctor"], capture_output=True, text=True,
                             timeout=120).stdout
        assert out.count(f"pid {bare} ") == 2 and out.count(f"pid {keyed} ") == 2, out
        assert out.count("WITHOUT CurveZMQ") >= 2 and out.count("with CurveZMQ keys") >= 2
    finally:
        for c in children:
            stop_child(c, timeout=10)

