"""Turning the objects people register into (address, bytes, device) ranges.

Accepted: numpy arrays (and anything with the buffer protocol), torch tensors on CPU
or CUDA, objects with ``__cuda_array_interface__`` (cupy, numba), and raw
``(ptr, nbytes, device)`` tuples with ``device`` ``"cpu"``, ``"cuda"`` or
``"cuda:N"``. Every object must be contiguous: a region is one range of bytes.
"""

from __future__ import annotations

import math
import mmap
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
    try:
        return _from_buffer(obj)
    except TypeError:
        raise InvalidArgumentError(f"cannot register a {type(obj).__name__}: expected a numpy array, a torch "
                                   "tensor, a CUDA array or (ptr, nbytes, device)", op="register") from None


def alloc_host(nbytes: int, *, hugepages: bool = True, prefault: bool = True) -> np.ndarray:
    """A page-aligned uint8 array of ``nbytes`` for KV pools and benchmarks.

    ``hugepages`` asks for transparent huge pages (2 MiB-aligned, ``MADV_HUGEPAGE``),
    which make ``process_vm_readv`` and memcpy faster; ``prefault`` touches every page
    now, so the first transfer does not pay for page faults.
    """
    if nbytes <= 0:
        raise InvalidArgumentError(f"nbytes must be > 0, got {nbytes}", op="alloc_host")
    pad = HUGE_PAGE if hugepages else 0
    m = mmap.mmap(-1, nbytes + pad, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = np.frombuffer(m, dtype=np.uint8)
    start = (-int(base.ctypes.data)) % HUGE_PAGE if hugepages else 0
    if hugepages and hasattr(mmap, "MADV_HUGEPAGE"):
        m.madvise(mmap.MADV_HUGEPAGE)
    arr = base[start:start + nbytes]
    if prefault:
        arr[::mmap.PAGESIZE] = 0
    return arr
