"""CUDA memory end to end (needs a GPU: marked gpu, skipped without CUDA, saying so).

Registration of torch tensors, cupy arrays and DLPack producers (device, PCI bus id,
the allocation holding them); reads between two processes on one GPU over shm (CUDA
IPC + the gather kernel) and tcp (pinned staging on both sides), device<-device and
mixed host/device, with the bytes checked against the seeded source; refusals; the
dma-buf export verbs uses; verbs reporting itself unavailable without an RDMA device.

"The other process" is this file run as a script (``python tests/test_gpu.py target``):
it puts seeded bytes in a CUDA tensor (seed S) and a host buffer (seed S+1), registers
both, prints one JSON line with the descriptors and serves until stdin ends. The
reader is the test process. scripts/gpu_check.sh runs this on the lent GPU machine;
tests/test_gpu_fake.py covers the same C paths without a GPU.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kvtransfer import (Engine, EngineDescriptor, InvalidArgumentError, RegionDescriptor, RemoteAccessError,
                        TransferError, alloc_host)
from kvtransfer.testing.children import start_child, stop_child
from kvtransfer.testing.target import seeded_bytes, serve_device_and_host

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
TARGET_BYTES = 64 * MiB + 4099  # odd on purpose
SEED = 31
WAIT_S = 60.0
STARTUP_S = 120.0


def pythonpath() -> str:
    """This checkout first, then whatever the caller had (carried wheels, say)."""
    return os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))


# --------------------------------------------------------------------------- the target process

def target_main(nbytes: int, seed: int, device: str = "cuda:0", host_memory: str = "private") -> int:
    dev = torch.from_numpy(seeded_bytes(nbytes, seed)).to(device)
    host = alloc_host(nbytes, shared=host_memory == "shared")
    host[:] = seeded_bytes(nbytes, seed + 1)
    torch.cuda.synchronize()
    serve_device_and_host(dev, host)
    return 0


class Target:
    def __init__(self, nbytes: int = TARGET_BYTES, seed: int = SEED, env: dict | None = None,
                 device: str = "cuda:0", host_memory: str = "private"):
        self.nbytes, self.seed = nbytes, seed
        self.proc, hello = start_child([sys.executable, __file__, "target", str(nbytes), str(seed), device,
                                        host_memory],
                                       STARTUP_S, "target", env={"PYTHONPATH": pythonpath(), **(env or {})})
        self.engine = EngineDescriptor.from_bytes(bytes.fromhex(hello["engine"]))
        self.dev = RegionDescriptor.from_bytes(bytes.fromhex(hello["dev"]))
        self.host = RegionDescriptor.from_bytes(bytes.fromhex(hello["host"]))

    def command(self, cmd: str) -> str:
        import queue
        import threading

        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        box: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=lambda: box.put(self.proc.stdout.readline()), daemon=True).start()
        try:
            return box.get(timeout=30).strip()
        except queue.Empty:
            self.close()
            raise AssertionError(f"target did not answer {cmd!r} in 30 s") from None

    def bytes_dev(self) -> np.ndarray:
        return seeded_bytes(self.nbytes, self.seed)

    def bytes_host(self) -> np.ndarray:
        return seeded_bytes(self.nbytes, self.seed + 1)

    def close(self) -> None:
        stop_child(self.proc, 15)


@pytest.fixture(scope="module")
def target():
    t = Target()
    yield t
    t.close()


@pytest.fixture
def reader():
    with Engine(io_timeout=20.0) as eng:
        yield eng


def plan(n_blocks: int, seed: int, sizes=(32768, 4096, 4099, 16, 65536 + 7, 1)) -> tuple:
    """Scattered blocks of mixed sizes (KV-like 32 KiB blocks, odd sizes and offsets):
    local offsets packed from 64, remote offsets anywhere in the target."""
    rng = np.random.default_rng(seed)
    lens = rng.choice(sizes, size=n_blocks).astype(np.int64)
    lo = (np.concatenate([[0], np.cumsum(lens)[:-1]]) + 64).astype(np.int64)
    ro = rng.integers(0, TARGET_BYTES - 70000, size=n_blocks).astype(np.int64)
    odd = rng.random(n_blocks) < 0.5
    ro[~odd] -= ro[~odd] % 16 - lo[~odd] % 16  # half of them agree modulo 16 (the vector path)
    return lo, ro, lens, int(lo[-1] + lens[-1] + 64)


def expect(src: np.ndarray, lo, ro, lens, size: int, poison: int) -> np.ndarray:
    want = np.full(size, poison, np.uint8)
    for a, b, n in zip(lo.tolist(), ro.tolist(), lens.tolist()):
        want[a:a + n] = src[b:b + n]
    return want


def first_difference(got: np.ndarray, want: np.ndarray) -> str:
    bad = np.flatnonzero(got != want)
    return "equal" if len(bad) == 0 else f"{len(bad)} bytes differ, first at {int(bad[0])}"


# --------------------------------------------------------------------------- registration

def test_torch_cuda_tensor_registers_with_its_device():
    with Engine() as eng:
        t = torch.arange(1 << 20, dtype=torch.uint8, device="cuda:0")
        region, desc = eng.register(t)
        assert (desc.device, desc.device_index, desc.nbytes, desc.addr) == ("cuda", 0, 1 << 20, t.data_ptr())
        assert desc.alloc_base <= t.data_ptr() and t.data_ptr() + t.nbytes <= desc.alloc_base + desc.alloc_nbytes
        assert len(desc.pci_bus_id.split(":")) == 3, desc.pci_bus_id
        props = torch.cuda.get_device_properties(0)
        if hasattr(props, "pci_bus_id"):
            assert int(desc.pci_bus_id.split(":")[1], 16) == props.pci_bus_id, (desc.pci_bus_id, props.pci_bus_id)
        assert region.cuda["ipc_status"] == 0, region.cuda
        assert RegionDescriptor.from_bytes(desc.to_bytes()) == desc
        region.close()


def test_cupy_array_registers_through_cuda_array_interface():
    cupy = pytest.importorskip("cupy")
    with Engine() as eng:
        a = cupy.zeros((256, 1024), dtype=cupy.float16)
        _, desc = eng.register(a)
        assert desc.device == "cuda" and desc.device_index == 0 and desc.nbytes == a.nbytes
        assert desc.addr == a.data.ptr and desc.alloc_nbytes >= a.nbytes


def test_dlpack_producer_registers():
    class OnlyDLPack:
        def __init__(self, t):
            self._t = t

        def __dlpack__(self, *args, **kwargs):
            return self._t.__dlpack__(*args, **kwargs)

        def __dlpack_device__(self):
            return self._t.__dlpack_device__()

    t = torch.empty(3 << 20, dtype=torch.uint8, device="cuda:0")[4096:]
    with Engine() as eng:
        _, desc = eng.register(OnlyDLPack(t))
        assert (desc.addr, desc.nbytes, desc.device, desc.device_index) == (t.data_ptr(), t.nbytes, "cuda", 0)
        with pytest.raises(InvalidArgumentError, match="contiguous"):
            eng.register(OnlyDLPack(torch.empty((64, 64), device="cuda:0").t()))


def test_raw_cuda_range_is_checked_by_the_driver():
    host = alloc_host(1 << 16)
    with Engine() as eng:
        with pytest.raises(InvalidArgumentError, match="not CUDA device memory"):
            eng.register((int(host.ctypes.data), host.nbytes, "cuda:0"))
        t = torch.empty(4096, dtype=torch.uint8, device="cuda")
        _, desc = eng.register((t.data_ptr(), 4096, "cuda"))
        assert desc.device_index == 0


def test_batched_copies_are_available():
    """On the GPU machine the gather kernel compiles (NVRTC) or cuMemcpyBatchAsync
    stands in; which one is printed for the record."""
    from kvtransfer import _C

    ok, info = _C.cuda_copy_info()
    print(f"\ncuda copy: {info}")
    assert ok, info


# --------------------------------------------------------------------------- reads between processes

@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_device_to_device_between_processes(target, reader, transport):
    lo, ro, lens, size = plan(3000, seed=1)
    dst = torch.full((size,), 0xA5, dtype=torch.uint8, device="cuda:0")
    torch.cuda.synchronize()  # the engine's copies run on its own streams, not after torch's
    local, _ = reader.register(dst)
    peer = reader.connect(target.engine, transport=transport)
    assert peer.transport == transport
    t0 = time.perf_counter()
    peer.read_blocks(local, lo, target.dev, ro, lens).wait(WAIT_S)
    took = time.perf_counter() - t0
    got = dst.cpu().numpy()
    want = expect(target.bytes_dev(), lo, ro, lens, size, 0xA5)
    assert np.array_equal(got, want), f"{transport}: {first_difference(got, want)}"
    print(f"\n{transport}: 3000 mixed blocks, {int(lens.sum())} bytes, device<-device verified in {took * 1e3:.1f} ms")
    local.close()


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_kv_sized_batch_between_processes(target, reader, transport):
    """2,048 scattered 32 KiB blocks (64 MiB) in one batch: several jobs, several launches.
    Later passes reuse the opened handle, the compiled kernel and each slot's pinned
    and device buffers (each pass must find them free, or it would copy stale blocks)."""
    n, bs = 2048, 32768
    rng = np.random.default_rng(7)
    dst = torch.empty(n * bs, dtype=torch.uint8, device="cuda:0")
    local, _ = reader.register(dst)
    peer = reader.connect(target.engine, transport=transport)
    for _ in range(4):
        perm = rng.permutation(n).astype(np.int64)
        dst.zero_()
        torch.cuda.synchronize()
        peer.read_blocks(local, np.arange(n, dtype=np.int64) * bs, target.dev, perm * bs, bs).wait(WAIT_S)
        got = dst.view(n, bs).cpu().numpy()
        want = target.bytes_dev()[:n * bs].reshape(n, bs)[perm]
        assert np.array_equal(got, want), f"{transport}: {first_difference(got.ravel(), want.ravel())}"
    local.close()


def test_read_blocks_in_flight_and_from_two_threads(target, reader):
    """read_blocks into GPU memory over shm is launched by the calling thread on the
    peer's own lanes (four slots, one caller at a time), and a transport thread waits
    for each copy: eight batches in flight before any wait, then two threads reading at
    once, then the peer closed with a batch in flight. Every batch's blocks are in place
    when its wait returns (the stand-in driver's test shows which thread launched what)."""
    import threading

    n, bs, k = 1024, 32768, 8  # 32 MiB a batch, three jobs each
    rng = np.random.default_rng(11)
    src = target.bytes_dev()
    dst = torch.zeros(k * n * bs, dtype=torch.uint8, device="cuda:0")
    torch.cuda.synchronize()
    local, _ = reader.register(dst)
    peer = reader.connect(target.engine, transport="shm")
    lo = np.arange(n, dtype=np.int64) * bs
    perms = [rng.permutation(n).astype(np.int64) for _ in range(k)]

    def check(i: int) -> None:
        got = dst[i * n * bs:(i + 1) * n * bs].view(n, bs).cpu().numpy()
        want = src[:n * bs].reshape(n, bs)[perms[i]]
        assert np.array_equal(got, want), f"batch {i}: {first_difference(got.ravel(), want.ravel())}"

    for t in [peer.read_blocks(local, lo + i * n * bs, target.dev, perms[i] * bs, bs) for i in range(k)]:
        t.wait(WAIT_S)
    for i in range(k):
        check(i)
    dst.zero_()
    torch.cuda.synchronize()
    errors: list[BaseException] = []

    def loop(i: int) -> None:
        try:
            for _ in range(10):
                peer.read_blocks(local, lo + i * n * bs, target.dev, perms[i] * bs, bs).wait(WAIT_S)
                check(i)  # waited: in place now, whatever the other thread does
        except BaseException as e:  # reported by the test's thread
            errors.append(e)

    threads = [threading.Thread(target=loop, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(2 * WAIT_S)
    assert not any(t.is_alive() for t in threads), "a reading thread hung"
    assert not errors, errors
    # the peer closed with a batch in flight: the read ends (its started copies are
    # waited for), landed in full or cancelled
    dst.zero_()
    torch.cuda.synchronize()
    t = peer.read_blocks(local, lo, target.dev, perms[0] * bs, bs)
    peer.close()
    try:
        t.wait(WAIT_S)
        check(0)
    except TransferError as e:
        assert e.errno == errno.ECANCELED, e
    local.close()


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_mixed_host_and_device_memory(target, reader, transport):
    lo, ro, lens, size = plan(800, seed=2)
    dev_dst = torch.full((size,), 0x5A, dtype=torch.uint8, device="cuda:0")
    torch.cuda.synchronize()
    dev_local, _ = reader.register(dev_dst)
    host_dst = alloc_host(size)
    host_dst[:] = 0x5A
    host_local, _ = reader.register(host_dst)
    peer = reader.connect(target.engine, transport=transport)
    peer.read_blocks(dev_local, lo, target.host, ro, lens).wait(WAIT_S)
    got = dev_dst.cpu().numpy()
    want = expect(target.bytes_host(), lo, ro, lens, size, 0x5A)
    assert np.array_equal(got, want), f"{transport} device<-host: {first_difference(got, want)}"
    peer.read_blocks(host_local, lo, target.dev, ro, lens).wait(WAIT_S)
    want = expect(target.bytes_dev(), lo, ro, lens, size, 0x5A)
    assert np.array_equal(host_dst, want), f"{transport} host<-device: {first_difference(host_dst, want)}"
    dev_local.close()
    host_local.close()


def test_map_peer_reads_cuda_memory_over_shm(reader):
    """A target with host memory in shared memory and a CUDA tensor: map is chosen, and
    batches touching CUDA memory on either side go over shm, byte for byte."""
    target = Target(host_memory="shared")
    try:
        lo, ro, lens, size = plan(800, seed=4)
        dev_dst = torch.full((size,), 0x5A, dtype=torch.uint8, device="cuda:0")
        torch.cuda.synchronize()
        dev_local, _ = reader.register(dev_dst)
        host_dst = alloc_host(size)
        host_local, _ = reader.register(host_dst)
        peer = reader.connect(target.engine)
        assert peer.transport == "map"
        for local, src, name in ((host_local, target.host, "host<-host"), (host_local, target.dev, "host<-CUDA"),
                                 (dev_local, target.host, "CUDA<-host"), (dev_local, target.dev, "CUDA<-CUDA")):
            host_dst[:] = 0x5A
            dev_dst.fill_(0x5A)
            torch.cuda.synchronize()
            peer.read_blocks(local, lo, src, ro, lens).wait(WAIT_S)
            got = host_dst if local is host_local else dev_dst.cpu().numpy()
            want = expect(target.bytes_host() if src is target.host else target.bytes_dev(), lo, ro, lens, size, 0x5A)
            assert np.array_equal(got, want), f"map peer, {name}: {first_difference(got, want)}"
        dev_local.close()
        host_local.close()
    finally:
        target.close()


def test_same_process_engines_over_shm_and_tcp():
    src = torch.from_numpy(seeded_bytes(8 * MiB, 5)).to("cuda:0")
    dst = torch.zeros(8 * MiB, dtype=torch.uint8, device="cuda:0")
    torch.cuda.synchronize()
    with Engine() as a, Engine() as b:
        sregion, sdesc = a.register(src)
        local, _ = b.register(dst)
        offs = np.arange(256, dtype=np.int64) * 32768
        for transport in ("shm", "tcp"):
            dst.zero_()
            torch.cuda.synchronize()
            peer = b.connect(a.descriptor, transport=transport)
            peer.read_blocks(local, offs, sdesc, offs[::-1].copy(), 32768).wait(WAIT_S)
            assert torch.equal(dst.view(256, -1), src.view(256, -1).flip(0)), transport


def test_refusals_on_cuda_regions(target, reader):
    import msgspec

    dst = torch.zeros(MiB, dtype=torch.uint8, device="cuda:0")
    local, _ = reader.register(dst)
    for transport in ("shm", "tcp"):
        peer = reader.connect(target.engine, transport=transport)
        bad_key = msgspec.structs.replace(target.dev, key=target.dev.key ^ 1)
        for entry, code in (((local, 0, bad_key, 0, 4096), errno.EACCES),
                            ((local, 0, target.dev, target.nbytes - 10, 4096), errno.ERANGE)):
            with pytest.raises(RemoteAccessError) as ei:
                peer.read([(local, 8192, target.dev, 0, 4096), entry]).wait(WAIT_S)
            assert ei.value.errno == code and ei.value.entry == 1, (transport, ei.value)
    local.close()


def test_reads_of_a_deregistered_cuda_region_fail():
    t = Target(nbytes=4 * MiB, seed=3)
    try:
        with Engine() as eng:
            dst = torch.zeros(MiB, dtype=torch.uint8, device="cuda:0")
            local, _ = eng.register(dst)
            peers = [eng.connect(t.engine, transport=x) for x in ("shm", "tcp")]
            for p in peers:
                p.read([(local, 0, t.dev, 0, 65536)]).wait(WAIT_S)
            assert t.command("deregister") == "deregistered"
            for p in peers:
                with pytest.raises(TransferError) as ei:
                    p.read([(local, 0, t.dev, 0, 65536)]).wait(WAIT_S)
                assert ei.value.errno in (errno.ENOENT, errno.ESTALE), ei.value
    finally:
        t.close()


def test_cuMemcpyBatchAsync_fallback_when_forced():
    """KVTRANSFER_CUDA_COPY=batch in a fresh process: the driver's batched copy instead
    of the kernel (what runs where NVRTC is missing)."""
    from kvtransfer import _C

    ok, info = _C.cuda_copy_info()
    if "cuMemcpyBatchAsync available" not in info:
        pytest.skip(f"this driver has no cuMemcpyBatchAsync: {info}")
    env = {**os.environ, "PYTHONPATH": pythonpath(), "KVTRANSFER_CUDA_COPY": "batch"}
    p = subprocess.run([sys.executable, __file__, "reader-batch"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def reader_batch_main() -> int:
    t = Target(nbytes=8 * MiB, seed=4, env={"KVTRANSFER_CUDA_COPY": ""})
    try:
        with Engine() as eng:
            n, bs = 256, 32768
            perm = np.random.default_rng(3).permutation(n).astype(np.int64)
            dst = torch.zeros(n * bs, dtype=torch.uint8, device="cuda:0")
            torch.cuda.synchronize()
            local, _ = eng.register(dst)
            peer = eng.connect(t.engine, transport="shm")
            peer.read_blocks(local, np.arange(n, dtype=np.int64) * bs, t.dev, perm * bs, bs).wait(WAIT_S)
            want = t.bytes_dev()[:n * bs].reshape(n, bs)[perm]
            assert np.array_equal(dst.view(n, bs).cpu().numpy(), want)
    finally:
        t.close()
    print("batch mode verified")
    return 0


# --------------------------------------------------------------------------- dma-buf, verbs

@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_reads_from_another_gpu(reader, transport):
    """The target's memory on cuda:1, the reader's on cuda:0: shm opens the IPC handle on
    the reader's device and the gather kernel reads over peer access; tcp stages. (The
    target registers its cuda:1 memory while cuda:0 is current: its staging kernel must
    still load into cuda:1's context. It did not, once, and tcp reads of it failed.)"""
    t = Target(device="cuda:1")
    try:
        assert (t.dev.device, t.dev.device_index) == ("cuda", 1)
        lo, ro, lens, size = plan(3000, 11)
        dst = torch.full((size,), 0x5A, dtype=torch.uint8, device="cuda:0")
        torch.cuda.synchronize()  # the engine's copies run on its own streams, not after torch's
        region, _ = reader.register(dst)
        peer = reader.connect(t.engine, transport=transport)
        peer.read_blocks(region, lo, t.dev, ro, lens).wait(WAIT_S)
        got = dst.cpu().numpy()
        want = expect(t.bytes_dev(), lo, ro, lens, size, 0x5A)
        assert np.array_equal(got, want), first_difference(got, want)
        region.close()
    finally:
        t.close()


def test_dmabuf_export_of_a_torch_allocation():
    """What the verbs transport registers GPU memory with: a dma-buf of the allocation
    (cuMemGetHandleForAddressRange), and where the tensor lies in it."""
    from kvtransfer import _C

    t = torch.empty(4 << 20, dtype=torch.uint8, device="cuda")
    offset = _C.cuda_dmabuf(t.data_ptr() + 8192, 4096)
    assert offset >= 8192 and offset % 4096 == (t.data_ptr() + 8192) % 4096


def test_verbs_without_an_rdma_device_is_unavailable_cleanly():
    from kvtransfer import TransportUnavailableError

    with Engine() as a, Engine() as b:
        if a.verbs_unavailable is None:
            pytest.skip(f"this machine has an RDMA device ({a.descriptor.ib_device})")
        assert a.verbs_unavailable and not a.descriptor.verbs
        with pytest.raises(TransportUnavailableError, match="verbs is unavailable"):
            a.connect(b.descriptor, transport="verbs")
        assert a.connect(b.descriptor).transport == "shm"


if __name__ == "__main__":
    if sys.argv[1] == "target":
        sys.exit(target_main(int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:6]))
    if sys.argv[1] == "reader-batch":
        sys.exit(reader_batch_main())
    sys.exit(f"unknown command {sys.argv[1:]}")


# --------------------------------------------------------------------------- the vLLM connector's core

@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC", "flash"])
@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_kv_cache_source_to_sink_with_cuda_caches(layout, transport):
    """KVCacheSource in a child and KVCacheSink here, both over CUDA KV caches in vLLM's GPU
    shapes (connector_support.make_caches): pulled pages equal the seeded source's."""
    import json as _json

    sys.path.insert(0, str(ROOT / "tests"))
    from connector_support import JsonChild, block, make_caches

    from kvtransfer.connector.core import KVCacheSink

    shape = dict(num_layers=3, heads=4, block_size=16, head_dim=64)
    cfg = {"src": {"layout": layout, "seed": 5, "num_blocks": 64, "model": "m", "device": "cuda:0", **shape}}
    child = JsonChild(["tests/kv_source_child.py", _json.dumps(cfg)], what="kv source", ready_timeout=STARTUP_S,
                      env={"PYTHONPATH": pythonpath()})
    try:
        src_ids, dst_ids = [40, 3, 17, 63, 8], [0, 99, 5, 6, 7]
        child.call(op="serve", source="src", request_id="r", blocks=src_ids, num_tokens=4 * 16 + 3)
        got = make_caches(layout, num_blocks=100, device="cuda:0", **shape)
        with KVCacheSink(got, model="m", transport=transport, timeout=30) as sink:
            sink.start("r", child.ready["endpoints"]["src"], "r", dst_ids)
            sink.wait(["r"], WAIT_S)
            finished, failed = sink.take_done()
        assert failed == {} and finished == {"r"}
        want = make_caches(layout, num_blocks=64, seed=5, **shape)  # the same seeded values, on the CPU
        for lw, lg in zip(want, got):
            for s, d in zip(src_ids, dst_ids):
                assert torch.equal(block(lg, layout, d).cpu(), block(lw, layout, s)), (layout, s, d)
            assert not block(lg, layout, 1).any()
    finally:
        child.stop()
