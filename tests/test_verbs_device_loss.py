"""The RDMA port disappears under a connected peer (its link goes down): reads fail with
an error that says what failed, within the io timeout, and nothing hangs; once the link
is back, a new connection reads correctly. Runs last in the soft-RoCE guest
(scripts/rxe/guest_tests.sh sets KVTRANSFER_TEST_RXE_NETDEV to rxe0's netdev).

Deleting rxe0 itself is not done here: the rxe driver cannot disassociate open user
contexts, so `rdma link delete` waits (uninterruptibly) until every process using the
device has closed it."""

from __future__ import annotations

import os
import subprocess
import time

import numpy as np
import pytest

from kvtransfer import Engine, KVTransferError

from support import MiB, WAIT_S, alloc_dst, close_within

NETDEV = os.environ.get("KVTRANSFER_TEST_RXE_NETDEV")
IO_TIMEOUT = 3.0


def link(state: str) -> None:
    subprocess.run(["ip", "link", "set", NETDEV, state], check=True, timeout=30)


@pytest.mark.timeout(120)
@pytest.mark.skipif(not NETDEV, reason="only in the soft-RoCE guest, where the test owns rxe0's netdev")
def test_port_lost_under_a_connected_peer():
    target, reader = Engine(io_timeout=IO_TIMEOUT), Engine(io_timeout=IO_TIMEOUT)
    assert target.verbs_unavailable is None, target.verbs_unavailable
    src = np.random.default_rng(3).integers(0, 256, MiB, dtype=np.uint8)
    try:
        _, desc = target.register(src)
        dst, region = alloc_dst(reader, MiB)
        peer = reader.connect(target.descriptor, transport="verbs")
        peer.read([(region, 0, desc, 0, MiB)]).wait(timeout=WAIT_S)
        assert np.array_equal(dst, src)

        link("down")
        try:
            t0 = time.monotonic()
            with pytest.raises(KVTransferError) as ei:
                peer.read([(region, 0, desc, 0, MiB)]).wait(timeout=WAIT_S)
            took = time.monotonic() - t0
            assert took < IO_TIMEOUT + 10, f"took {took:.1f} s"
            assert ei.value.errno and ei.value.op, ei.value
            text = str(ei.value)
            assert "RDMA READ" in text or "no completion" in text or "ibv_" in text, text
        finally:
            link("up")
        # the port comes back: a fresh connection works again
        deadline = time.monotonic() + 30
        while True:
            try:
                again = reader.connect(target.descriptor, transport="verbs")
                dst[:] = 0
                again.read([(region, 0, desc, 0, MiB)]).wait(timeout=WAIT_S)
                break
            except KVTransferError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        assert np.array_equal(dst, src)
    finally:
        close_within(reader)
        close_within(target)
