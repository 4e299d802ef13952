"""The control plane between real processes: a synthetic prefill worker (its own
process, engine and KV pool, filled layer by layer with a known pattern) and a decode
side in this process pulling into its own pool. Every test checks the bytes that landed
and that every prefill block is back in the pool at the end."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import numpy as np
import pytest

from kvtransfer.control import ControlError, LeaseExpiredError, PeerLostError, pull_sharded
from kvtransfer.errors import InvalidArgumentError, KVTransferError, TransferError
from kvtransfer.kv import KVLayout
from kvtransfer.testing.synthetic import check_request
from kvtransfer.testing.children import start_child, stop_child
from control_support import BASE, MODEL, PrefillLauncher, decode_side, payload
from support import ROOT, TRANSPORTS

WAIT = 20.0


@pytest.fixture
def start_prefill():
    launcher = PrefillLauncher()
    yield launcher.start
    launcher.close()


@pytest.fixture(scope="module")
def shared_prefill():
    launcher = PrefillLauncher()
    yield launcher.start(KVLayout(**BASE))
    launcher.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("num_tokens", [0, 1, 15, 16, 17, 300])
def test_pull_lands_the_requests_kv(shared_prefill, transport, num_tokens):
    """Full, partial, single-block and 0-block requests into scattered local blocks."""
    layout = KVLayout(**BASE)
    with decode_side(layout) as d, d.client(shared_prefill, transport=transport) as c:
        assert c.transport == transport
        dst = d.scattered_blocks(layout.blocks_for(num_tokens), np.random.default_rng(num_tokens))
        seed = 1000 + num_tokens
        pull = c.pull(f"full-{transport}-{num_tokens}", dst, payload=payload(num_tokens, seed))
        result = json.loads(pull.wait(WAIT))
        assert result["num_tokens"] == num_tokens
        check_request(layout, d.buffers, dst, num_tokens, seed)
        t = pull.timings
        assert t.transport == transport and t.total_s is not None and t.released_s >= t.total_s
        assert t.bytes == layout.num_layers * layout.blocks_for(num_tokens) * layout.block_bytes
    shared_prefill.wait_pool_idle(WAIT)


def test_many_requests_at_once(shared_prefill):
    layout = KVLayout(**BASE)
    rng = np.random.default_rng(5)
    with decode_side(layout) as d, d.client(shared_prefill) as c:
        jobs = []
        for i in range(12):
            n = int(rng.integers(1, 80))
            dst = d.pool.alloc(layout.blocks_for(n))
            jobs.append((c.pull(f"many-{i}", dst, payload=payload(n, i)), dst, n, i))
        for pull, dst, n, seed in jobs:
            pull.wait(WAIT)
            check_request(layout, d.buffers, dst, n, seed)
    shared_prefill.wait_pool_idle(WAIT)


def test_layers_stream_while_prefill_computes(start_prefill):
    """Layer 0 is in place (and checked) while the prefill side still computes the last."""
    layout = KVLayout(**BASE)
    prefill = start_prefill(layout)
    with decode_side(layout) as d, d.client(prefill) as c:
        dst = d.pool.alloc(4)
        pull = c.pull("stream", dst, payload=payload(60, 3, layer_delay=0.4))
        pull.wait_layer(0, timeout=WAIT)
        assert not pull.done() and layout.num_layers - 1 not in pull._layers_done
        check_request(layout, d.buffers, dst, 60, 3, layers=[0])
        pull.wait(WAIT)
        check_request(layout, d.buffers, dst, 60, 3)
        layers = [pull.timings.layers_s[i] for i in range(layout.num_layers)]
        assert layers == sorted(layers) and layers[-1] - layers[0] > 0.8  # three layer delays apart
    prefill.wait_pool_idle(WAIT)


def test_block_sizes_are_mapped(shared_prefill):
    """Prefill with 16-token blocks, decode with 32-token blocks."""
    layout = KVLayout(**{**BASE, "block_size": 32, "num_blocks": 40})
    with decode_side(layout) as d, d.client(shared_prefill) as c:
        dst = d.scattered_blocks(layout.blocks_for(100), np.random.default_rng(1))
        c.pull("bs32", dst, payload=payload(100, 77)).wait(WAIT)
        check_request(layout, d.buffers, dst, 100, 77)
    shared_prefill.wait_pool_idle(WAIT)


def test_two_prefill_ranks_into_one_decode_rank(start_prefill):
    ranks = [start_prefill(KVLayout.for_tp(tp_size=2, tp_rank=r, total_kv_heads=4,
                                           **{k: v for k, v in BASE.items() if k != "num_kv_heads"}))
             for r in range(2)]
    layout = KVLayout(**BASE)
    with decode_side(layout) as d:
        clients = [d.client(p) for p in ranks]
        try:
            dst = d.scattered_blocks(layout.blocks_for(50), np.random.default_rng(2))
            pulls = pull_sharded(clients, "tp2to1", dst, payload=payload(50, 9))
            assert [p.heads for p in pulls] == [(0, 2), (2, 4)]
            for p in pulls:
                p.wait(WAIT)
            check_request(layout, d.buffers, dst, 50, 9)
        finally:
            for c in clients:
                c.close()
    for p in ranks:
        p.wait_pool_idle(WAIT)


def test_one_prefill_rank_into_two_decode_ranks(start_prefill):
    prefill = start_prefill(KVLayout(**BASE))
    fields = {k: v for k, v in BASE.items() if k != "num_kv_heads"}
    layouts = [KVLayout.for_tp(tp_size=2, tp_rank=r, total_kv_heads=4, **fields) for r in range(2)]
    with decode_side(layouts[0]) as d0, decode_side(layouts[1]) as d1, d0.client(prefill) as c0, \
            d1.client(prefill) as c1:
        dst0, dst1 = d0.pool.alloc(3), d1.pool.alloc(3)
        p0 = c0.pull("tp1to2", dst0, payload=payload(40, 11), readers=2)
        p0.wait(WAIT)
        assert prefill.stats()["used_blocks"] == 3  # still pinned for the second reader
        c1.pull("tp1to2", dst1).wait(WAIT)  # subscribes: everything is replayed
        check_request(layouts[0], d0.buffers, dst0, 40, 11)
        check_request(layouts[1], d1.buffers, dst1, 40, 11)
    prefill.wait_pool_idle(WAIT)


def test_late_subscriber_gets_everything_published_before(shared_prefill):
    layout = KVLayout(**BASE)
    shared_prefill.command("open late-1 33 21")
    time.sleep(0.3)  # the prefill side publishes every layer (and finishes) before anyone subscribes
    with decode_side(layout) as d, d.client(shared_prefill) as c, d.client(shared_prefill) as c2:
        dst = d.pool.alloc(3)
        pull = c.pull("late-1", dst)
        assert json.loads(pull.wait(WAIT))["num_tokens"] == 33
        check_request(layout, d.buffers, dst, 33, 21)
        # opened for one reader: a second one is refused (its blocks could be freed under it)
        shared_prefill.command("open late-2 20 22 0.3")
        first = c.pull("late-2", d.pool.alloc(2))
        first.wait_layer(0, timeout=WAIT)  # its Subscribe was taken first
        with pytest.raises(ControlError) as e:
            c2.pull("late-2", d.pool.alloc(2)).wait(WAIT)
        assert e.value.code == "not_owner" and "reader slot" in str(e.value)
        first.wait(WAIT)
    shared_prefill.wait_pool_idle(WAIT)


@pytest.mark.parametrize("change, fields", [
    ({"head_dim": 64}, {"head_dim"}),
    ({"dtype": "float16", "num_kv_heads": 8}, {"dtype", "total_kv_heads"}),
    ({"kind": "heads_major"}, {"kind"}),
    ({"num_layers": 3}, {"num_layers"}),
])
def test_mismatched_layouts_are_refused_naming_the_fields(shared_prefill, change, fields):
    with decode_side(KVLayout(**{**BASE, **change})) as d:
        with pytest.raises(ControlError) as e:
            d.client(shared_prefill)
    assert e.value.code == "incompatible"
    assert {f[0] for f in e.value.fields} == fields
    for name in fields:
        assert name in str(e.value)


def test_another_model_is_refused(shared_prefill):
    with decode_side(KVLayout(**BASE)) as d, pytest.raises(ControlError) as e:
        d.client(shared_prefill, model="another-model")
    assert e.value.code == "incompatible" and [f[0] for f in e.value.fields] == ["model"]


def test_refusals_of_requests(shared_prefill):
    layout = KVLayout(**BASE)
    with decode_side(layout) as d, d.client(shared_prefill) as c:
        with pytest.raises(InvalidArgumentError, match="outside the pool"):
            c.pull("bad-blocks", [layout.num_blocks], payload=payload(1, 1))
        p = c.pull("too-few", [0], payload=payload(40, 1))
        with pytest.raises(InvalidArgumentError, match="need 3 local blocks"):
            p.wait(WAIT)
        with pytest.raises(ControlError) as e:
            c.pull("nobody-has-this", [0]).wait(WAIT)
        assert e.value.code == "unknown_request"
        with pytest.raises(ControlError) as e:
            c.pull("bad-payload", [0], payload=b"not json").wait(WAIT)
        assert e.value.code == "rejected"
        first = c.pull("dup", [1, 2], payload=payload(20, 2, layer_delay=0.2))
        with pytest.raises(InvalidArgumentError, match="already running"):
            c.pull("dup", [3, 4], payload=payload(20, 2))
        first.wait(WAIT)
        with pytest.raises(ControlError) as e:
            c.pull("dup", [3, 4], payload=payload(20, 2)).wait(WAIT)
        assert e.value.code == "duplicate_request"
        assert c.ping() < 1.0
    shared_prefill.wait_pool_idle(WAIT)


def test_prefill_failure_reaches_the_reader(shared_prefill):
    layout = KVLayout(**BASE)
    with decode_side(layout) as d, d.client(shared_prefill) as c:
        with pytest.raises(ControlError) as e:
            c.pull("fails", d.pool.alloc(2), payload=payload(30, 1, fail_after=2)).wait(WAIT)
        assert e.value.code == "prefill_failed" and "after 2 layers" in str(e.value)
    shared_prefill.wait_pool_idle(WAIT)


def test_decode_killed_before_release_blocks_return_within_the_lease(start_prefill):
    prefill = start_prefill(KVLayout(**BASE), lease=1.0)
    child, hello = start_child([sys.executable, str(ROOT / "tests" / "decode_child.py"), prefill.endpoint,
                                json.dumps(BASE), MODEL], 60, "decode child")
    try:
        assert hello["event"] == "pulling" and hello["pid"] == child.pid  # it holds a lease and is reading
        assert prefill.stats()["used_blocks"] > 0
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=WAIT)
        t0 = time.monotonic()
        stats = prefill.wait_pool_idle(WAIT)
        assert time.monotonic() - t0 < 1.0 + 2.0  # the lease, plus scheduling slack
        assert stats["leases_expired"] >= 1
    finally:
        stop_child(child, WAIT, sig=signal.SIGKILL)


def test_prefill_killed_fails_the_pull_within_its_timeout(start_prefill):
    layout = KVLayout(**BASE)
    prefill = start_prefill(layout)
    with decode_side(layout) as d, d.client(prefill, timeout=1.0) as c:
        pull = c.pull("orphan", d.pool.alloc(4), payload=payload(60, 5, layer_delay=1.0))
        pull.wait_layer(0, timeout=WAIT)
        prefill.kill()
        t0 = time.monotonic()
        with pytest.raises(KVTransferError) as e:
            pull.wait(timeout=WAIT)
        assert isinstance(e.value, (PeerLostError, TransferError))
        assert time.monotonic() - t0 < 1.0 + 2.0
        with pytest.raises(PeerLostError):
            c.pull("after", [0], payload=payload(1, 1))


def test_expired_lease_fails_the_read_instead_of_trusting_it(start_prefill):
    """A reader that stops renewing (here: renewals switched off) while the prefill
    side is slow: the lease expires and the pull fails with LeaseExpiredError."""
    layout = KVLayout(**BASE)
    prefill = start_prefill(layout, lease=0.5)
    with decode_side(layout) as d, d.client(prefill) as c:
        c.lease_s = 1e9  # never renew
        with pytest.raises(LeaseExpiredError):
            c.pull("stalled", d.pool.alloc(4), payload=payload(60, 5, layer_delay=0.4)).wait(WAIT)
    assert prefill.wait_pool_idle(WAIT)["leases_expired"] == 1


def test_metrics_and_timings(shared_prefill):
    from prometheus_client import CollectorRegistry
    registry = CollectorRegistry()
    layout = KVLayout(**BASE)
    with decode_side(layout) as d, d.client(shared_prefill, registry=registry) as c:
        dst = d.pool.alloc(2)
        pull = c.pull("metrics", dst, payload=payload(20, 1))
        pull.wait(WAIT)
        check_request(layout, d.buffers, dst, 20, 1)
        t = pull.timings.as_dict()
    assert t["handshake_s"] > 0 and 0 < t["pinned_s"] <= t["first_manifest_s"] <= t["first_byte_s"] <= t["total_s"]
    assert len(t["layers_s"]) == layout.num_layers and t["bytes"] > 0 and t["gb_per_s"] > 0
    sample = registry.get_sample_value
    assert sample("kvtransfer_pull_bytes_total", {"transport": c.transport}) == t["bytes"]
    assert sample("kvtransfer_pulls_total", {"transport": c.transport, "outcome": "ok"}) == 1
    assert sample("kvtransfer_pull_seconds_count", {"transport": c.transport}) == 1
    assert sample("kvtransfer_handshake_seconds_count") == 1
    shared_prefill.wait_pool_idle(WAIT)
