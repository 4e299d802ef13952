"""``await transfer`` inside asyncio: results, errors, many at once, and the event loop
stays free while a read waits. Every await has an ``asyncio.wait_for`` deadline."""

from __future__ import annotations

import asyncio
import errno

import msgspec
import numpy as np
import pytest

from kvtransfer import RemoteAccessError
from support import MiB, alloc_dst, assert_bytes, connect, plan, scattered_blocks

DEADLINE = 20.0


@pytest.mark.timeout(60)
def test_await_a_read(engine, shared_target, transport):
    peer = connect(engine, shared_target, transport)
    dst, region = alloc_dst(engine, 8 * MiB + 2)
    want = plan(dst, shared_target.expected, [1], [333], [8 * MiB])

    async def main() -> None:
        t = peer.read([(region, 1, shared_target.region, 333, 8 * MiB)])
        await asyncio.wait_for(t, DEADLINE)
        assert t.done()

    asyncio.run(main())
    assert_bytes(dst, want)


@pytest.mark.timeout(60)
def test_gather_many_reads(engine, shared_target, transport):
    """Sixteen batches in flight at once, awaited together."""
    peer = connect(engine, shared_target, transport)
    rng = np.random.default_rng(16)
    jobs = []
    for _ in range(16):
        lo, ro, ln, need = scattered_blocks(rng, 500, shared_target.nbytes, 5000)
        dst, region = alloc_dst(engine, need)
        jobs.append((dst, region, lo, ro, ln, plan(dst, shared_target.expected, lo, ro, ln)))

    async def one(region, lo, ro, ln) -> None:
        await peer.read_blocks(region, lo, shared_target.region, ro, ln)

    async def main() -> None:
        await asyncio.wait_for(asyncio.gather(*(one(r, lo, ro, ln) for _, r, lo, ro, ln, _ in jobs)), DEADLINE)

    asyncio.run(main())
    for i, (dst, *_, want) in enumerate(jobs):
        assert_bytes(dst, want, f"batch {i}")


@pytest.mark.timeout(60)
def test_await_a_refused_read_raises(engine, shared_target, transport):
    peer = connect(engine, shared_target, transport)
    dst, region = alloc_dst(engine, 3 * 4096)
    bad = msgspec.structs.replace(shared_target.region, key=shared_target.region.key ^ 0xFF)
    entries = [(region, 0, shared_target.region, 0, 4096), (region, 4096, bad, 0, 4096),
               (region, 8192, shared_target.region, 5, 4096)]

    async def main() -> None:
        with pytest.raises(RemoteAccessError) as ei:
            await asyncio.wait_for(peer.read(entries), DEADLINE)
        assert (ei.value.entry, ei.value.errno, ei.value.transport) == (1, errno.EACCES, transport)
        # the loop and the peer go on: a good read, awaited
        want = plan(dst, shared_target.expected, [0], [77], [4096])
        await asyncio.wait_for(peer.read([(region, 0, shared_target.region, 77, 4096)]), DEADLINE)
        assert_bytes(dst, want)

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_await_an_already_finished_transfer(engine, shared_target, transport):
    peer = connect(engine, shared_target, transport)
    dst, region = alloc_dst(engine, 4096)
    want = plan(dst, shared_target.expected, [0], [9], [4096])
    t = peer.read([(region, 0, shared_target.region, 9, 4096)])
    t.wait(timeout=DEADLINE)

    async def main() -> None:
        await asyncio.wait_for(t, 1.0)
        await asyncio.wait_for(t, 1.0)  # twice: a finished transfer stays finished

    asyncio.run(main())
    assert_bytes(dst, want)


@pytest.mark.timeout(60)
def test_loop_runs_while_a_read_waits_and_a_timed_out_await_can_be_retried(engine, start_target, transport):
    """The target is stopped: over tcp the read cannot finish, ``wait_for`` times out
    while other tasks keep running, and after SIGCONT a second await completes the
    same transfer with the right bytes. Over shm the read finishes regardless."""
    target = start_target(16 * MiB, 12)
    peer = connect(engine, target, transport)
    dst, region = alloc_dst(engine, 16 * MiB)
    want = plan(dst, target.expected, [0], [0], [16 * MiB])

    async def main() -> None:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        tick_task = asyncio.create_task(ticker())
        target.freeze()
        try:
            t = peer.read([(region, 0, target.region, 0, 16 * MiB)])
            if transport == "tcp":
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(t, 1.0)
                assert ticks >= 20, f"the event loop ran {ticks} ticks in 1 s while awaiting a read"
                assert not t.done()
            else:
                await asyncio.wait_for(t, DEADLINE)
        finally:
            target.thaw()
        await asyncio.wait_for(t, DEADLINE)
        tick_task.cancel()

    asyncio.run(main())
    assert_bytes(dst, want)


@pytest.mark.timeout(60)
def test_two_tasks_await_one_transfer(engine, start_target):
    """Like any awaitable future, one transfer may be awaited by two tasks; both wake
    when it ends. Over tcp only: a stopped target holds the read deterministically
    until both tasks are waiting (an shm read does not wait for the target at all);
    the await machinery under test is the same for both transports."""
    transport = "tcp"
    target = start_target(16 * MiB, 13)
    peer = connect(engine, target, transport)
    dst, region = alloc_dst(engine, 16 * MiB)
    want = plan(dst, target.expected, [0], [0], [16 * MiB])

    async def waiter(t) -> str:
        await t
        return "woken"

    async def main() -> None:
        target.freeze()
        try:
            t = peer.read([(region, 0, target.region, 0, 16 * MiB)])
            tasks = [asyncio.create_task(waiter(t)) for _ in range(2)]
            await asyncio.sleep(0.3)
        finally:
            target.thaw()
        done, pending = await asyncio.wait(tasks, timeout=10.0)
        for p in pending:
            p.cancel()
        assert t.done()
        assert not pending, f"{len(pending)} of 2 tasks awaiting a finished transfer never woke"
        assert [d.result() for d in done] == ["woken", "woken"]

    asyncio.run(main())
    assert_bytes(dst, want)
