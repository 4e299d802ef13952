"""BlockPool: allocation order, exhaustion, refused frees, threads."""

from __future__ import annotations

import threading

import pytest

from kvtransfer.errors import InvalidArgumentError, PoolExhaustedError
from kvtransfer.kv import BlockPool


def test_alloc_hands_out_consecutive_ids_and_reuses_freed_ones():
    pool = BlockPool(10)
    assert (pool.num_blocks, pool.num_free, pool.num_used) == (10, 10, 0)
    assert pool.alloc(0) == []
    a = pool.alloc(4)
    assert a == [0, 1, 2, 3]
    assert pool.alloc(2) == [4, 5] and (pool.num_free, pool.num_used) == (4, 6)
    pool.free(a)
    assert pool.alloc(4) == a  # freed ids come back in the order they were freed
    assert pool.num_free == 4


def test_exhaustion_takes_nothing_and_says_how_many_are_free():
    pool = BlockPool(5)
    pool.alloc(3)
    with pytest.raises(PoolExhaustedError, match="need 3 KV blocks, 2 of 5 are free") as e:
        pool.alloc(3)
    assert e.value.errno == 28 and e.value.op == "alloc"  # ENOSPC
    assert pool.num_free == 2 and len(pool.alloc(2)) == 2


@pytest.mark.parametrize("ids, words", [
    ([5], "out of range"),
    ([-1], "out of range"),
    ([3], "not allocated"),          # never allocated
    ([0, 0], "not allocated"),       # freed twice in one call
    ([0, 1.0], "must be ints"),
])
def test_bad_free_frees_none(ids, words):
    pool = BlockPool(5)
    pool.alloc(2)
    with pytest.raises(InvalidArgumentError, match=words):
        pool.free(ids)
    assert pool.num_used == 2


def test_double_free_and_bad_arguments():
    pool = BlockPool(3)
    ids = pool.alloc(2)
    pool.free(ids)
    with pytest.raises(InvalidArgumentError, match="block 0 is not allocated"):
        pool.free(ids)
    for n in (-1, 1.5, True):
        with pytest.raises(InvalidArgumentError):
            pool.alloc(n)
    for n in (0, -2, "4"):
        with pytest.raises(InvalidArgumentError, match="num_blocks"):
            BlockPool(n)


def test_threads_never_share_a_block():
    pool, owner, lock, errors = BlockPool(64), {}, threading.Lock(), []

    def worker(me: int) -> None:
        try:
            for i in range(500):
                try:
                    ids = pool.alloc(1 + i % 5)
                except PoolExhaustedError:
                    continue
                with lock:  # a block held by two threads at once would be a bug of the pool
                    assert not owner.keys() & set(ids), (me, ids)
                    owner.update(dict.fromkeys(ids, me))
                with lock:
                    for b in ids:
                        del owner[b]
                pool.free(ids)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and not any(t.is_alive() for t in threads)
    assert pool.num_free == 64 and sorted(pool.alloc(64)) == list(range(64))
