"""What only the map transport does: it maps a peer's shared-memory region once, drops
the mapping once the region is deregistered (and refuses the read although the mapping
was still there), and reads regions that are not in shared memory with
process_vm_readv. The transfer suite (tests parametrized over ``transport``) runs
against map as against every other transport."""

from __future__ import annotations

import errno

import msgspec
import numpy as np
import pytest

import kvtransfer
from kvtransfer import RemoteAccessError
from support import WAIT_S, alloc_dst, assert_bytes, connect, plan

MiB = 1 << 20


def memfd_mappings() -> int:
    """Mappings of kvtransfer's shared memory in this process."""
    with open("/proc/self/maps") as f:
        return sum("/memfd:kvtransfer-shared" in line for line in f)


@pytest.mark.timeout(60)
def test_deregistered_region_is_refused_and_unmapped(engine, start_target):
    target = start_target(4 * MiB, 5)
    before = memfd_mappings()
    peer = connect(engine, target, "map")
    dst, region = alloc_dst(engine, 2 * MiB)
    want = plan(dst, target.expected, [0, MiB], [3 * MiB, 5], [MiB, MiB])
    peer.read([(region, 0, target.region, 3 * MiB, MiB), (region, MiB, target.region, 5, MiB)]).wait(WAIT_S)
    assert_bytes(dst, want)
    assert memfd_mappings() == before + 1, "the region is mapped once"
    target.deregister()
    with pytest.raises(RemoteAccessError) as ei:
        peer.read([(region, 0, target.region, 0, 4096)]).wait(WAIT_S)
    assert ei.value.errno == errno.ENOENT and ei.value.entry == 0
    assert memfd_mappings() == before, "the deregistered region's mapping is dropped at the next read"


@pytest.mark.timeout(60)
def test_private_region_of_a_map_peer_is_read_with_process_vm_readv(engine, engine_factory):
    """A peer with one region in shared memory and one not: map reaches it, and reads
    both, byte for byte, in one batch."""
    target = engine_factory()
    rng = np.random.default_rng(11)
    shared = kvtransfer.alloc_host(MiB, shared=True)
    private = kvtransfer.alloc_host(MiB)
    shared[:] = rng.integers(0, 256, MiB, dtype=np.uint8)
    private[:] = rng.integers(0, 256, MiB, dtype=np.uint8)
    sreg, sdesc = target.register(shared)  # the regions live as long as their handles
    preg, pdesc = target.register(private)
    peer = engine.connect(target.descriptor)
    assert peer.transport == "map"
    dst, region = alloc_dst(engine, 2 * MiB)
    want = dst.copy()
    want[:4096], want[MiB:MiB + 4096] = shared[8192:12288], private[100:4196]
    peer.read([(region, 0, sdesc, 8192, 4096), (region, MiB, pdesc, 100, 4096)]).wait(WAIT_S)
    assert_bytes(dst, want)
    sreg.close()
    preg.close()


@pytest.mark.timeout(60)
def test_wrong_key_is_refused_although_mapped(engine, shared_target):
    peer = connect(engine, shared_target, "map")
    dst, region = alloc_dst(engine, MiB)
    peer.read([(region, 0, shared_target.region, 0, 4096)]).wait(WAIT_S)  # mapped now
    wrong = msgspec.structs.replace(shared_target.region, key=shared_target.region.key ^ 1)
    with pytest.raises(RemoteAccessError) as ei:
        peer.read([(region, 0, shared_target.region, 0, 4096), (region, 4096, wrong, 0, 4096)]).wait(WAIT_S)
    assert ei.value.errno == errno.EACCES and ei.value.entry == 1
