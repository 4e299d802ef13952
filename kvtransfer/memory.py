"""Turning the objects people register into (address, bytes, device) ranges.

Accepted: numpy arrays (and anything with the buffer protocol), torch tensors on CPU
or CUDA, objects with ``__cuda_array_interface__`` (cupy, numba), objects with
``__dlpack__`` (DLPack producers: JAX, cupy, torch, ...; CPU, CUDA and CUDA-pinned
devices), and raw ``(ptr, nbytes, device)`` tuples with ``device`` ``"cpu"``,
``"cuda"`` or ``"cuda:N"``. Every object must be contiguous: a region is one range of
bytes. CUDA memory is checked by the driver at registration (device, allocation).

:func:`find_nvrtc` finds the NVRTC library that pip-installed CUDA wheels (torch's,
cupy's) ship, for the gather kernel the shm and tcp transports compile at run time.
"""

from __future__ import annotations

import ctypes
import fcntl
import glob
import math
import mmap
import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InvalidArgumentError

HUGE_PAGE = 2 << 20


@dataclass(frozen=True)
class MemoryRange:
    """One contiguous range: ``ptr`` (address), ``nbytes``, ``device`` ("cpu" or "cuda"),
    ``device_index`` (CUDA ordinal or -1) and ``owner`` (kept alive with the region)."""

    ptr: int
    nbytes: int
    device: str
    device_index: int
    owner: Any


def _parse_device(dev: Any) -> tuple[str, int]:
    s = str(dev)
    if s == "cpu":
        return "cpu", -1
    if s == "cuda":
        return "cuda", -1
    if s.startswith("cuda:") and s[5:].isdigit():
        return "cuda", int(s[5:])
    raise InvalidArgumentError(f"unknown device {dev!r}: expected 'cpu', 'cuda' or 'cuda:N'", op="register")


def _from_torch(t: Any) -> MemoryRange:
    if not t.is_contiguous():
        raise InvalidArgumentError("torch tensor is not contiguous; register the whole contiguous pool",
                                   op="register")
    kind = t.device.type
    if kind not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"torch tensors on {t.device} cannot be registered", op="register")
    index = -1 if kind == "cpu" else (t.device.index if t.device.index is not None else -1)
    return MemoryRange(t.data_ptr(), t.numel() * t.element_size(), kind, index, t)


def _from_cuda_array_interface(obj: Any) -> MemoryRange:
    cai = obj.__cuda_array_interface__
    ptr = int(cai["data"][0])
    itemsize = np.dtype(cai["typestr"]).itemsize
    shape = tuple(cai["shape"])
    strides = cai.get("strides")
    if strides is not None:
        expected, acc = [], itemsize
        for dim in reversed(shape):
            expected.append(acc)
            acc *= dim
        if tuple(reversed(expected)) != tuple(strides) and math.prod(shape) > 1:
            raise InvalidArgumentError("CUDA array is not C-contiguous", op="register")
    return MemoryRange(ptr, math.prod(shape) * itemsize, "cuda", -1, obj)


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    """The head of DLPack's DLManagedTensor (the "dltensor" capsule)."""

    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


_DL_CPU, _DL_CUDA, _DL_CUDA_HOST = 1, 2, 3


def _from_dlpack(obj: Any) -> MemoryRange:
    """Reads the range out of a legacy "dltensor" capsule without consuming it (the
    producer's deleter runs when the capsule goes; ``obj`` itself is kept alive)."""
    dev_type, dev_id = obj.__dlpack_device__()
    if dev_type not in (_DL_CPU, _DL_CUDA, _DL_CUDA_HOST):
        raise InvalidArgumentError(f"DLPack device type {dev_type} cannot be registered (CPU and CUDA only)",
                                   op="register")
    capsule = obj.__dlpack__()
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    try:
        t = ctypes.cast(get(capsule, b"dltensor"), ctypes.POINTER(_DLTensor)).contents
    except ValueError:
        raise InvalidArgumentError("DLPack capsule is not a \"dltensor\"", op="register") from None
    shape = [t.shape[i] for i in range(t.ndim)]
    itemsize = t.dtype.bits * t.dtype.lanes // 8
    if t.strides:
        acc = 1
        for i in reversed(range(t.ndim)):
            if shape[i] > 1 and t.strides[i] != acc:
                raise InvalidArgumentError("DLPack tensor is not C-contiguous", op="register")
            acc *= shape[i]
    ptr = (t.data or 0) + t.byte_offset
    nbytes = math.prod(shape) * itemsize
    if dev_type == _DL_CUDA:
        return MemoryRange(ptr, nbytes, "cuda", int(dev_id), obj)
    return MemoryRange(ptr, nbytes, "cpu", -1, obj)


def _from_buffer(obj: Any) -> MemoryRange:
    arr = obj if isinstance(obj, np.ndarray) else np.frombuffer(obj, dtype=np.uint8)
    if not arr.flags.c_contiguous:
        raise InvalidArgumentError("array is not C-contiguous; register the whole contiguous pool",
                                   op="register")
    return MemoryRange(int(arr.ctypes.data), int(arr.nbytes), "cpu", -1, obj)


def describe(obj: Any) -> MemoryRange:
    """Finds the range behind ``obj``; raises InvalidArgumentError if it has none."""
    if isinstance(obj, tuple):
        if len(obj) != 3:
            raise InvalidArgumentError("a raw range is (ptr, nbytes, device)", op="register")
        ptr, nbytes, dev = obj
        kind, index = _parse_device(dev)
        return MemoryRange(int(ptr), int(nbytes), kind, index, None)
    if type(obj).__module__.startswith("torch") and hasattr(obj, "data_ptr"):
        return _from_torch(obj)
    if hasattr(obj, "__cuda_array_interface__"):
        return _from_cuda_array_interface(obj)
    if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__") and not isinstance(obj, np.ndarray):
        return _from_dlpack(obj)
    try:
        return _from_buffer(obj)
    except TypeError:
        raise InvalidArgumentError(f"cannot register a {type(obj).__name__}: expected a numpy array, a torch "
                                   "tensor, a CUDA array or (ptr, nbytes, device)", op="register") from None


def alloc_host(nbytes: int, *, hugepages: bool = True, prefault: bool = True, shared: bool = False) -> np.ndarray:
    """A page-aligned uint8 array of ``nbytes`` for KV pools and benchmarks.

    ``hugepages`` asks for transparent huge pages (2 MiB-aligned, ``MADV_HUGEPAGE``),
    which make ``process_vm_readv`` and memcpy faster; ``prefault`` touches every page
    now, so the first transfer does not pay for page faults. ``shared`` backs the
    array with a memfd (kept open by the array's mmap), which same-host readers map
    once and copy from with memcpy: the ``map`` transport.
    """
    if nbytes <= 0:
        raise InvalidArgumentError(f"nbytes must be > 0, got {nbytes}", op="alloc_host")
    pad = HUGE_PAGE if hugepages else 0
    if shared:
        fd = os.memfd_create("kvtransfer-shared", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, nbytes + pad)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            m = mmap.mmap(fd, nbytes + pad, flags=mmap.MAP_SHARED)  # holds a dup of fd
        finally:
            os.close(fd)
    else:
        m = mmap.mmap(-1, nbytes + pad, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = np.frombuffer(m, dtype=np.uint8)
    start = (-int(base.ctypes.data)) % HUGE_PAGE if hugepages else 0
    if hugepages and hasattr(mmap, "MADV_HUGEPAGE"):
        m.madvise(mmap.MADV_HUGEPAGE)
    arr = base[start:start + nbytes]
    if prefault:
        arr[::mmap.PAGESIZE] = 0
    return arr


def find_nvrtc() -> str | None:
    """The newest libnvrtc shipped by pip-installed NVIDIA wheels on ``sys.path``
    (``nvidia/cu13/lib/libnvrtc.so.13``, ``nvidia/cuda_nvrtc/lib/libnvrtc.so.12``), or None.
    The C core also tries the loader's path and /usr/local/cuda; ``KVTRANSFER_NVRTC``
    names one explicitly."""
    found = []
    for root in sys.path:
        for path in glob.glob(os.path.join(root or ".", "nvidia", "*", "lib", "libnvrtc.so*")):
            suffix = path.rsplit(".so", 1)[1].lstrip(".")
            major = suffix.split(".")[0]
            if "builtins" not in os.path.basename(path) and major.isdigit():
                found.append((int(major), path))
    return max(found)[1] if found else None
