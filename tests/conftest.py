"""Fixtures: target processes (factory and shared), reader engines, transports.

Helpers they use live in ``support.py`` (imported by the tests too).
"""

from __future__ import annotations

from typing import Callable, Iterator

import pytest

from kvtransfer import Engine
from support import (MiB, SHARED_TARGET_BYTES, SHARED_TARGET_SEED, TRANSPORTS, Target, TargetLauncher,
                     close_within, make_engine)


@pytest.fixture(autouse=True)
def _no_forced_transport_from_the_environment(monkeypatch):
    """Tests choose transports themselves; a KVTRANSFER_TRANSPORT in the caller's
    environment must not change what they test (test_transport.py sets it on purpose)."""
    monkeypatch.delenv("KVTRANSFER_TRANSPORT", raising=False)


@pytest.fixture
def start_target() -> Iterator[Callable[..., Target]]:
    """Factory: ``start_target(nbytes, seed=0, *extra_args)`` -> a running :class:`Target`,
    stopped at teardown."""
    launcher = TargetLauncher()
    yield launcher.start
    launcher.close()


@pytest.fixture(scope="session")
def shared_target() -> Iterator[Target]:
    """One long-lived target for tests that neither kill nor deregister it."""
    launcher = TargetLauncher()
    yield launcher.start(SHARED_TARGET_BYTES, SHARED_TARGET_SEED)
    launcher.close()


@pytest.fixture(scope="session")
def other_target() -> Iterator[Target]:
    """A second long-lived target (another engine), for cross-engine checks and as the
    live target after another one dies."""
    launcher = TargetLauncher()
    yield launcher.start(4 * MiB + 3, 99)
    launcher.close()


@pytest.fixture
def engine() -> Iterator[Engine]:
    """A local reader engine (io_timeout 5 s), closed at teardown within a deadline."""
    eng = make_engine()
    yield eng
    close_within(eng)


@pytest.fixture
def engine_factory() -> Iterator[Callable[..., Engine]]:
    """Factory of reader engines with chosen options; all closed at teardown."""
    made: list[Engine] = []

    def make(**kwargs) -> Engine:
        eng = make_engine(**kwargs)
        made.append(eng)
        return eng

    yield make
    for eng in made:
        close_within(eng)


@pytest.fixture(params=TRANSPORTS)
def transport(request) -> str:
    return request.param


