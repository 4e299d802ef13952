"""CUDA registration through the driver API loaded at run time (needs a GPU: marked gpu).

Host-only transports (this issue's shm and tcp) refuse CUDA memory with a clear error;
moving device memory is the GPU issue's work."""

import errno

import numpy as np
import pytest

from kvtransfer import Engine, InvalidArgumentError, TransferError, alloc_host

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]


def test_torch_cuda_tensor_registers_with_its_device():
    with Engine() as eng:
        t = torch.arange(1 << 20, dtype=torch.uint8, device="cuda:0")
        region, desc = eng.register(t)
        assert (desc.device, desc.device_index, desc.nbytes, desc.addr) == ("cuda", 0, 1 << 20, t.data_ptr())
        region.close()


def test_cupy_array_registers_through_cuda_array_interface():
    cupy = pytest.importorskip("cupy")
    with Engine() as eng:
        a = cupy.zeros((256, 1024), dtype=cupy.float16)
        _, desc = eng.register(a)
        assert desc.device == "cuda" and desc.device_index == 0 and desc.nbytes == a.nbytes


def test_raw_cuda_range_is_checked_by_the_driver():
    host = alloc_host(1 << 16)
    with Engine() as eng:
        with pytest.raises(InvalidArgumentError, match="not CUDA device memory"):
            eng.register((int(host.ctypes.data), host.nbytes, "cuda:0"))
        t = torch.empty(4096, dtype=torch.uint8, device="cuda")
        _, desc = eng.register((t.data_ptr(), 4096, "cuda"))
        assert desc.device_index == 0


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_host_transports_refuse_cuda_memory_clearly(transport):
    with Engine() as target, Engine() as reader:
        dev = torch.zeros(1 << 16, dtype=torch.uint8, device="cuda")
        dev_region, dev_desc = target.register(dev)  # keep the handle: dropping it deregisters
        host = alloc_host(1 << 16)
        host_region, _ = reader.register(host)
        peer = reader.connect(target.descriptor, transport=transport)
        with pytest.raises(TransferError) as ei:
            peer.read([(host_region, 0, dev_desc, 0, 4096)]).wait(10)
        assert ei.value.errno == errno.EOPNOTSUPP and "CUDA" in str(ei.value)
        local_dev, _ = reader.register(torch.zeros(1 << 16, dtype=torch.uint8, device="cuda"))
        host_src, host_desc = target.register(np.ones(1 << 16, np.uint8))
        with pytest.raises(InvalidArgumentError, match="CUDA"):
            peer.read([(local_dev, 0, host_desc, 0, 4096)])


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
