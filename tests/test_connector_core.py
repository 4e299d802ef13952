"""The connector core between two processes: KVCacheSources over seeded KV caches shaped
as vLLM shapes them (CPU LBHNC, GPU LBNHC, the older per-layer flash) in a child, a
KVCacheSink here pulling pages into other block ids; every page checked byte for byte."""

from __future__ import annotations

import json
import logging
import socket
import time

import pytest
import torch

from connector_support import JsonChild, block, make_caches, wait_for
from kvtransfer.connector.core import KVCacheSink, describe_kv_caches
from kvtransfer.errors import ControlError, LayoutMismatchError

MODEL = "tiny-test-model"
SHAPE = dict(num_layers=3, heads=2, block_size=16, head_dim=32)
WAIT_S = 30.0
SEED = 7
SOURCE_BLOCKS = 24
# name -> the source's caches: three readable layouts, a short lease, and mismatches
SOURCES = {
    "LBHNC": {"layout": "LBHNC"}, "LBNHC": {"layout": "LBNHC"}, "flash": {"layout": "flash"},
    "short-lease": {"layout": "LBHNC", "lease_s": 1.0},
    "model": {"layout": "LBHNC", "model": "another-model"}, "block_size": {"layout": "LBHNC", "block_size": 32},
    "kind": {"layout": "LBNHC"}, "head_dim": {"layout": "LBHNC", "head_dim": 64},
}


@pytest.fixture(scope="module")
def sources():
    cfg = {name: {"seed": SEED, "num_blocks": SOURCE_BLOCKS, "model": MODEL, **SHAPE, **c} for name, c in SOURCES.items()}
    child = JsonChild(["tests/kv_source_child.py", json.dumps(cfg)], what="kv sources", ready_timeout=120)
    yield child
    child.stop()


def assert_pages(got, want, pairs, layout: str = "LBHNC") -> None:
    """Every layer's page of local block d equals the source's block s, for each (s, d)."""
    for lw, lg in zip(want, got):
        for s, d in pairs:
            assert torch.equal(block(lg, layout, d), block(lw, layout, s)), (s, d)


def stats_when(child: JsonChild, source: str, cond, timeout: float = WAIT_S) -> dict | None:
    """The source's stats once ``cond(stats)`` holds, or None after ``timeout``."""
    def check():
        stats = child.call(op="stats", source=source)
        return stats if cond(stats) else None
    return wait_for(check, timeout)


@pytest.mark.parametrize("layout, transport", [("LBHNC", "shm"), ("LBHNC", "tcp"), ("LBNHC", "shm"),
                                               ("LBNHC", "tcp"), ("flash", "shm")])
def test_pages_arrive_byte_for_byte(sources, layout, transport):
    ep = sources.ready["endpoints"][layout]
    want = make_caches(layout, seed=SEED, num_blocks=SOURCE_BLOCKS, **SHAPE)
    got = make_caches(layout, num_blocks=40, **SHAPE)
    a, b = f"a-{transport}", f"b-{transport}"
    # 3 full blocks and a partial one; a second request whose first block is skipped
    sources.call(op="serve", source=layout, request_id=a, blocks=[5, 2, 17, 9], num_tokens=3 * 16 + 5)
    sources.call(op="serve", source=layout, request_id=b, blocks=[3, 4], num_tokens=20)
    with KVCacheSink(got, model=MODEL, transport=transport, timeout=10) as sink:
        assert sink.layout_name == layout
        sink.start("local-a", ep, a, [30, 31, 0, 39])
        sink.start("local-b", ep, b, [12], skip_blocks=1)
        sink.wait(["local-a", "local-b"], WAIT_S)
        finished, failed = sink.take_done()
    assert failed == {} and finished == {"local-a", "local-b"}
    for lw, lg in zip(want, got):
        for s, d in [(5, 30), (2, 31), (17, 0), (9, 39), (4, 12)]:
            assert torch.equal(block(lg, layout, d), block(lw, layout, s)), (s, d)
        untouched = [i for i in range(40) if i not in (30, 31, 0, 39, 12)]
        assert all(not block(lg, layout, i).any() for i in untouched)
    # the source learns that both were read: their blocks are no longer pinned
    stats = stats_when(sources, layout, lambda s: s["pinned"] == 0 and {a, b} <= set(s["done"]))
    assert stats and stats["serving"] == 0


def test_a_load_started_before_the_request_is_served_waits_for_it(sources, caplog):
    """A producer's engine serves a request a step after answering it: the sink's one
    Subscribe waits for it (no re-asking, no warning per refusal) and the pages land."""
    ep = sources.ready["endpoints"]["LBHNC"]
    want = make_caches("LBHNC", seed=SEED, num_blocks=SOURCE_BLOCKS, **SHAPE)
    got = make_caches("LBHNC", num_blocks=8, **SHAPE)
    with caplog.at_level(logging.INFO, logger="kvtransfer"), \
            KVCacheSink(got, model=MODEL, timeout=10) as sink:
        sink.start("local-late", ep, "served-late", [6, 1])
        assert stats_when(sources, "LBHNC", lambda s: s["waiting"] == 1)  # the Subscribe came first
        sources.call(op="serve", source="LBHNC", request_id="served-late", blocks=[11, 4], num_tokens=20)
        sink.wait(["local-late"], WAIT_S)
        finished, failed = sink.take_done()
    assert failed == {} and finished == {"local-late"}
    assert_pages(got, want, [(11, 6), (4, 1)])
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert stats_when(sources, "LBHNC", lambda s: "served-late" in s["done"] and s["waiting"] == 0)


@pytest.mark.parametrize("remote", [([8, 3, 14], 40), ([8, 3, 15], 40), ([8, 3, 14], 33), ([8], 16),
                                    ([8, 3, 99], 40), ([], -5)],
                         ids=["right", "other-blocks", "other-tokens", "too-few", "out-of-range", "nonsense"])
def test_pages_land_whatever_the_producer_was_expected_to_pin(sources, remote, monkeypatch):
    """Reads planned before the producer answers (from the blocks it is expected to pin):
    a right guess is the plan used (none is made at Pinned), a wrong one is planned
    again at Pinned, and every one lands the pinned pages, byte for byte."""
    from kvtransfer.control import pull as pull_module
    planned: list[list[int]] = []  # the producer blocks of each plan made

    def counting_plan_reads(remote_layout, layout, src_blocks, *args, **kw):
        planned.append([int(b) for b in src_blocks])
        return plan_reads(remote_layout, layout, src_blocks, *args, **kw)

    plan_reads = pull_module.plan_reads
    monkeypatch.setattr(pull_module, "plan_reads", counting_plan_reads)
    ep = sources.ready["endpoints"]["LBHNC"]
    want = make_caches("LBHNC", seed=SEED, num_blocks=SOURCE_BLOCKS, **SHAPE)
    got = make_caches("LBHNC", num_blocks=8, **SHAPE)
    rid = f"planned-{'-'.join(map(str, remote[0]))}-{remote[1]}"
    sources.call(op="serve", source="LBHNC", request_id=rid, blocks=[8, 3, 14], num_tokens=40)
    with KVCacheSink(got, model=MODEL, timeout=10) as sink:
        sink.start("local", ep, rid, [5, 0, 7], skip_blocks=1, remote=remote)
        sink.wait(["local"], WAIT_S)
        finished, failed = sink.take_done()
    assert failed == {} and finished == {"local"}
    assert_pages(got, want, [(3, 5), (14, 0)])
    assert all(not block(lg, "LBHNC", i).any() for lg in got for i in (1, 2, 3, 4, 6, 7))
    assert planned[-1] == [3, 14]  # the plan used reads the pinned blocks after the skipped one
    assert len(planned) == (1 if remote == ([8, 3, 14], 40) else 2), planned


def test_closing_a_sink_ends_its_waiting_loads(sources):
    sink = KVCacheSink(make_caches("LBHNC", num_blocks=8, **SHAPE), model=MODEL, timeout=30)
    try:
        sink.start("never", sources.ready["endpoints"]["LBHNC"], "never-served", [1])
        assert stats_when(sources, "LBHNC", lambda s: s["waiting"] == 1)
    finally:
        t0 = time.monotonic()
        sink.close()
    assert time.monotonic() - t0 < 15.0  # cancelled, not left to its 30 s wait
    assert stats_when(sources, "LBHNC", lambda s: s["waiting"] == 0)


def test_unread_request_is_freed_at_lease_expiry(sources):
    sources.call(op="serve", source="short-lease", request_id="never-read", blocks=[1, 2], num_tokens=32)
    assert sources.call(op="stats", source="short-lease")["pinned"] == 2
    stats = stats_when(sources, "short-lease", lambda s: s["pinned"] == 0, 10.0)
    assert stats and stats["done"] == ["never-read"]


@pytest.mark.parametrize("source, field", [("model", "model"), ("block_size", "block_size"), ("kind", "kind"),
                                           ("head_dim", "head_dim")])
def test_mismatch_is_refused_naming_the_field(sources, source, field):
    sources.call(op="serve", source=source, request_id="r", blocks=[0], num_tokens=16)
    with KVCacheSink(make_caches("LBHNC", num_blocks=8, **SHAPE), model=MODEL, timeout=5) as sink:
        sink.start("r", sources.ready["endpoints"][source], "r", [1])
        sink.wait(["r"], WAIT_S)
        finished, failed = sink.take_done()
    assert not finished and isinstance(failed["r"], (ControlError, LayoutMismatchError))
    assert field in str(failed["r"])


def test_load_from_a_gone_producer_fails_within_the_timeout():
    with socket.socket() as s:  # a port nobody listens on anymore
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with KVCacheSink(make_caches("LBHNC", num_blocks=8, **SHAPE), model=MODEL, timeout=1.0) as sink:
        t0 = time.monotonic()
        sink.start("r", f"tcp://127.0.0.1:{port}", "r", [1])
        sink.wait(["r"], WAIT_S)
        took = time.monotonic() - t0
        finished, failed = sink.take_done()
    assert not finished and "no answer" in str(failed["r"])
    assert took < 1.0 + 5.0, f"failed after {took:.1f} s, the sink's timeout is 1 s"  # slack: a loaded machine


def test_unreadable_layout_is_refused_naming_it():
    with pytest.raises(LayoutMismatchError, match="BHNC"):
        describe_kv_caches(make_caches("BLHNC", **SHAPE))


def test_layers_in_one_buffer_are_one_region():
    kv = describe_kv_caches(make_caches("LBHNC", **SHAPE))
    assert len(kv.buffers) == 1 and kv.layout.kind == "heads_major" and kv.layout_name == "LBHNC"
    kv = describe_kv_caches(make_caches("flash", **SHAPE))
    assert len(kv.buffers) == 3 and kv.layout.layer_regions == (0, 1, 2)


def test_blocks_outside_the_cache_are_refused_and_nothing_stays_pinned():
    from kvtransfer.connector.core import KVCacheSource
    from kvtransfer.errors import InvalidArgumentError
    with KVCacheSource(make_caches("LBHNC", **SHAPE, num_blocks=4), model=MODEL) as source:
        with pytest.raises(InvalidArgumentError, match="outside the pool"):
            source.serve("req-bad", [1, 99], SHAPE["block_size"] * 2)
        assert source.pinned_blocks == 0 and source.serving == 0
        source.serve("req-good", [1, 2], SHAPE["block_size"] * 2)  # the source still serves
        assert source.pinned_blocks == 2 and source.serving == 1
