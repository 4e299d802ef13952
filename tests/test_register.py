"""Engine.register: what it accepts (numpy, torch CPU, raw (ptr, nbytes, device),
bytearray), what it refuses, and what the descriptor says. Each accepted kind is then
read into from another process, bytes checked through the object itself."""

from __future__ import annotations

import ctypes
import errno
import gc
import re

import numpy as np
import pytest
import torch

import kvtransfer
from kvtransfer import Engine, InvalidArgumentError, KVTransferError
from support import WAIT_S, assert_bytes, connect

N = 3 * 4096 + 5  # bytes in each registered object: not a multiple of a page


def _make(kind: str):
    """(object to register, its bytes as a uint8 numpy view, something to keep alive)."""
    if kind == "numpy_uint8":
        a = np.zeros(N, np.uint8)
        return a, a, None
    if kind == "numpy_float32_2d":
        a = np.zeros((N // 4 // 3, 3), np.float32)  # 2-D, 4-byte items
        return a, a.reshape(-1).view(np.uint8), None
    if kind == "alloc_host":
        a = kvtransfer.alloc_host(N)
        return a, a, None
    if kind == "torch_cpu":
        t = torch.zeros(N // 2, dtype=torch.float16)
        return t, t.numpy().view(np.uint8), None
    if kind == "torch_cpu_slice":  # a contiguous slice with a storage offset
        base = torch.zeros(N + 64, dtype=torch.uint8)
        t = base[64:]
        return t, t.numpy(), base
    if kind == "raw_tuple":
        a = np.zeros(N, np.uint8)
        return (a.ctypes.data, a.nbytes, "cpu"), a, a
    if kind == "bytearray":
        b = bytearray(N)
        return b, np.frombuffer(b, np.uint8), None
    if kind == "memoryview":
        b = bytearray(N)
        return memoryview(b), np.frombuffer(b, np.uint8), b
    raise AssertionError(kind)


KINDS = ["numpy_uint8", "numpy_float32_2d", "alloc_host", "torch_cpu", "torch_cpu_slice", "raw_tuple", "bytearray",
         "memoryview"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", KINDS)
def test_register_and_read_into(engine, shared_target, transport, kind):
    obj, view, keep = _make(kind)
    region, desc = engine.register(obj)
    nbytes = view.nbytes
    assert (region.ptr, region.nbytes, region.device) == (view.ctypes.data, nbytes, "cpu")
    assert desc is region.descriptor
    assert (desc.addr, desc.nbytes, desc.device, desc.device_index) == (view.ctypes.data, nbytes, "cpu", -1)
    assert desc.engine_id == engine.descriptor.engine_id
    assert desc.region_id == region.id and desc.key != 0
    assert not region.closed

    peer = connect(engine, shared_target, transport)
    want = shared_target.expected[5:5 + nbytes - 2]
    view[:] = ~np.concatenate(([0], want, [0])).astype(np.uint8)
    before_edges = (int(view[0]), int(view[-1]))
    peer.read([(region, 1, shared_target.region, 5, nbytes - 2)]).wait(timeout=WAIT_S)
    assert_bytes(view[1:-1], want, f"{kind} after the read")
    assert (int(view[0]), int(view[-1])) == before_edges, "bytes outside the range were written"
    region.close()
    assert region.closed
    del keep


@pytest.mark.timeout(30)
def test_region_keeps_its_owner_alive(engine, shared_target, transport):
    """The handle keeps the registered object alive: drop every other reference and
    the region can still be read into, and holds the bytes."""
    arr = np.zeros(1 << 20, np.uint8)
    region, _ = engine.register(arr)
    del arr
    gc.collect()
    peer = connect(engine, shared_target, transport)
    peer.read([(region, 0, shared_target.region, 0, 1 << 20)]).wait(timeout=WAIT_S)
    got = np.frombuffer(ctypes.string_at(region.ptr, 1 << 20), np.uint8)
    assert_bytes(got, shared_target.expected[:1 << 20])


@pytest.mark.timeout(30)
def test_registrations_get_distinct_ids_and_keys(engine):
    a = np.zeros(4096, np.uint8)
    regions = [engine.register(a) for _ in range(8)]  # one buffer may be registered twice
    assert len({d.region_id for _, d in regions}) == 8
    assert len({d.key for _, d in regions}) == 8
    for r, _ in regions:
        r.close()


@pytest.mark.parametrize("obj", [
    pytest.param(lambda: np.zeros((64, 64), np.uint8)[:, ::2], id="numpy_strided"),
    pytest.param(lambda: np.zeros((64, 64), np.uint8).T, id="numpy_transposed"),
    pytest.param(lambda: torch.zeros(64, 64).t(), id="torch_transposed"),
    pytest.param(lambda: torch.zeros(64, 64)[:, 1::3], id="torch_strided"),
])
def test_non_contiguous_is_invalid(engine, obj):
    with pytest.raises(InvalidArgumentError, match="contiguous"):
        engine.register(obj())


@pytest.mark.parametrize("obj", [
    pytest.param(lambda: np.zeros(0, np.uint8), id="empty_numpy"),
    pytest.param(lambda: bytearray(), id="empty_bytearray"),
    pytest.param(lambda: torch.zeros(0), id="empty_torch"),
    pytest.param(lambda: (12345678, 0, "cpu"), id="raw_zero_bytes"),
    pytest.param(lambda: (12345678, -4096, "cpu"), id="raw_negative_bytes"),
    pytest.param(lambda: (0, 4096, "cpu"), id="raw_null_pointer"),
    pytest.param(lambda: (1, 2), id="raw_two_items"),
    pytest.param(lambda: (1, 2, "cpu", 4), id="raw_four_items"),
    pytest.param(lambda: (12345678, 4096, "tpu"), id="raw_unknown_device"),
    pytest.param(lambda: (12345678, 4096, "cuda:x"), id="raw_bad_cuda_index"),
    pytest.param(lambda: "a string", id="str"),
    pytest.param(lambda: 42, id="int"),
    pytest.param(lambda: [1, 2, 3], id="list"),
    pytest.param(lambda: object(), id="object"),
])
def test_unregistrable_is_invalid(engine, obj):
    with pytest.raises(InvalidArgumentError):
        engine.register(obj())


@pytest.mark.parametrize("device", ["cuda:0", "cuda"])
def test_cuda_range_without_a_usable_cuda_is_a_clear_error(engine, device):
    """A made-up CUDA pointer: on this machine (no CUDA driver) the error says CUDA
    (libcuda) is not there; on a GPU machine, that the pointer is not device memory.
    Either way a KVTransferError that talks about CUDA, never a crash or a region."""
    buf = np.zeros(4096, np.uint8)
    with pytest.raises(KVTransferError) as ei:
        engine.register((buf.ctypes.data, buf.nbytes, device))
    msg = str(ei.value)
    assert re.search(r"libcuda|CUDA", msg), msg
    if not torch.cuda.is_available():
        assert "libcuda" in msg or "cuInit" in msg, msg


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)")
def test_register_torch_cuda_tensor(engine):
    t = torch.zeros(1 << 20, dtype=torch.uint8, device="cuda:0")
    region, desc = engine.register(t)
    assert (desc.device, desc.device_index, desc.addr, desc.nbytes) == ("cuda", 0, t.data_ptr(), 1 << 20)
    assert region.device == "cuda:0"
    region.close()


@pytest.mark.timeout(60)
def test_region_table_full_is_a_clear_error(engine):
    """The table has a fixed number of slots; registering past it is ENOSPC and says
    why, and closing a region frees its slot."""
    buf = np.zeros(64, np.uint8)
    regions = []
    try:
        with pytest.raises(KVTransferError) as ei:
            for _ in range(100_000):
                regions.append(engine.register(buf)[0])
        assert ei.value.errno == errno.ENOSPC, ei.value
        assert len(regions) >= 1024
        regions.pop().close()
        regions.append(engine.register(buf)[0])
    finally:
        for r in regions:
            r.close()


def test_without_rdma_no_nic_registration_is_reported():
    with Engine(use_verbs=False) as eng:
        region, _ = eng.register(np.zeros(4096, np.uint8))
        assert region.verbs_registration is None
