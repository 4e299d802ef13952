"""What crosses the wire: engine and region descriptors.

Only descriptors travel; the local handles that keep registrations alive
(:class:`kvtransfer.engine.Region`) never do. Both are msgspec structs encoded as
msgpack, with a schema version; ``from_bytes`` validates and raises
:class:`~kvtransfer.errors.InvalidArgumentError` on anything malformed.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from .errors import InvalidArgumentError

SCHEMA_VERSION = 1

# Integer fields are bounded as the C side stores them, so a malformed descriptor is
# refused when decoded, not deep inside a read (msgpack itself caps integers at 2**64-1).
U64 = Annotated[int, msgspec.Meta(ge=0)]
I32 = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Ordinal = Annotated[int, msgspec.Meta(ge=-1, le=2**31 - 1)]


class EngineDescriptor(msgspec.Struct, frozen=True, kw_only=True):
    """How to reach an engine: identity, same-host facts (for shm), a tcp address (for
    tcp, and the bootstrap of verbs queue pairs) and its RDMA port, if it has one
    (``gid``: 16 bytes, empty without RDMA)."""

    version: int = SCHEMA_VERSION
    engine_id: bytes
    hostname: str
    boot_id: str
    pid: I32
    pidns: U64
    table_fd: I32
    table_addr: U64
    tcp_host: str
    tcp_port: Port
    verbs: bool = False
    ib_device: str = ""
    gid: bytes = b""

    def to_bytes(self) -> bytes:
        return msgspec.msgpack.encode(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> "EngineDescriptor":
        return _decode(cls, data)

    def same_host_as(self, other: "EngineDescriptor") -> bool:
        """Same boot and same pid namespace: pids and memory are shared meaningfully."""
        return bool(self.boot_id) and self.boot_id == other.boot_id and self.pidns == other.pidns


class RegionDescriptor(msgspec.Struct, frozen=True, kw_only=True):
    """A registered region as a peer sees it: where it is and the key to read it.

    ``addr`` and ``nbytes`` are in bytes; ``device`` is ``"cpu"`` or ``"cuda"`` with
    ``device_index`` the CUDA ordinal (-1 for host memory). ``key`` is 64 bits: tcp and
    shm targets check all of them; when the engine has an RDMA device, its low 32 bits
    are the memory registration's rkey, which the NIC checks for verbs reads.

    CUDA regions also say where they live, for readers and for people: ``pci_bus_id``
    of the device (``"0000:18:00.0"``: the same in every process, unlike ordinals), and
    the CUDA allocation holding the region, ``alloc_base`` and ``alloc_nbytes``
    (``cuMemGetAddressRange``: a same-host reader opens each allocation once, through
    the CUDA IPC handle the target's region table holds). Empty and 0 for host memory;
    optional fields, so descriptors of older engines still decode.
    """

    version: int = SCHEMA_VERSION
    engine_id: bytes
    region_id: U64
    addr: U64
    nbytes: U64
    device: str
    device_index: Ordinal
    key: U64
    pci_bus_id: str = ""
    alloc_base: U64 = 0
    alloc_nbytes: U64 = 0

    def to_bytes(self) -> bytes:
        return msgspec.msgpack.encode(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> "RegionDescriptor":
        return _decode(cls, data)


def _decode(cls, data: bytes):
    try:
        obj = msgspec.msgpack.decode(data, type=cls)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise InvalidArgumentError(f"malformed {cls.__name__}: {e}", op="decode") from None
    if obj.version != SCHEMA_VERSION:
        raise InvalidArgumentError(
            f"{cls.__name__} schema version {obj.version}, this kvtransfer speaks {SCHEMA_VERSION}",
            op="decode")
    if len(obj.engine_id) != 16:
        raise InvalidArgumentError(f"{cls.__name__}: engine_id must be 16 bytes", op="decode")
    if cls is EngineDescriptor and len(obj.gid) != (16 if obj.verbs else 0):
        raise InvalidArgumentError(f"EngineDescriptor: gid must be 16 bytes with verbs, empty without; got "
                                   f"{len(obj.gid)}", op="decode")
    return obj
