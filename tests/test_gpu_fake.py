"""The CUDA paths, on any machine: the C core against a stand-in driver.

tests/c/fake_cuda.c builds a fake ``libcuda.so.1`` (device memory a memfd whose
handed-out address is PROT_NONE, so host code touching it crashes; IPC handles that
another process opens through /proc; synchronous streams; a "kernel" that performs
the gather its descriptors describe) and a fake ``libnvrtc``. Each test runs this file
as a script in a child process whose loader finds the fakes (the pytest process may
already have looked for the real driver), and the child starts a target process of
its own: registration records the allocation and IPC handle, shm opens it and copies
with batched launches, tcp stages through pinned buffers, mixed host/CUDA reads,
refusals, and the reasons given when IPC or a batched copy is unavailable. What the
fakes cannot show (the driver's semantics, the kernel itself, speed) is left to
tests/test_gpu.py on a GPU.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
CHILD_TIMEOUT_S = 120

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the fake driver")


@pytest.fixture(scope="module")
def fakes(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fake_cuda")
    src = str(ROOT / "tests/c/fake_cuda.c")
    cc = ["cc", "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-Wno-unused-parameter"]
    (d / "batch").mkdir()
    (d / "nobatch").mkdir()
    subprocess.run(cc + ["-o", str(d / "batch/libcuda.so.1"), src], check=True, timeout=60)
    subprocess.run(cc + ["-DFAKE_NO_BATCH", "-o", str(d / "nobatch/libcuda.so.1"), src], check=True, timeout=60)
    subprocess.run(cc + ["-DFAKE_NVRTC", "-o", str(d / "libnvrtc-fake.so"), src], check=True, timeout=60)
    return d


def run(fakes: Path, scenario: str, *, batch: bool = True, nvrtc: bool = True, **env: str) -> str:
    e = dict(os.environ)
    e.pop("KVTRANSFER_TRANSPORT", None)
    e.pop("KVTRANSFER_CUDA_COPY", None)
    e["LD_LIBRARY_PATH"] = str(fakes / ("batch" if batch else "nobatch"))
    # without NVRTC: "none", not a wrong path, or a machine's own libnvrtc would be found
    # (and a real NVRTC does not work beside the fake driver)
    e["KVTRANSFER_NVRTC"] = str(fakes / "libnvrtc-fake.so") if nvrtc else "none"
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    e.update(env)
    p = subprocess.run([sys.executable, __file__, scenario], env=e, capture_output=True, text=True,
                       timeout=CHILD_TIMEOUT_S)
    assert p.returncode == 0, f"child {scenario} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}"
    return p.stdout


def test_registration_records_the_allocation(fakes):
    run(fakes, "register")


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_device_to_device_across_processes(fakes, transport):
    out = run(fakes, f"read-{transport}")
    assert "launches" in out


def kernel_descriptors(out: str) -> int:
    m = re.search(r"kernel descriptors: (\d+)", out)
    assert m, out
    return int(m.group(1))


@pytest.mark.parametrize("copy", ["kernel", "batch"])
def test_read_blocks_launch_offset_columns(fakes, copy):
    """read_blocks with one length: the kernel that reads the offset columns copies
    them (a few launches for 20,000 blocks; blocks longer than a descriptor's 32 KiB
    too); a block out of bounds in a later job is named; from host memory, the
    descriptor path. In batch mode (no kernel) the same reads go through
    cuMemcpyBatchAsync."""
    out = run(fakes, "blocks", KVTRANSFER_CUDA_COPY=copy)
    assert "blocks ok" in out, out


def test_read_blocks_launched_by_the_caller(fakes):
    """read_blocks into device memory from device memory: the calling thread launches
    the first copy itself (no hand-off to a transport thread before the GPU starts);
    batches in flight beyond the caller's slots, two calling threads at once, and a
    peer closed with a batch in flight all end with every block in place."""
    out = run(fakes, "direct")
    assert "direct ok" in out, out


def test_batched_copies_without_nvrtc_use_memcpy_batch(fakes):
    out = run(fakes, "read-shm", nvrtc=False)
    assert "no gather kernel: NVRTC disabled" in out and "cuMemcpyBatchAsync available" in out, out
    assert kernel_descriptors(out) == 0, out


def test_forced_batch_mode(fakes):
    """KVTRANSFER_CUDA_COPY=batch: the reads copy with cuMemcpyBatchAsync, the gather
    kernel copies nothing (by default, with NVRTC, it copies every block)."""
    out = run(fakes, "read-shm", KVTRANSFER_CUDA_COPY="batch")
    assert "KVTRANSFER_CUDA_COPY=batch" in out, out
    assert kernel_descriptors(out) == 0, out
    out = run(fakes, "read-shm")
    assert kernel_descriptors(out) > 0, out


def test_no_batched_copy_at_all_is_refused_clearly(fakes):
    run(fakes, "no-copy", batch=False, nvrtc=False)


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_mixed_host_and_device_memory(fakes, transport):
    run(fakes, f"mixed-{transport}")


def test_same_process_engines(fakes):
    run(fakes, "same-process")


def test_target_without_ipc_handles(fakes):
    run(fakes, "no-ipc", FAKE_CUDA_NO_IPC="1")


def test_refusals_over_shm(fakes):
    run(fakes, "refusals")


def test_map_peer_hands_cuda_batches_to_shm(fakes):
    """A target with a region in shared memory and a CUDA region: map is chosen, and
    reads touching CUDA memory on either side still work (over shm, in one batch)."""
    out = run(fakes, "map-cuda")
    assert "map: host and CUDA reads verified" in out, out


# ---------------------------------------------------------------------- the child side

class FakeGPU:
    """Allocations and copies through the fake driver this process loaded."""

    def __init__(self) -> None:
        self.cu = ctypes.CDLL("libcuda.so.1")
        self.cu.cuInit(0)
        self.keep: list[int] = []

    def alloc(self, nbytes: int) -> int:
        p = ctypes.c_uint64()
        assert self.cu.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(nbytes)) == 0
        return p.value

    def upload(self, dst: int, data: np.ndarray) -> None:
        assert self.cu.cuMemcpyHtoD_v2(ctypes.c_uint64(dst), data.ctypes.data_as(ctypes.c_void_p),
                                       ctypes.c_size_t(data.nbytes)) == 0

    def download(self, src: int, nbytes: int) -> np.ndarray:
        out = np.empty(nbytes, np.uint8)
        assert self.cu.cuMemcpyDtoH_v2(out.ctypes.data_as(ctypes.c_void_p), ctypes.c_uint64(src),
                                       ctypes.c_size_t(nbytes)) == 0
        return out

    def launches(self) -> int:
        self.cu.fake_cuda_launches.restype = ctypes.c_ulong
        return self.cu.fake_cuda_launches()

    def cols_launches(self) -> int:
        """Launches of the kernel that reads read_blocks' offset columns."""
        self.cu.fake_cuda_cols_launches.restype = ctypes.c_ulong
        return self.cu.fake_cuda_cols_launches()

    def cols_threads(self) -> list[int]:
        """The threads (native ids) that made column launches since the last call, the
        first one first."""
        out = (ctypes.c_ulong * 16)()
        n = self.cu.fake_cuda_cols_threads(out)
        return list(out[:n])

    def descs(self) -> int:
        """Descriptors the fake gather kernel copied in this process (cuMemcpyBatchAsync
        calls are not counted)."""
        self.cu.fake_cuda_descs.restype = ctypes.c_ulong
        return self.cu.fake_cuda_descs()


TARGET_BYTES = 3 << 20
TARGET_START_S = 60.0  # the target's JSON line
TARGET_REPLY_S = 30.0  # its answer to a command
TARGET_STOP_S = 30.0  # its exit after end of stdin, then it is killed


def child_target(shared: bool = False) -> int:
    """Serves a fake-device buffer (seed 1) and a host buffer (seed 2; in shared memory
    if ``shared``); stdin commands: ``deregister`` (the device region), end of stdin exits."""
    from kvtransfer import alloc_host
    from kvtransfer.testing.target import seeded_bytes, serve_device_and_host

    gpu = FakeGPU()
    dev = gpu.alloc(TARGET_BYTES)
    gpu.upload(dev, seeded_bytes(TARGET_BYTES, 1))
    host = alloc_host(TARGET_BYTES, shared=True) if shared else None
    serve_device_and_host((dev, TARGET_BYTES, "cuda:0"), seeded_bytes(TARGET_BYTES, 2, host))
    return 0


class Reader:
    """What a reader scenario works with: the fake GPU, the target process and its
    descriptors, this process's engine, a poisoned (0xEE) device buffer registered
    as ``local`` and a connection ``peer`` to the target."""

    gpu: "FakeGPU"
    proc: subprocess.Popen
    edesc: object
    ddesc: object
    hdesc: object
    eng: object
    dst: int
    size: int
    local: object
    peer: object

    def poison(self) -> None:
        self.gpu.upload(self.dst, np.full(self.size, 0xEE, np.uint8))

    def command(self, cmd: str) -> str:
        """Sends ``cmd`` to the target and returns its one-line answer, waiting at most
        TARGET_REPLY_S (a hung target is killed on leaving :func:`reader`)."""
        import queue
        import threading

        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        box: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=lambda: box.put(self.proc.stdout.readline()), daemon=True).start()
        try:
            return box.get(timeout=TARGET_REPLY_S).strip()
        except queue.Empty:
            raise AssertionError(f"the target did not answer {cmd!r} in {TARGET_REPLY_S} s") from None


@contextmanager
def reader(size: int, transport: str | None = "shm", target: str = "target"):
    """Starts the target (the ``target`` scenario; its JSON line awaited at most
    TARGET_START_S) and an engine with a poisoned device buffer of ``size`` bytes
    connected to it over ``transport`` (None: the automatic choice); on the way out
    closes the engine, then ends the target's stdin and kills it if it has not exited
    within TARGET_STOP_S."""
    from kvtransfer import Engine, EngineDescriptor, RegionDescriptor
    from kvtransfer.testing.children import start_child, stop_child

    r = Reader()
    r.gpu = FakeGPU()
    r.proc, hello = start_child([sys.executable, __file__, target], TARGET_START_S, "fake-GPU target")
    try:
        r.edesc = EngineDescriptor.from_bytes(bytes.fromhex(hello["engine"]))
        r.ddesc = RegionDescriptor.from_bytes(bytes.fromhex(hello["dev"]))
        r.hdesc = RegionDescriptor.from_bytes(bytes.fromhex(hello["host"]))
        with Engine() as eng:
            r.eng, r.size = eng, size
            r.dst = r.gpu.alloc(size)
            r.poison()
            r.local, _ = eng.register((r.dst, size, "cuda:0"))
            r.peer = eng.connect(r.edesc, transport=transport)
            yield r
    finally:
        stop_child(r.proc, TARGET_STOP_S)


def scatter_plan(n_blocks: int, rng: np.random.Generator):
    """Blocks of mixed sizes (aligned and odd) at scattered remote offsets, packed
    locally: (local offsets, remote offsets, lengths)."""
    lens = rng.choice([64, 1024, 4096, 4099, 777, 16], size=n_blocks).astype(np.int64)
    lo = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64) + 3
    ro = rng.integers(0, TARGET_BYTES - 5000, size=n_blocks).astype(np.int64)
    return lo, ro, lens


def check(got: np.ndarray, src: np.ndarray, lo, ro, lens, what: str) -> None:
    for i in range(len(lo)):
        a, b, n = int(lo[i]), int(ro[i]), int(lens[i])
        if not np.array_equal(got[a:a + n], src[b:b + n]):
            raise AssertionError(f"{what}: block {i} (local {a}, remote {b}, {n} bytes) differs")


def child_read(transport: str) -> int:
    from kvtransfer import _C
    from kvtransfer.testing.target import seeded_bytes

    rng = np.random.default_rng(5)
    lo, ro, lens = scatter_plan(6000, rng)  # several jobs, several launches each
    size = int(lo[-1] + lens[-1]) + 64
    with reader(size, transport) as r:
        gpu, local, ddesc, peer = r.gpu, r.local, r.ddesc, r.peer
        before, descs_before = gpu.launches(), gpu.descs()
        peer.read_blocks(local, lo, ddesc, ro, lens).wait(30)
        got = gpu.download(r.dst, size)
        check(got, seeded_bytes(TARGET_BYTES, 1), lo, ro, lens, f"{transport} device<-device")
        assert got[:3].tolist() == [0xEE] * 3 and (got[int(lo[-1] + lens[-1]):] == 0xEE).all(), "poison touched"
        launches = gpu.launches() - before
        if transport == "shm":
            assert 0 < launches < 40, f"{launches} launches for 6000 blocks: not batched"
        # a plain read() (packed requests) works the same way
        peer.read([(local, 0, ddesc, 100, 5000)]).wait(30)
        assert np.array_equal(gpu.download(r.dst, 5000), seeded_bytes(TARGET_BYTES, 1)[100:5100])
        # descriptors the gather kernel copied in this process (over shm the reader copies;
        # over tcp the target stages and the reader uploads): test_forced_batch_mode reads it
        descs = gpu.descs() - descs_before
        print(f"{transport}: 6000 blocks verified, {launches} launches; kernel descriptors: {descs}; "
              f"copy: {_C.cuda_copy_info()[1]}")
        # the target deregisters: reads fail, nothing crashes
        assert r.command("deregister") == "deregistered"
        try:
            peer.read([(local, 0, ddesc, 0, 4096)]).wait(30)
            raise AssertionError("read of a deregistered region succeeded")
        except Exception as e:
            assert getattr(e, "errno", None) in (errno.ENOENT, errno.ESTALE), e
    return 0


def child_mixed(transport: str) -> int:
    from kvtransfer import alloc_host
    from kvtransfer.testing.target import seeded_bytes

    rng = np.random.default_rng(9)
    lo, ro, lens = scatter_plan(1500, rng)
    size = int(lo[-1] + lens[-1]) + 64
    with reader(size, transport) as r:
        gpu, dev_local, ddesc, hdesc, peer = r.gpu, r.local, r.ddesc, r.hdesc, r.peer
        host_dst = alloc_host(size)
        host_local, _ = r.eng.register(host_dst)
        # device <- host memory of the target
        peer.read_blocks(dev_local, lo, hdesc, ro, lens).wait(30)
        check(gpu.download(r.dst, size), seeded_bytes(TARGET_BYTES, 2), lo, ro, lens, f"{transport} device<-host")
        # host <- device memory of the target
        peer.read_blocks(host_local, lo, ddesc, ro, lens).wait(30)
        check(host_dst, seeded_bytes(TARGET_BYTES, 1), lo, ro, lens, f"{transport} host<-device")
        # one batch mixing both sources into device memory (poisoned again: the first
        # read left the host half's bytes there already)
        r.poison()
        half = len(lo) // 2
        t = peer.read_indexed([dev_local], np.zeros(len(lo), np.int64), lo, [ddesc, hdesc],
                              (np.arange(len(lo)) >= half).astype(np.int64), ro, lens)
        t.wait(30)
        got = gpu.download(r.dst, size)
        check(got, seeded_bytes(TARGET_BYTES, 1), lo[:half], ro[:half], lens[:half], "mixed batch, device part")
        check(got, seeded_bytes(TARGET_BYTES, 2), lo[half:], ro[half:], lens[half:], "mixed batch, host part")
        print(f"{transport}: mixed host/device reads verified")
    return 0


def child_map_cuda() -> int:
    from kvtransfer import alloc_host
    from kvtransfer.testing.target import seeded_bytes

    dev_src, host_src = seeded_bytes(TARGET_BYTES, 1), seeded_bytes(TARGET_BYTES, 2)
    lo, ro, lens = scatter_plan(1500, np.random.default_rng(12))
    size = int(lo[-1] + lens[-1]) + 64
    with reader(size, None, "target-shared") as r:
        assert r.peer.transport == "map", r.peer.transport
        host_dst = alloc_host(size)
        host_local, _ = r.eng.register(host_dst)
        for local, src, name in ((host_local, r.hdesc, "host<-host"), (host_local, r.ddesc, "host<-CUDA"),
                                 (r.local, r.hdesc, "CUDA<-host"), (r.local, r.ddesc, "CUDA<-CUDA")):
            host_dst[:] = 0xEE
            r.poison()
            r.peer.read_blocks(local, lo, src, ro, lens).wait(30)
            got = host_dst if local is host_local else r.gpu.download(r.dst, size)
            check(got, host_src if src is r.hdesc else dev_src, lo, ro, lens, f"map peer, {name}")
        with open("/proc/self/maps") as f:
            assert "/memfd:kvtransfer-shared" in f.read(), "host<-host was not read through a mapping"
        # one list of entries from both regions into host memory
        host_dst[:] = 0xEE
        half = len(lo) // 2
        r.peer.read_indexed([host_local], np.zeros(len(lo), np.int64), lo, [r.ddesc, r.hdesc],
                            (np.arange(len(lo)) >= half).astype(np.int64), ro, lens).wait(30)
        check(host_dst, dev_src, lo[:half], ro[:half], lens[:half], "mixed batch, CUDA part")
        check(host_dst, host_src, lo[half:], ro[half:], lens[half:], "mixed batch, host part")
    print("map: host and CUDA reads verified")
    return 0


def child_register() -> int:
    from kvtransfer import Engine, InvalidArgumentError

    gpu = FakeGPU()
    base = gpu.alloc(1 << 20)
    with Engine() as eng:
        region, desc = eng.register((base + 4096, 8192, "cuda"))
        assert (desc.device, desc.device_index, desc.pci_bus_id) == ("cuda", 0, "0000:00:1e.0"), desc
        assert (desc.alloc_base, desc.alloc_nbytes) == (base, 1 << 20), desc
        assert region.cuda["ipc_status"] == 0 and region.device == "cuda:0"
        try:
            eng.register((base + (1 << 20) - 10, 100, "cuda:0"))
            raise AssertionError("a range crossing its allocation's end registered")
        except InvalidArgumentError as e:
            assert "crosses the end" in str(e), e
        host = np.zeros(4096, np.uint8)
        try:
            eng.register((host.ctypes.data, 4096, "cuda:0"))
            raise AssertionError("host memory registered as CUDA memory")
        except InvalidArgumentError as e:
            assert "not CUDA device memory" in str(e), e
    print("registration ok")
    return 0


def child_same_process() -> int:
    from kvtransfer import Engine
    from kvtransfer.testing.target import seeded_bytes

    gpu = FakeGPU()
    src = gpu.alloc(1 << 20)
    data = seeded_bytes(1 << 20, 3)
    gpu.upload(src, data)
    dst = gpu.alloc(1 << 20)
    with Engine() as a, Engine() as b:
        sregion, sdesc = a.register((src, 1 << 20, "cuda:0"))  # keep the handle: dropping it deregisters
        local, _ = b.register((dst, 1 << 20, "cuda:0"))
        for transport in ("shm", "tcp"):
            gpu.upload(dst, np.zeros(1 << 20, np.uint8))
            peer = b.connect(a.descriptor, transport=transport)
            offs = np.arange(256, dtype=np.int64) * 4096
            peer.read_blocks(local, offs, sdesc, offs[::-1].copy(), 4096).wait(30)
            got = gpu.download(dst, 1 << 20).reshape(256, 4096)
            assert np.array_equal(got, data.reshape(256, 4096)[::-1]), transport
    # the batched copy alone (what bench/transfer_bw.py's "kernel" system times)
    from kvtransfer import _C

    gpu.upload(dst, np.zeros(1 << 20, np.uint8))
    descs = np.array([[src + 4096 * (255 - i), dst + 4096 * i, 4096] for i in range(256)], np.uint64)
    _C.cuda_gather(0, descs.tobytes())
    assert np.array_equal(gpu.download(dst, 1 << 20).reshape(256, 4096), data.reshape(256, 4096)[::-1])
    print("same-process shm and tcp ok; cuda_gather ok")
    return 0


def child_no_ipc() -> int:
    from kvtransfer import TransferError
    from kvtransfer.testing.target import seeded_bytes

    with reader(1 << 20, "shm") as r:
        try:
            r.peer.read([(r.local, 0, r.ddesc, 0, 4096)]).wait(30)
            raise AssertionError("shm read of memory without an IPC handle succeeded")
        except TransferError as e:
            assert e.errno == errno.EOPNOTSUPP and "cuIpcGetMemHandle" in str(e) and "tcp" in str(e), e
        tcp = r.eng.connect(r.edesc, transport="tcp")
        tcp.read([(r.local, 0, r.ddesc, 0, 4096)]).wait(30)
        assert np.array_equal(r.gpu.download(r.dst, 4096), seeded_bytes(TARGET_BYTES, 1)[:4096])
    print("no IPC: shm refused clearly, tcp served")
    return 0


def child_no_copy() -> int:
    from kvtransfer import TransferError, _C

    ok, why = _C.cuda_copy_info()
    assert not ok and "NVRTC disabled" in why and "cuMemcpyBatchAsync" in why, why
    with reader(1 << 20, "shm") as r:
        try:
            r.peer.read([(r.local, 0, r.ddesc, 0, 4096)]).wait(30)
            raise AssertionError("a device copy ran with neither NVRTC nor cuMemcpyBatchAsync")
        except TransferError as e:
            assert e.errno == errno.EOPNOTSUPP and "no batched device copy" in str(e), e
        # over tcp the target stages its device memory with the same copies: it
        # refuses the entry (its reason on its stderr) and keeps the connection
        host = np.zeros(4096, np.uint8)
        hlocal, _ = r.eng.register(host)
        tcp = r.eng.connect(r.edesc, transport="tcp")
        for _ in range(2):
            try:
                tcp.read([(hlocal, 0, r.ddesc, 0, 4096)]).wait(30)
                raise AssertionError("the target staged device memory without a way to copy it")
            except TransferError as e:
                assert e.errno == errno.EOPNOTSUPP and e.entry == 0, e
                print(f"tcp: {e}")
    print("no batched copy: refused clearly")
    return 0


def refuses_block(peer, local, ddesc, n: int, size: int, bad: int):
    """read_blocks of n blocks of `size` bytes, block `bad` past the end of the target's
    region: the read fails with ERANGE naming that block. Returns the offsets (the bad
    one's remote offset is past the end)."""
    from kvtransfer import RemoteAccessError

    lo = np.arange(n, dtype=np.int64) * size
    ro = lo.copy()
    ro[bad] = TARGET_BYTES - size // 2
    try:
        peer.read_blocks(local, lo, ddesc, ro, size).wait(30)
        raise AssertionError(f"block {bad} out of bounds was not refused")
    except RemoteAccessError as e:
        assert e.errno == errno.ERANGE and e.entry == bad, e
    return lo, ro


def child_refusals() -> int:
    from kvtransfer import RegionDescriptor, RemoteAccessError
    from kvtransfer.testing.target import seeded_bytes
    import msgspec

    with reader(1 << 20, "shm") as r:
        local, ddesc, peer = r.local, r.ddesc, r.peer
        bad_key = msgspec.structs.replace(ddesc, key=ddesc.key ^ 1)
        cases = [((local, 0, bad_key, 0, 4096), errno.EACCES),
                 ((local, 0, ddesc, TARGET_BYTES - 100, 4096), errno.ERANGE)]
        for entry, want in cases:
            try:
                peer.read([(local, 8192, ddesc, 0, 4096), entry]).wait(30)
                raise AssertionError(f"{entry} was not refused")
            except RemoteAccessError as e:
                assert e.errno == want and e.entry == 1, e
        # read_blocks: its jobs are copied from the batch's columns without pieces;
        # a block out of bounds still fails the read naming that block
        lo, ro = refuses_block(peer, local, ddesc, 64, 4096, bad=37)
        # poisoned again: the reads above may have left these blocks' bytes in place
        r.poison()
        peer.read_blocks(local, lo[:37], ddesc, ro[:37], 4096).wait(30)
        check(r.gpu.download(r.dst, 37 * 4096), seeded_bytes(TARGET_BYTES, 1), lo[:37], ro[:37],
              np.full(37, 4096), "read_blocks after a refused one")
        assert isinstance(ddesc, RegionDescriptor)
    print("refusals ok")
    return 0


def child_blocks() -> int:
    from kvtransfer import InvalidArgumentError
    from kvtransfer.testing.target import seeded_bytes

    src, host_src = seeded_bytes(TARGET_BYTES, 1), seeded_bytes(TARGET_BYTES, 2)
    batch_mode = os.environ.get("KVTRANSFER_CUDA_COPY") == "batch"
    rng = np.random.default_rng(3)
    with reader(4 << 20, "shm") as r:
        gpu, local, ddesc, hdesc, peer = r.gpu, r.local, r.ddesc, r.hdesc, r.peer
        cols = gpu.cols_launches
        for n, size in ((20000, 96), (24, 150 << 10), (300, 4099)):
            r.poison()
            lo = np.arange(n, dtype=np.int64) * size + 5
            ro = rng.integers(0, TARGET_BYTES - size, size=n).astype(np.int64)
            before, cols_before = gpu.launches(), cols()
            peer.read_blocks(local, lo, ddesc, ro, size).wait(30)
            launches, col_launches = gpu.launches() - before, cols() - cols_before
            if batch_mode:
                assert col_launches == 0 < launches, f"{n} x {size}: {launches} batch calls, {col_launches} kernels"
            else:
                assert 0 < col_launches == launches <= 4, f"{n} x {size}: {launches} launches, {col_launches} by columns"
            got = gpu.download(r.dst, 4 << 20)
            check(got, src, lo, ro, np.full(n, size), f"read_blocks {n} x {size}")
            assert (got[:5] == 0xEE).all() and (got[int(lo[-1]) + size:] == 0xEE).all(), "poison touched"
        # a block out of bounds in the third job: named, whatever the other jobs did
        lo, ro = refuses_block(peer, local, ddesc, 20000, 96, bad=19000)
        # a local range out of bounds there: the call itself raises, naming it, and
        # nothing is copied (local ranges are checked before any job is queued)
        r.poison()
        bad_lo = lo.copy()
        bad_lo[19000] = 4 << 20
        try:
            peer.read_blocks(local, bad_lo, ddesc, ro, 96)
            raise AssertionError("local block 19000 out of bounds was not refused")
        except InvalidArgumentError as e:
            assert e.errno == errno.ERANGE and "entry 19000" in str(e), e
        assert (gpu.download(r.dst, 4 << 20) == 0xEE).all(), "a refused batch copied blocks"
        # from the target's host memory: the descriptor path, not the columns
        r.poison()
        before = cols()
        peer.read_blocks(local, lo[:500], hdesc, ro[:500], 96).wait(30)
        check(gpu.download(r.dst, 500 * 96), host_src, lo[:500], ro[:500], np.full(500, 96), "from host memory")
        assert cols() == before
    print("blocks ok")
    return 0


def child_direct() -> int:
    import threading

    from kvtransfer import TransferError
    from kvtransfer.testing.target import seeded_bytes

    src = seeded_bytes(TARGET_BYTES, 1)
    rng = np.random.default_rng(4)
    n, size = 5000, 96  # three jobs a batch (1,024 blocks, then the rest)
    span = n * size
    with reader(8 * span, "shm") as r:
        gpu, local, ddesc, peer = r.gpu, r.local, r.ddesc, r.peer

        def plan(k: int):
            return np.arange(n, dtype=np.int64) * size + k * span, rng.integers(0, TARGET_BYTES - size, n)

        # every copy is launched in the calling thread
        lo, ro = plan(0)
        gpu.cols_threads()
        peer.read_blocks(local, lo, ddesc, ro, size).wait(30)
        assert gpu.cols_threads() == [threading.get_native_id()], "the copies were not launched by the caller"
        check(gpu.download(r.dst, span), src, lo, ro, np.full(n, size), "read_blocks, launched by the caller")
        # eight batches before any wait, each copy taking 20 ms (FAKE_CUDA_SYNC_US):
        # more jobs than the caller's four slots, the rest launched by the transport
        # threads; every block lands
        r.poison()
        plans = [plan(k) for k in range(8)]
        os.environ["FAKE_CUDA_SYNC_US"] = "20000"
        try:
            for t in [peer.read_blocks(local, lo, ddesc, ro, size) for lo, ro in plans]:
                t.wait(30)
        finally:
            del os.environ["FAKE_CUDA_SYNC_US"]
        launchers = gpu.cols_threads()
        assert launchers[0] == threading.get_native_id() and len(launchers) > 1, launchers
        got = gpu.download(r.dst, 8 * span)
        for k, (lo, ro) in enumerate(plans):
            check(got, src, lo, ro, np.full(n, size), f"batch {k} of 8 in flight")
        # two threads reading at once (one of them finds the caller's lanes taken)
        r.poison()
        errors: list[BaseException] = []

        def loop(k: int) -> None:
            try:
                for _ in range(20):
                    peer.read_blocks(local, plans[k][0], ddesc, plans[k][1], size).wait(30)
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        threads = [threading.Thread(target=loop, args=(k,)) for k in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors and not any(t.is_alive() for t in threads), errors or "a reading thread hung"
        got = gpu.download(r.dst, 2 * span)
        for k in (0, 1):
            check(got, src, *plans[k], np.full(n, size), f"thread {k}")
        # closed with a batch in flight: it ends (its started copies settled), no hang;
        # landed in full or cancelled
        r.poison()
        t = peer.read_blocks(local, plans[2][0], ddesc, plans[2][1], size)
        peer.close()
        try:
            t.wait(30)
            check(gpu.download(r.dst, 8 * span), src, *plans[2], np.full(n, size), "batch read as the peer closed")
        except TransferError as e:
            assert e.errno == errno.ECANCELED, e
    print("direct ok")
    return 0


def main(scenario: str) -> int:
    if scenario in ("target", "target-shared"):
        return child_target(shared=scenario == "target-shared")
    if scenario.startswith("read-"):
        return child_read(scenario[5:])
    if scenario.startswith("mixed-"):
        return child_mixed(scenario[6:])
    return {"register": child_register, "same-process": child_same_process, "no-ipc": child_no_ipc,
            "no-copy": child_no_copy, "refusals": child_refusals, "blocks": child_blocks, "direct": child_direct,
            "map-cuda": child_map_cuda}[scenario]()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
