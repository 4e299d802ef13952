"""Type stubs of the C extension (csrc/pymodule.c). Use kvtransfer.engine instead."""

from typing import Any

READ_REQ_BYTES: int
MAX_THREADS: int
VERBS_MAX_QPS: int
MEM_HOST: int
MEM_CUDA: int
TRANSPORTS: tuple[str, ...]  # the C core's transport table, in preference order

class Transfer:
    def wait(self, timeout_s: float | None, /) -> bool: ...
    def status(self) -> bool | None: ...
    def set_notify_fd(self, fd: int, /) -> None: ...

class Peer:
    transport: str | None
    def read(self, reqs: Any, /) -> Transfer: ...
    def read_cols(self, n: int, local_region: Any, local_off: Any, remote_region: Any, remote_key: Any,
                  remote_addr: Any, remote_off: Any, len: Any, /) -> Transfer:
        """A list of entries: each column an int (every entry) or a 1-D array of n 64-bit integers."""
    def read_paged(self, n: int, local_region: int, local_off: Any, remote_region: int, remote_key: int,
                   remote_addr: int, remote_off: Any, len: Any, /) -> Transfer:
        """A paged batch: blocks between one local and one remote region (offset arrays, one length)."""
    def close(self) -> None: ...

class Engine:
    def __init__(self, listen_host: str = ..., listen_port: int = ..., io_timeout_ms: int = ...,
                 tcp_conns: int = ..., shm_threads: int = ..., verbs_qps: int = ..., use_verbs: bool = ...) -> None: ...
    def close(self) -> None: ...
    def info(self) -> dict[str, Any]: ...
    def register(self, addr: int, nbytes: int, kind: int, device: int, /) -> tuple[int, int, str]: ...
    def deregister(self, region_id: int, /) -> None: ...
    def region_cuda(self, region_id: int, /) -> dict[str, Any]:
        """alloc_base, alloc_nbytes, device, pci_bus_id, ipc_status of a CUDA region."""
    def connect(self, descriptor: Any, forced: str | None, /) -> tuple[Peer, list[tuple[str, bool, int, str]]]:
        """descriptor: an EngineDescriptor. -> the peer, and (name, False, errno, error) of each
        transport that reached the peer but failed to connect before it."""
    def plan(self, descriptor: Any, forced: str | None, /) -> list[tuple[str, bool, int, str]]:
        """(name, reaches, errno, why) per transport, in the order connect tries them."""
    def transports(self) -> list[tuple[str, bool, str | None, dict[str, Any]]]:
        """(name, offered, why not, facts) per transport, in preference order."""

def cuda_pointer_device(ptr: int, /) -> int: ...
def cuda_available() -> tuple[bool, str]: ...
def cuda_dmabuf(ptr: int, nbytes: int, /) -> int: ...
def cuda_copy_info() -> tuple[bool, str]: ...
def cuda_gather(device: int, descs: Any, variant: int = -1, /) -> None:
    """(src, dst, len) uint64 triples copied as one batched copy; waits (benchmarks)."""
def verbs_devices() -> list[dict[str, Any]]:
    """[{name, fw, max_qp_wr, max_sge, max_qp_rd_atom, max_mr_size, ports: [{port, state, link_layer,
    active_mtu, lid, width_code, speed_code, gids: [{index, raw, rocev2}]}]}, or {name, error, ports: []}]."""
