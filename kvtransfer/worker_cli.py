"""What the two worker command lines share: the model folder, logging, the ready line,
and shutting down on SIGTERM/SIGINT.

A worker prints exactly one JSON line on stdout once it serves (``{"event": "ready",
...}``) — what scripts and tests wait for — and logs to stderr. A startup problem (a
missing or malformed model folder, a prefill worker that runs another model) is one
line on stderr, ``NAME: error: ...``, and exit status 2.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import NoReturn

from .errors import KVTransferError


def setup_logging(name: str, level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format=f"%(asctime)s {name} %(levelname)s %(message)s")


def model_folder(arg: str | None) -> Path:
    """``--model``, or the default seeded random model (written on first use)."""
    if arg is None:
        from .model import default_model_dir
        return default_model_dir()
    return Path(arg)


def fail(name: str, message: str) -> NoReturn:
    print(f"{name}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def print_ready(**fields: object) -> None:
    print(json.dumps({"event": "ready", "pid": os.getpid(), **fields}), flush=True)


def wait_for_signal() -> int:
    """Blocks until SIGTERM or SIGINT; returns the signal number."""
    got = threading.Event()
    which = [0]

    def handler(signum, frame):
        which[0] = signum
        got.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    while not got.wait(1.0):
        pass
    return which[0]


def startup_error(e: BaseException) -> str | None:
    """The message for an error that means "cannot start as configured", else None."""
    if isinstance(e, (KVTransferError, OSError)):
        return str(e)
    return None
