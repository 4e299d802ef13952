"""Handles: Region, Peer and Engine close() are idempotent, work as context managers,
and closed handles refuse work. Closing never leaves a read writing into memory that
its owner believes is free."""

from __future__ import annotations

import errno
import os
import threading

import numpy as np
import pytest

import kvtransfer
from kvtransfer import Engine, InvalidArgumentError, KVTransferError, TransferError, TransferTimeoutError
from support import MiB, WAIT_S, alloc_dst, assert_bytes, close_within, connect, good_read, plan


def test_engine_descriptor_describes_this_process():
    with Engine() as eng:
        d = eng.descriptor
        assert d.pid == os.getpid()
        assert len(d.engine_id) == 16 and eng.id == d.engine_id.hex()
        assert d.tcp_host == "127.0.0.1" and 0 < d.tcp_port < 65536
        with open("/proc/sys/kernel/random/boot_id") as f:
            assert d.boot_id == f.read().strip()
    with Engine() as other:
        assert other.descriptor.engine_id != d.engine_id


@pytest.mark.parametrize("io_timeout", [0, -1.0])
def test_engine_rejects_a_non_positive_io_timeout(io_timeout):
    with pytest.raises(InvalidArgumentError):
        Engine(io_timeout=io_timeout)


@pytest.mark.parametrize("option,value", [("tcp_connections", 0), ("tcp_connections", -1),
                                          ("tcp_connections", 10_000), ("shm_threads", 0), ("shm_threads", 10_000)])
def test_engine_rejects_out_of_range_thread_counts(option, value):
    with pytest.raises(InvalidArgumentError):
        Engine(**{option: value})


@pytest.mark.timeout(30)
def test_engine_with_one_connection_and_one_copy_thread_reads(shared_target, transport):
    with Engine(tcp_connections=1, shm_threads=1, io_timeout=5.0) as eng:
        peer = connect(eng, shared_target, transport)
        good_read(eng, peer, shared_target, nbytes=9 * MiB + 1, remote_off=7)


@pytest.mark.timeout(30)
def test_sub_millisecond_io_timeout_is_refused_or_honoured(start_target):
    """io_timeout is in seconds; one below a millisecond must not silently become the
    10 s default (the C core reads 0 ms as "default"): either Engine() refuses it, or a
    read from a stopped target fails well within a second or two."""
    try:
        eng = Engine(io_timeout=0.0004)
    except InvalidArgumentError:
        return
    target = start_target(1 << 20, 33)
    try:
        peer = connect(eng, target, "tcp")
        dst, region = alloc_dst(eng, 4096)
        target.freeze()
        t = peer.read([(region, 0, target.region, 0, 4096)])
        try:
            t.wait(timeout=3.0)
        except TransferTimeoutError:
            pytest.fail("Engine(io_timeout=0.0004): a read from a stopped target still runs after 3 s")
        except TransferError as e:
            assert e.errno == errno.ETIMEDOUT
    finally:
        target.thaw()
        close_within(eng)


def test_engine_with_an_unusable_listen_address_fails_cleanly():
    with pytest.raises(KVTransferError):
        Engine(listen_host="203.0.113.254")  # TEST-NET-3: not an address of this machine


@pytest.mark.timeout(30)
def test_region_close_is_idempotent_and_a_context_manager(engine, shared_target, transport):
    arr = kvtransfer.alloc_host(4096)
    peer = connect(engine, shared_target, transport)
    with engine.register(arr)[0] as region:
        assert not region.closed
        peer.read([(region, 0, shared_target.region, 1, 4096)]).wait(timeout=WAIT_S)
        assert_bytes(arr, shared_target.expected[1:4097])
    assert region.closed
    region.close()
    region.close()
    assert region.closed
    with pytest.raises(InvalidArgumentError):
        peer.read([(region, 0, shared_target.region, 0, 1)])


@pytest.mark.timeout(30)
def test_peer_close_is_idempotent_and_a_context_manager(engine, shared_target, transport):
    dst, region = alloc_dst(engine, 4096)
    with engine.connect(shared_target.engine, transport=transport) as peer:
        want = plan(dst, shared_target.expected, [0], [3], [4096])
        peer.read([(region, 0, shared_target.region, 3, 4096)]).wait(timeout=WAIT_S)
        assert_bytes(dst, want)
    peer.close()
    peer.close()
    before = dst.copy()
    for attempt in (lambda: peer.read([(region, 0, shared_target.region, 0, 4096)]),
                    lambda: peer.read_blocks(region, [0], shared_target.region, [0], 4096)):
        with pytest.raises(KVTransferError) as ei:
            attempt()
        assert ei.value.errno == errno.EBADF
    assert_bytes(dst, before, "destination after reads on a closed peer")
    good_read(engine, connect(engine, shared_target, transport), shared_target)  # the engine still works


def test_a_transfer_keeps_its_peer_open(engine, shared_target, transport):
    """A read on a peer nobody else holds (``engine.connect(...).read(...)``) completes:
    the Transfer keeps its Peer, so the peer is not closed under the read."""
    import gc
    n, size = 256, 4096
    dst, region = alloc_dst(engine, 2 * n * size)
    lo = np.arange(n, dtype=np.int64) * size
    ro = lo[::-1].copy() + 5
    want = plan(dst, shared_target.expected, np.append(lo, n * size), np.append(ro, 1), [size] * (n + 1))
    blocks = engine.connect(shared_target.engine, transport=transport).read_blocks(region, lo, shared_target.region,
                                                                                 ro, size)
    listed = engine.connect(shared_target.engine, transport=transport).read(
        [(region, n * size, shared_target.region, 1, size)])
    gc.collect()
    blocks.wait(timeout=WAIT_S)
    listed.wait(timeout=WAIT_S)
    assert_bytes(dst, want, "reads on peers held only by their transfers")


@pytest.mark.timeout(30)
def test_engine_close_is_idempotent_and_closes_its_children(shared_target, transport):
    with Engine(io_timeout=5.0) as eng:
        dst, region = alloc_dst(eng, 4096)
        peer = connect(eng, shared_target, transport)
        good_read(eng, peer, shared_target)
    close_within(eng)
    close_within(eng)
    assert region.closed
    with pytest.raises(KVTransferError):
        peer.read([(region, 0, shared_target.region, 0, 1)])
    peer.close()
    region.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("call", ["register", "connect"])
def test_closed_engine_refuses_work_with_a_kvtransfer_error(shared_target, call):
    """register/connect on a closed engine: a KVTransferError (EBADF), as the C layer
    gives for a closed engine, not an AttributeError from the facade's internals."""
    eng = Engine()
    eng.close()
    with pytest.raises(KVTransferError) as ei:
        if call == "register":
            eng.register(np.zeros(16, np.uint8))
        else:
            eng.connect(shared_target.engine)
    assert ei.value.errno == errno.EBADF


@pytest.mark.timeout(60)
def test_closing_regions_and_peers_in_any_order(shared_target, transport):
    """Children closed after their engine, or the engine twice in a row, never fail."""
    eng = Engine(io_timeout=5.0)
    regions = [alloc_dst(eng, 4096)[1] for _ in range(3)]
    peers = [connect(eng, shared_target, transport) for _ in range(2)]
    good_read(eng, peers[0], shared_target)
    regions[0].close()
    peers[1].close()
    close_within(eng)
    for r in regions:
        r.close()
    for p in peers:
        p.close()


@pytest.mark.timeout(60)
def test_region_close_waits_for_a_read_writing_into_it(engine_factory, start_target, transport):
    """Region.close() returns only once no read writes into it anymore: with the target
    stopped (tcp: the read stalls until the io timeout), close blocks, and when it
    returns the transfer is finished."""
    eng = engine_factory(io_timeout=2.0)
    target = start_target(16 * MiB, 31)
    peer = connect(eng, target, transport)
    arr = kvtransfer.alloc_host(16 * MiB)
    region, _ = eng.register(arr)
    target.freeze()
    try:
        t = peer.read([(region, 0, target.region, 0, 16 * MiB)])
        closed = threading.Event()

        def close() -> None:
            region.close()
            closed.set()

        th = threading.Thread(target=close, daemon=True)
        th.start()
        th.join(timeout=10.0)
        assert closed.is_set(), "region.close() did not return within 10 s"
        assert t.done(), "region.close() returned while a read still writes into the region"
    finally:
        target.thaw()
    try:
        t.wait(timeout=0)
    except TransferError:
        assert transport == "tcp"
    else:
        assert_bytes(arr, target.expected)


@pytest.mark.timeout(60)
def test_engine_close_ends_a_stalled_read(engine_factory, start_target, transport):
    """Closing the engine while a read is stalled on a stopped target returns within
    the io timeout and leaves the transfer finished: failed over tcp; over shm it
    either succeeded (right bytes) or had its queued jobs cancelled."""
    target = start_target(16 * MiB, 32)
    eng = Engine(io_timeout=2.0)
    peer = connect(eng, target, transport)
    arr = kvtransfer.alloc_host(16 * MiB)
    region, _ = eng.register(arr)
    target.freeze()
    try:
        t = peer.read([(region, 0, target.region, 0, 16 * MiB)])
        close_within(eng, timeout=10.0)
        assert t.done()
    finally:
        target.thaw()
    try:
        t.wait(timeout=0)
    except TransferError:
        pass  # over shm too, if the close cancelled jobs not yet run (ECANCELED)
    else:
        # shm and map copy without the target running; only tcp needs it
        assert transport in ("shm", "map"), "a read from a stopped tcp target reported success"
        assert_bytes(arr, target.expected)
