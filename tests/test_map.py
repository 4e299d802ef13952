"""What only the map transport does: it maps a peer's shared-memory region once, drops
the mapping once the region is deregistered (and refuses the read although the mapping
was still there), and reads regions that are not in shared memory, or in a file not
sealed against shrinking, with process_vm_readv. The transfer suite (tests
parametrized over ``transport``) runs against map as against every other transport.

Some tests run this file as a script: ``target`` (a region in a memfd of its own
making, see :func:`target_main`) and ``shrink-reader`` (a reader that may crash)."""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import numpy as np
import pytest

import kvtransfer
from kvtransfer import RemoteAccessError
from support import WAIT_S, alloc_dst, assert_bytes, connect, plan

MiB = 1 << 20
CHILD_S = 60.0


def memfd_mappings(name: str = "kvtransfer-shared") -> int:
    """Mappings of memfd ``name`` in this process."""
    with open("/proc/self/maps") as f:
        return sum(f"/memfd:{name}" in line for line in f)


def memfd_of(arr: np.ndarray) -> int:
    """This process's fd of the memfd that backs ``arr``."""
    with open("/proc/self/maps") as f:
        for line in f:
            span, _, _, _, inode = line.split()[:5]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= arr.ctypes.data < hi:
                break
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("/memfd:") and os.fstat(int(name)).st_ino == int(inode):
                return int(name)
        except OSError:  # the listing's own fd, closed by now
            continue
    raise AssertionError("no fd of the array's memfd")


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


@pytest.mark.timeout(60)
def test_shared_memory_is_sealed_and_mapped(engine, engine_factory):
    """alloc_host(shared=True) cannot shrink under a reader (F_SEAL_SHRINK), and map maps it."""
    arr = kvtransfer.alloc_host(MiB, shared=True)
    arr[:] = np.random.default_rng(3).integers(0, 256, MiB, dtype=np.uint8)
    fd = memfd_of(arr)
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
    with pytest.raises(PermissionError):
        os.ftruncate(fd, 0)
    target = engine_factory()
    sreg, sdesc = target.register(arr)
    peer = engine.connect(target.descriptor, transport="map")
    before = memfd_mappings()
    dst, region = alloc_dst(engine, MiB)
    peer.read([(region, 0, sdesc, 0, MiB)]).wait(WAIT_S)
    assert_bytes(dst, arr)
    assert memfd_mappings() == before + 1, "the sealed region is mapped"
    sreg.close()


def test_file_shrunk_by_its_target_fails_the_read_not_the_reader():
    """A region in a memfd without seals: read with process_vm_readv, not mapped; once the
    target cuts the file in half, a paged read with block 999 in the cut half fails
    with EFAULT naming that block, over map as over shm, and the reader lives (a
    mapping would have taken SIGBUS)."""
    p = subprocess.run([sys.executable, __file__, "shrink-reader"], capture_output=True, text=True,
                       timeout=2 * CHILD_S, env={**os.environ, "PYTHONPATH": pythonpath()})
    assert p.returncode == 0, f"reader exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    assert "shrunk: refused over map" in p.stdout, p.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bad", [999, 2500])
def test_paged_batch_names_the_block_out_of_bounds(engine, shared_target, bad):
    """Over map as over shm, whichever job holds it."""
    dst, region = alloc_dst(engine, 3000 * 64)
    lo = np.arange(3000, dtype=np.int64) * 64
    ro = lo.copy()
    ro[bad] = shared_target.nbytes - 32
    for transport in ("map", "shm"):
        peer = connect(engine, shared_target, transport)
        with pytest.raises(RemoteAccessError) as ei:
            peer.read_blocks(region, lo, shared_target.region, ro, 64).wait(WAIT_S)
        assert (ei.value.errno, ei.value.entry) == (errno.ERANGE, bad), (transport, ei.value)


@pytest.mark.timeout(120)
def test_region_of_a_process_with_many_files_is_mapped(engine):
    """The region's fd is found whatever its number (here above 4,096)."""
    import resource

    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < MANY_FDS + 256:
        pytest.skip(f"RLIMIT_NOFILE's hard limit is below {MANY_FDS + 256}")
    from kvtransfer import EngineDescriptor, RegionDescriptor
    from kvtransfer.testing.children import start_child, stop_child
    from kvtransfer.testing.target import seeded_bytes

    proc, hello = start_child([sys.executable, __file__, "target", "sealed", f"fds={MANY_FDS}"], CHILD_S,
                              "target with many files", env={"PYTHONPATH": pythonpath()})
    try:
        assert hello["fd"] > 4096, hello
        peer = engine.connect(EngineDescriptor.from_bytes(bytes.fromhex(hello["engine"])))
        assert peer.transport == "map", peer.transport
        before = memfd_mappings()
        dst, region = alloc_dst(engine, MiB)
        peer.read([(region, 0, RegionDescriptor.from_bytes(bytes.fromhex(hello["region"])), 0, MiB)]).wait(WAIT_S)
        assert_bytes(dst, seeded_bytes(MiB, 7))
        assert memfd_mappings() == before + 1, "the region was not mapped"
    finally:
        stop_child(proc, CHILD_S)


# ---------------------------------------------------------------------- the child side

MANY_FDS = 4200

def pythonpath() -> str:
    here = Path(__file__).resolve().parent
    extra = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
    return os.pathsep.join([str(here.parent), str(here)] + extra)


def target_main(args: list[str]) -> int:
    """A target with one region of ``MiB`` seeded bytes (seed 7) in a memfd it made
    itself, without seals (``sealed``: from alloc_host(shared=True)), after opening
    ``fds=N`` files (N: how many); stdin ``truncate`` cuts the file in half."""
    import resource

    from kvtransfer import Engine
    from kvtransfer.testing.target import seeded_bytes

    opts = dict(a.split("=") for a in args if "=" in a)
    n = int(opts.get("fds", 0))
    if n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n + 256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    held = [os.open("/dev/null", os.O_RDONLY) for _ in range(n)]
    if "sealed" in args:
        arr = seeded_bytes(MiB, 7, kvtransfer.alloc_host(MiB, shared=True))
        fd = memfd_of(arr)
    else:
        fd = os.memfd_create("kvtransfer-unsealed", os.MFD_CLOEXEC)
        os.ftruncate(fd, MiB)
        m = mmap.mmap(fd, MiB, flags=mmap.MAP_SHARED)
        arr = seeded_bytes(MiB, 7, np.frombuffer(m, dtype=np.uint8))
    for h in held:
        os.close(h)
    with Engine() as eng:
        _reg, desc = eng.register(arr)
        print(json.dumps({"engine": eng.descriptor.to_bytes().hex(), "region": desc.to_bytes().hex(), "fd": fd}),
              flush=True)
        for line in sys.stdin:
            if line.strip() == "truncate":
                os.ftruncate(fd, MiB // 2)
                print("truncated", flush=True)
    return 0


def shrink_reader_main() -> int:
    from kvtransfer import Engine, EngineDescriptor, RegionDescriptor, TransferError
    from kvtransfer.testing.children import start_child, stop_child
    from kvtransfer.testing.target import seeded_bytes

    proc, hello = start_child([sys.executable, __file__, "target"], CHILD_S, "unsealed target")
    try:
        edesc = EngineDescriptor.from_bytes(bytes.fromhex(hello["engine"]))
        rdesc = RegionDescriptor.from_bytes(bytes.fromhex(hello["region"]))
        with Engine() as eng:
            dst = kvtransfer.alloc_host(MiB)
            local, _ = eng.register(dst)
            assert eng.connect(edesc).transport == "shm", "an unsealed file was offered for mapping"
            peer = eng.connect(edesc, transport="map")
            peer.read([(local, 0, rdesc, 0, MiB)]).wait(CHILD_S)
            assert np.array_equal(dst, seeded_bytes(MiB, 7)), "the unsealed region read wrong bytes"
            assert memfd_mappings("kvtransfer-unsealed") == 0, "an unsealed file was mapped"
            proc.stdin.write("truncate\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "truncated"
            lo = np.arange(1200, dtype=np.int64) * 64
            ro = lo.copy()
            ro[999] = MiB // 2 + 4096  # cut off
            for transport in ("map", "shm"):
                other = eng.connect(edesc, transport=transport)
                try:
                    other.read_blocks(local, lo, rdesc, ro, 64).wait(CHILD_S)
                    raise AssertionError("a read of a truncated file succeeded")
                except TransferError as e:
                    assert (e.errno, e.entry) == (errno.EFAULT, 999), (transport, e)
                    print(f"shrunk: refused over {transport}: {e}")
            local.close()
    finally:
        stop_child(proc, CHILD_S)
    return 0


if __name__ == "__main__":
    sys.exit(target_main(sys.argv[2:]) if sys.argv[1] == "target" else shrink_reader_main())
