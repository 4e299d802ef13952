"""Good reads between two processes, over each transport: sizes from 1 byte to 64 MiB,
unaligned offsets, 10,000-entry batches of scattered blocks, several local regions, and
four threads reading at once. Every read is checked byte for byte."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import kvtransfer
from kvtransfer import RegionDescriptor
from support import MiB, WAIT_S, alloc_dst, assert_bytes, connect, plan, scattered_blocks

LENGTHS = [1, 2, 3, 4095, 4096, 4097, 65537, 2 * MiB + 1, 4 * MiB + 7, 64 * MiB]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("length", LENGTHS, ids=lambda n: f"{n}B")
def test_single_read_of_any_length(engine, shared_target, transport, length):
    """One entry of ``length`` bytes at an odd remote offset into an odd local offset;
    the bytes around the destination range stay untouched."""
    peer = connect(engine, shared_target, transport)
    remote_off = 777_777 + length % 13  # unaligned, and length + offset fits the region
    local_off = 3
    dst, region = alloc_dst(engine, local_off + length + 5)
    want = plan(dst, shared_target.expected, [local_off], [remote_off], [length])
    t = peer.read([(region, local_off, shared_target.region, remote_off, length)])
    assert (t.entries, t.nbytes, t.transport) == (1, length, transport)
    t.wait(timeout=WAIT_S)
    assert t.done()
    assert_bytes(dst, want)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["first_byte", "last_byte", "last_4097", "whole_region"])
def test_read_at_region_edges(engine, shared_target, transport, where):
    """Ranges that touch the ends of the remote region are inside it and must be served."""
    n = shared_target.region.nbytes
    off, length = {"first_byte": (0, 1), "last_byte": (n - 1, 1), "last_4097": (n - 4097, 4097),
                   "whole_region": (0, n)}[where]
    peer = connect(engine, shared_target, transport)
    dst, region = alloc_dst(engine, length + 1)
    want = plan(dst, shared_target.expected, [1], [off], [length])
    peer.read([(region, 1, shared_target.region, off, length)]).wait(timeout=WAIT_S)
    assert_bytes(dst, want)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("api", ["read", "read_blocks"])
def test_10000_scattered_blocks(engine, shared_target, transport, api):
    """10,000 blocks of random lengths (1..8191 bytes) at random unaligned remote
    offsets, packed with unaligned gaps locally, in one batch."""
    rng = np.random.default_rng(10_000)
    lo, ro, ln, need = scattered_blocks(rng, 10_000, shared_target.nbytes, 8191)
    peer = connect(engine, shared_target, transport)
    dst, region = alloc_dst(engine, need)
    want = plan(dst, shared_target.expected, lo, ro, ln)
    if api == "read":
        desc = shared_target.region
        t = peer.read([(region, int(a), desc, int(b), int(c)) for a, b, c in zip(lo, ro, ln)])
    else:
        t = peer.read_blocks(region, lo, shared_target.region, ro, ln)
    assert t.entries == 10_000 and t.nbytes == int(ln.sum())
    t.wait(timeout=WAIT_S)
    assert_bytes(dst, want)


@pytest.mark.timeout(60)
def test_10000_blocks_one_length_reverse_order(engine, shared_target, transport):
    """read_blocks with one length for every block (1021 bytes), remote blocks taken in
    reverse order from an odd base: the destination is the source reversed block-wise."""
    n, size = 10_000, 1021
    ro = (5 + size * np.arange(n, dtype=np.int64))[::-1].copy()
    lo = 7 + size * np.arange(n, dtype=np.int64)
    peer = connect(engine, shared_target, transport)
    dst, region = alloc_dst(engine, 7 + n * size)
    want = plan(dst, shared_target.expected, lo, ro, size)
    peer.read_blocks(region, lo, shared_target.region, ro, size).wait(timeout=WAIT_S)
    assert_bytes(dst, want)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_whole_blocks_cut_without_visiting_them(engine, shared_target, transport, layout):
    """4 KiB blocks fill every job exactly, so the C core cuts the batch into jobs by
    counting (no per-block loop) and copies the offset columns in bulk, or one by one
    when the offset arrays are strided views: the bytes land the same."""
    n, size = 5000, 4096
    lo = size * np.arange(n, dtype=np.int64)
    ro = (size * np.arange(n, dtype=np.int64) + 3)[::-1]
    if layout == "strided":
        lo = np.repeat(lo, 2)[::2]
        ro = np.repeat(ro, 2)[::2]
    else:
        ro = ro.copy()
    assert lo.flags.c_contiguous == (layout == "contiguous")
    peer = connect(engine, shared_target, transport)
    dst, region = alloc_dst(engine, n * size)
    want = plan(dst, shared_target.expected, lo, ro, size)
    peer.read_blocks(region, lo, shared_target.region, ro, size).wait(timeout=WAIT_S)
    assert_bytes(dst, want)


@pytest.mark.timeout(60)
def test_batch_of_entries_larger_than_a_job(engine, shared_target, transport):
    """Entries of several MiB each (longer than one transport job), in one batch, with
    unaligned offsets: each is split and reassembled in place."""
    lens = [3 * MiB + 1, 5 * MiB + 3, 1, 9 * MiB + 11, 2 * MiB]
    ro = [13, 20 * MiB + 1, 999, 31 * MiB + 7, 63 * MiB]
    lo = np.cumsum([5] + [n + 3 for n in lens[:-1]])
    peer = connect(engine, shared_target, transport)
    dst, region = alloc_dst(engine, int(lo[-1]) + lens[-1] + 5)
    want = plan(dst, shared_target.expected, lo, ro, lens)
    peer.read([(region, int(a), shared_target.region, b, c) for a, b, c in zip(lo, ro, lens)]).wait(timeout=WAIT_S)
    assert_bytes(dst, want)


@pytest.mark.timeout(60)
def test_batch_over_several_local_regions_and_descriptor_copies(engine, shared_target, transport):
    """One batch writing into three local regions in turn, each entry naming the remote
    region through its own (equal) descriptor object decoded from bytes."""
    rng = np.random.default_rng(3)
    lo, ro, ln, need = scattered_blocks(rng, 3000, shared_target.nbytes, 3000)
    dsts = [alloc_dst(engine, need) for _ in range(3)]
    wants = [d.copy() for d, _ in dsts]
    for i in range(3):  # poison every destination range, and know what must land there
        sel = np.arange(i, len(lo), 3)
        wants[i] = plan(dsts[i][0], shared_target.expected, lo[sel], ro[sel], ln[sel])
    raw = shared_target.region.to_bytes()
    entries = [(dsts[i % 3][1], int(lo[i]), RegionDescriptor.from_bytes(raw), int(ro[i]), int(ln[i]))
               for i in range(len(lo))]
    peer = connect(engine, shared_target, transport)
    peer.read(entries).wait(timeout=WAIT_S)
    for i, (d, _) in enumerate(dsts):
        assert_bytes(d, wants[i], f"local region {i}")


def test_read_indexed_over_several_local_regions(engine, shared_target, transport):
    """The vectorized multi-region form (what KV plans use): entry i goes into local
    region index[i]; the same bytes land as with one read per entry."""
    rng = np.random.default_rng(4)
    lo, ro, ln, need = scattered_blocks(rng, 3000, shared_target.nbytes, 3000)
    dsts = [alloc_dst(engine, need) for _ in range(3)]
    idx = rng.integers(0, 3, len(lo))
    wants = [plan(dsts[i][0], shared_target.expected, lo[idx == i], ro[idx == i], ln[idx == i]) for i in range(3)]
    peer = connect(engine, shared_target, transport)
    t = peer.read_indexed([r for _, r in dsts], idx, lo, [shared_target.region], np.zeros_like(idx), ro, ln)
    assert t.entries == len(lo)
    t.wait(timeout=WAIT_S)
    for i, (d, _) in enumerate(dsts):
        assert_bytes(d, wants[i], f"local region {i}")
    with pytest.raises(kvtransfer.InvalidArgumentError, match="entry 1: local region index 3 out of range"):
        peer.read_indexed([r for _, r in dsts], [0, 3], [0, 0], [shared_target.region], [0, 0], [0, 0], 8)
    with pytest.raises(kvtransfer.InvalidArgumentError, match="remote region index 1 out of range"):
        peer.read_indexed([dsts[0][1]], [0], [0], [shared_target.region], [1], [0], 8)


@pytest.mark.timeout(120)
def test_four_threads_reading_at_once(engine, shared_target, transport):
    """Four threads share one peer; each reads a 2,500-block scattered batch and a
    3 MiB range into its own region, three rounds, all at the same time."""
    peer = connect(engine, shared_target, transport)
    barrier = threading.Barrier(4, timeout=30)
    errors: list[BaseException] = []

    def reader(k: int) -> None:
        try:
            rng = np.random.default_rng(100 + k)
            lo, ro, ln, need = scattered_blocks(rng, 2500, shared_target.nbytes, 4000)
            big = 3 * MiB + k
            dst = kvtransfer.alloc_host(need + big)
            region, _ = engine.register(dst)
            barrier.wait()
            for rnd in range(3):
                dst[:] = rnd
                want = plan(dst, shared_target.expected, np.append(lo, need), np.append(ro, 11 * MiB * k + rnd),
                            np.append(ln, big))
                t1 = peer.read_blocks(region, lo, shared_target.region, ro, ln)
                t2 = peer.read([(region, need, shared_target.region, 11 * MiB * k + rnd, big)])
                t1.wait(timeout=WAIT_S)
                t2.wait(timeout=WAIT_S)
                assert_bytes(dst, want, f"thread {k} round {rnd}")
            region.close()
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(k,), name=f"reader-{k}", daemon=True) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=90)
    assert not any(th.is_alive() for th in threads), "a reader thread is still running after 90 s"
    if errors:
        raise errors[0]
