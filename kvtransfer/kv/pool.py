"""A free list of KV block ids."""

from __future__ import annotations

import threading
from typing import Iterable

import numpy as np

from ..errors import InvalidArgumentError, PoolExhaustedError


class BlockPool:
    """Thread-safe free list of a pool's block ids ``[0, num_blocks)``.

    ``alloc`` hands out the lowest free ids of a fresh pool first, in ascending order, and
    reuses the most recently freed ones first: runs of consecutive ids coalesce into
    fewer, larger reads (see plan_reads).
    """

    def __init__(self, num_blocks: int) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, (int, np.integer)) or num_blocks < 1:
            raise InvalidArgumentError(f"BlockPool: num_blocks must be a positive int, got {num_blocks!r}",
                                       op="BlockPool")
        self._num_blocks = int(num_blocks)
        self._lock = threading.Lock()
        self._free = list(range(self._num_blocks - 1, -1, -1))  # a stack: the next id is at the end
        self._used = bytearray(self._num_blocks)               # 1 where allocated

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self._num_blocks - len(self._free)

    def alloc(self, n: int) -> list[int]:
        """``n`` free block ids; raises PoolExhaustedError (taking none) if fewer are free."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise InvalidArgumentError(f"BlockPool.alloc: n must be an int >= 0, got {n!r}", op="alloc")
        n = int(n)
        with self._lock:
            if n > len(self._free):
                raise PoolExhaustedError(f"need {n} KV blocks, {len(self._free)} of {self._num_blocks} are free")
            if n == 0:
                return []
            ids = self._free[-n:][::-1]
            del self._free[-n:]
            for i in ids:
                self._used[i] = 1
            return ids

    def free(self, ids: Iterable[int]) -> None:
        """Returns ``ids`` to the pool. An id out of range, not allocated (a double free)
        or repeated raises InvalidArgumentError and frees none of them."""
        ids = list(ids)
        wrong = [i for i in ids if isinstance(i, bool) or not isinstance(i, (int, np.integer))]
        if wrong:
            raise InvalidArgumentError(f"BlockPool.free: block ids must be ints, got {wrong[:8]}", op="free")
        ids = [int(i) for i in ids]
        with self._lock:
            seen: set[int] = set()
            for i in ids:
                if not 0 <= i < self._num_blocks:
                    raise InvalidArgumentError(f"BlockPool.free: block {i} out of range [0, {self._num_blocks})",
                                               op="free")
                if not self._used[i] or i in seen:
                    raise InvalidArgumentError(f"BlockPool.free: block {i} is not allocated (double free?)",
                                               op="free")
                seen.add(i)
            for i in ids:
                self._used[i] = 0
            self._free.extend(reversed(ids))  # so that the next alloc gets them back in this order
