"""The target refuses what a peer may not read: a wrong key, a range outside the region,
a region that is not (or no longer) registered. Each refusal is a RemoteAccessError
naming the failing entry, the transport and the errno, and the target goes on serving."""

from __future__ import annotations

import errno
import threading
import time

import msgspec
import numpy as np
import pytest

from kvtransfer import RemoteAccessError, TransferError
from support import WAIT_S, alloc_dst, assert_bytes, connect, good_read, plan, refusal_errno


def _forge(desc, kind: str):
    """A descriptor of the target's region, spoilt the way ``kind`` says, and the
    (remote offset, length) to read with it."""
    n = desc.nbytes
    if kind == "wrong_key":
        return msgspec.structs.replace(desc, key=desc.key ^ 0x5A5A), 4096, 100
    if kind == "past_the_end":
        return desc, n, 1
    if kind == "straddles_the_end":
        return desc, n - 3, 7
    if kind == "offset_far_out":
        return desc, 1 << 62, 16
    if kind == "stale_generation":  # the same slot, another registration's id
        return msgspec.structs.replace(desc, region_id=desc.region_id + (1 << 32)), 0, 64
    if kind == "unused_slot":
        return msgspec.structs.replace(desc, region_id=(desc.region_id & ~0xFFFFFFFF) | 4000), 0, 64
    if kind == "slot_beyond_the_table":
        return msgspec.structs.replace(desc, region_id=(desc.region_id & ~0xFFFFFFFF) | 0xFFFFFFFF), 0, 64
    if kind == "region_id_zero":
        return msgspec.structs.replace(desc, region_id=0), 0, 64
    raise AssertionError(kind)


REFUSALS = {
    "wrong_key": errno.EACCES,
    "past_the_end": errno.ERANGE,
    "straddles_the_end": errno.ERANGE,
    "offset_far_out": errno.ERANGE,
    "stale_generation": errno.ENOENT,
    "unused_slot": errno.ENOENT,
    "slot_beyond_the_table": errno.ENOENT,
    "region_id_zero": errno.ENOENT,
}


#: Refusals by region id alone: verbs addresses memory by rkey and address, so a
#: descriptor whose id is wrong but whose rkey and address are right is still readable.
ID_ONLY = {"stale_generation", "unused_slot", "slot_beyond_the_table", "region_id_zero"}


def _batch_with_one_bad_entry(region, good_desc, bad, bad_index: int, n: int, rng):
    """``n`` entries of 512 bytes from ``good_desc`` with entry ``bad_index`` replaced by
    ``bad`` = (desc, remote offset, length); local ranges 512 bytes apart."""
    ro = rng.integers(0, good_desc.nbytes - 512, n)
    entries = [(region, 512 * i, good_desc, int(ro[i]), 512) for i in range(n)]
    d, off, length = bad
    entries[bad_index] = (region, 512 * bad_index, d, off, length)
    return entries


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", list(REFUSALS))
@pytest.mark.parametrize("bad_index", [0, 5, 7777], ids=lambda i: f"entry{i}")
def test_refusal_names_entry_errno_and_transport(engine, shared_target, transport, kind, bad_index):
    """One spoilt entry in a batch (first, early, or deep in a 10,000-entry batch that
    spans many transport jobs) fails the transfer with that entry's index and errno."""
    if transport == "verbs" and kind in ID_ONLY:
        pytest.skip("verbs reads by rkey and address; the region id is not checked on that path")
    n = 10 if bad_index < 10 else 10_000
    peer = connect(engine, shared_target, transport)
    dst, region = alloc_dst(engine, 512 * n)
    entries = _batch_with_one_bad_entry(region, shared_target.region, _forge(shared_target.region, kind),
                                        bad_index, n, np.random.default_rng(bad_index))
    t = peer.read(entries)
    with pytest.raises(RemoteAccessError) as ei:
        t.wait(timeout=WAIT_S)
    e = ei.value
    assert isinstance(e, TransferError)
    assert e.entry == bad_index
    assert e.transport == transport
    assert e.errno == refusal_errno(transport, REFUSALS[kind]), f"errno {e.errno} ({e.strerror}) for {kind}: {e}"
    assert f"entry {bad_index} " in str(e)
    assert t.done()
    # The target keeps serving: this peer, and a fresh connection.
    good_read(engine, peer, shared_target)
    fresh = connect(engine, shared_target, transport)
    good_read(engine, fresh, shared_target, nbytes=3 * 4096, remote_off=65 * 4096 + 1)
    fresh.close()


@pytest.mark.timeout(60)
def test_refusals_one_after_another_on_one_peer(engine, shared_target, transport):
    """Refusals of every kind, back to back on the same peer, each followed by a good
    read: no refusal leaves the connection or the target unusable."""
    peer = connect(engine, shared_target, transport)
    dst, region = alloc_dst(engine, 4096)
    for kind, code in REFUSALS.items():
        if transport == "verbs" and kind in ID_ONLY:
            continue
        code = refusal_errno(transport, code)
        desc, off, length = _forge(shared_target.region, kind)
        with pytest.raises(RemoteAccessError) as ei:
            peer.read([(region, 0, desc, off, length)]).wait(timeout=WAIT_S)
        assert (ei.value.errno, ei.value.entry, ei.value.transport) == (code, 0, transport), kind
        want = plan(dst, shared_target.expected, [1], [12345], [4095])
        peer.read([(region, 1, shared_target.region, 12345, 4095)]).wait(timeout=WAIT_S)
        assert_bytes(dst, want, f"good read after {kind}")


@pytest.mark.timeout(60)
def test_deregistered_region_is_refused(engine, start_target, transport):
    """After the target deregisters its region, reads of it fail with ENOENT (on a peer
    connected before, and on one connected after), and the target is still alive and
    answering."""
    target = start_target(1 << 20, 5)
    peer = connect(engine, target, transport)
    dst, region = alloc_dst(engine, 8192)
    want = plan(dst, target.expected, [0], [100], [8192])
    peer.read([(region, 0, target.region, 100, 8192)]).wait(timeout=WAIT_S)
    assert_bytes(dst, want, "read before deregistration")

    target.deregister()
    later = connect(engine, target, transport)
    for p in (peer, later):
        entries = [(region, 0, target.region, 0, 10), (region, 10, target.region, 4096, 100)]
        with pytest.raises(RemoteAccessError) as ei:
            p.read(entries).wait(timeout=WAIT_S)
        assert ei.value.errno == refusal_errno(transport, errno.ENOENT)
        assert ei.value.entry == 0
        assert ei.value.transport == transport
    target.ping()


@pytest.mark.timeout(60)
def test_refusal_by_one_target_does_not_disturb_another(engine, shared_target, other_target, transport):
    """A refusal from one target and a good read from another, through one engine."""
    p1 = connect(engine, shared_target, transport)
    p2 = connect(engine, other_target, transport)
    dst, region = alloc_dst(engine, 4096)
    bad = msgspec.structs.replace(shared_target.region, key=shared_target.region.key + 1)
    with pytest.raises(RemoteAccessError):
        p1.read([(region, 0, bad, 0, 4096)]).wait(timeout=WAIT_S)
    good_read(engine, p2, other_target, nbytes=4096 * 9 + 1, remote_off=3)


@pytest.mark.timeout(60)
def test_deregistration_while_reads_are_in_flight(engine, start_target, transport):
    """A reader keeps reading while the target deregisters: the deregistration
    completes (it waits only for reads being served), every read either succeeds with
    the right bytes or is refused (ENOENT, or ESTALE for a copy that raced it), and
    once it is done every read is refused with ENOENT."""
    target = start_target(16 << 20, 6)
    peer = connect(engine, target, transport)
    dst, region = alloc_dst(engine, 8 << 20)
    stop = threading.Event()
    results: list[str] = []
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            i = 0
            while not stop.is_set():
                off = (i * 4099) % (8 << 20)
                dst[:] = 0
                want = plan(dst, target.expected, [0], [off], [8 << 20])
                try:
                    peer.read([(region, 0, target.region, off, 8 << 20)]).wait(timeout=WAIT_S)
                except RemoteAccessError as e:
                    assert e.errno in (errno.ENOENT, errno.ESTALE, refusal_errno(transport, errno.ENOENT)), e
                    results.append("refused")
                else:
                    assert_bytes(dst, want, f"read {i}")
                    results.append("ok")
                i += 1
        except BaseException as e:
            errors.append(e)

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    deadline = time.monotonic() + 10
    while results.count("ok") < 3 and time.monotonic() < deadline and not errors:
        time.sleep(0.01)
    target.deregister()
    n_at_deregistration = len(results)
    while len(results) < n_at_deregistration + 3 and time.monotonic() < deadline + 10 and not errors:
        time.sleep(0.01)
    stop.set()
    th.join(timeout=WAIT_S)
    assert not th.is_alive(), "reader thread still running"
    if errors:
        raise errors[0]
    assert results.count("ok") >= 3
    assert results[n_at_deregistration + 1:] and set(results[n_at_deregistration + 1:]) == {"refused"}, results
    with pytest.raises(RemoteAccessError) as ei:
        peer.read([(region, 0, target.region, 0, 10)]).wait(timeout=WAIT_S)
    assert ei.value.errno == refusal_errno(transport, errno.ENOENT)
    target.ping()
