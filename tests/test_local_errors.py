"""Mistakes on the reader's side are InvalidArgumentErrors raised by ``read`` itself,
before anything is sent, and they name the entry at fault."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

import kvtransfer
from kvtransfer import InvalidArgumentError
from support import WAIT_S, alloc_dst, assert_bytes, connect, good_read, make_engine

BAD_INDEX = 2
N_ENTRIES = 4
BLOCK = 4096

KINDS = [
    "local_offset_out_of_range",
    "local_range_straddles_the_end",
    "zero_length",
    "closed_local_region",
    "local_region_of_another_engine",
    "local_not_a_region",
    "remote_descriptor_of_another_engine",
    "remote_not_a_descriptor",
    "negative_local_offset",
    "negative_remote_offset",
    "negative_length",
]


class _Case:
    """Builds a 4-entry batch whose entry BAD_INDEX is broken the way ``kind`` says;
    the other entries are good and their destination ranges poisoned, so a read that
    was sent anyway would show in them."""

    def __init__(self, engine, target, other_target, kind: str):
        self.dst, self.region = alloc_dst(engine, N_ENTRIES * BLOCK)
        self.dst[:] = 0xA5
        self.before = self.dst.copy()
        self.extra = []  # resources to close after the test
        desc = target.region
        entries = [(self.region, i * BLOCK, desc, 1000 + i * 7919, BLOCK) for i in range(N_ENTRIES)]
        r, lo, d, ro, n = entries[BAD_INDEX]
        if kind == "local_offset_out_of_range":
            lo = N_ENTRIES * BLOCK
        elif kind == "local_range_straddles_the_end":
            lo, n = N_ENTRIES * BLOCK - 10, 20
        elif kind == "zero_length":
            n = 0
        elif kind == "closed_local_region":
            _, r = alloc_dst(engine, BLOCK)
            r.close()
            lo = 0
        elif kind == "local_region_of_another_engine":
            other = make_engine()
            self.extra.append(other)
            _, r = alloc_dst(other, BLOCK)
            lo = 0
        elif kind == "local_not_a_region":
            r = np.zeros(BLOCK, np.uint8)
            lo = 0
        elif kind == "remote_descriptor_of_another_engine":
            d = other_target.region
            ro = 0
        elif kind == "remote_not_a_descriptor":
            d = desc.to_bytes()
        elif kind == "negative_local_offset":
            lo = -1
        elif kind == "negative_remote_offset":
            ro = -4096
        elif kind == "negative_length":
            n = -5
        else:
            raise AssertionError(kind)
        entries[BAD_INDEX] = (r, lo, d, ro, n)
        self.entries = entries

    def close(self) -> None:
        for x in self.extra:
            x.close()


@pytest.fixture
def case_factory(engine, shared_target, other_target):
    made = []

    def make(kind: str) -> _Case:
        c = _Case(engine, shared_target, other_target, kind)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_local_error_is_refused_before_anything_is_sent(engine, shared_target, case_factory, transport, kind):
    peer = connect(engine, shared_target, transport)
    case = case_factory(kind)
    with pytest.raises(InvalidArgumentError) as ei:
        peer.read(case.entries)
    assert isinstance(ei.value, ValueError)
    assert ei.value.op == "read"
    time.sleep(0.2)  # a read sent anyway would have landed by now
    assert_bytes(case.dst, case.before, "destination of the good entries (nothing may be read)")
    good_read(engine, peer, shared_target)  # the peer is still usable


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_local_error_names_the_entry(engine, shared_target, case_factory, kind):
    """The message says which entry is wrong ("entry 2"), as Peer.read documents. (These
    checks run in ``read`` before any transport is involved: one peer, chosen
    automatically, is enough.)"""
    peer = engine.connect(shared_target.engine)
    case = case_factory(kind)
    with pytest.raises(InvalidArgumentError) as ei:
        peer.read(case.entries)
    assert re.search(rf"\bentry {BAD_INDEX}\b", str(ei.value)), f"message does not name entry {BAD_INDEX}: {ei.value}"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("entries", [[], [("not", "an", "entry")], [(1, 2, 3, 4, 5, 6)]],
                         ids=["empty", "short_tuple", "long_tuple"])
def test_malformed_batch(engine, shared_target, transport, entries):
    peer = connect(engine, shared_target, transport)
    with pytest.raises(InvalidArgumentError):
        peer.read(entries)
    good_read(engine, peer, shared_target)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["negative_local", "negative_remote", "negative_length", "shape_mismatch",
                                  "local_out_of_range", "closed_local", "foreign_remote"])
def test_read_blocks_local_errors(engine, shared_target, other_target, transport, kind):
    peer = connect(engine, shared_target, transport)
    dst, region = alloc_dst(engine, 10 * BLOCK)
    lo = np.arange(10, dtype=np.int64) * BLOCK
    ro = lo + 17
    n: object = BLOCK
    remote = shared_target.region
    if kind == "negative_local":
        lo[3] = -1
    elif kind == "negative_remote":
        ro[3] = -1
    elif kind == "negative_length":
        n = np.full(10, BLOCK)
        n[3] = -1
    elif kind == "shape_mismatch":
        ro = ro[:-1]
    elif kind == "local_out_of_range":
        lo[3] = 10 * BLOCK
    elif kind == "closed_local":
        region.close()
    elif kind == "foreign_remote":
        remote = other_target.region
    dst[:] = 0x3C
    with pytest.raises(InvalidArgumentError):
        peer.read_blocks(region, lo, remote, ro, n)
    time.sleep(0.1)
    assert (dst == 0x3C).all(), "read_blocks refused the batch but bytes were read"
    good_read(engine, peer, shared_target)


@pytest.mark.timeout(30)
def test_read_into_a_deregistered_local_region_is_refused(engine, shared_target, transport):
    """A Region closed after it was used once cannot be read into again."""
    peer = connect(engine, shared_target, transport)
    arr = kvtransfer.alloc_host(BLOCK)
    region, _ = engine.register(arr)
    peer.read([(region, 0, shared_target.region, 0, BLOCK)]).wait(timeout=WAIT_S)
    assert_bytes(arr, shared_target.expected[:BLOCK])
    region.close()
    arr[:] = 0
    with pytest.raises(InvalidArgumentError):
        peer.read([(region, 0, shared_target.region, 0, BLOCK)])
    time.sleep(0.1)
    assert not arr.any()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("api,field,value", [
    ("read", "length", 4096.5),
    ("read", "local_offset", 1.5),
    ("read", "remote_offset", "12"),
    ("read_blocks", "remote_offset", np.array([12.75])),
])
def test_non_integer_offsets_and_lengths_are_invalid(engine, shared_target, api, field, value):
    """Offsets and lengths are byte counts: a float or a string is a mistake to report
    (InvalidArgumentError), not something to truncate or parse and then read with.
    (Checked in ``read`` before any transport: one automatic peer is enough.)"""
    peer = engine.connect(shared_target.engine)
    dst, region = alloc_dst(engine, 2 * BLOCK)
    args = {"local_offset": 0, "remote_offset": 100, "length": BLOCK}
    args[field] = value
    with pytest.raises(InvalidArgumentError):
        if api == "read":
            peer.read([(region, args["local_offset"], shared_target.region, args["remote_offset"], args["length"])])
        else:
            peer.read_blocks(region, np.array([args["local_offset"]]), shared_target.region,
                             args["remote_offset"], args["length"])
    time.sleep(0.1)
    assert not dst.any(), "the batch was refused but bytes were read"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["negative_local", "negative_remote", "local_out_of_range"])
def test_read_blocks_long_batch_names_the_bad_entry(engine, shared_target, transport, kind):
    """A batch long enough for the C core's vectorized check (blocks of 256 entries)
    still names the entry at fault, and reads nothing."""
    n, bad = 1000, 700
    peer = connect(engine, shared_target, transport)
    dst, region = alloc_dst(engine, n * 64)
    lo = np.arange(n, dtype=np.int64) * 64
    ro = lo.copy()
    if kind == "negative_local":
        lo[bad] = -64
    elif kind == "negative_remote":
        ro[bad] = -1
    else:
        lo[bad] = n * 64 - 32
    dst[:] = 0x3C
    with pytest.raises(InvalidArgumentError) as ei:
        peer.read_blocks(region, lo, shared_target.region, ro, 64)
    assert re.search(rf"\bentry {bad}\b", str(ei.value)), ei.value
    time.sleep(0.1)
    assert (dst == 0x3C).all(), "read_blocks refused the batch but bytes were read"
    good_read(engine, peer, shared_target)
