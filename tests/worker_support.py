"""Test support for the standalone workers: model folders, worker processes (each with
an HTTP client, :class:`kvtransfer.testing.openai_client.OpenAIClient`), a control-plane
probe of a prefill worker's pool, and the one-process references the workers' tokens are
compared with.

Workers are real processes: ``python -m prefill_worker --control tcp://127.0.0.1:0 ...``
and ``python -m decode_worker --prefill EP --port 0 ...``. Each prints one JSON "ready"
line on stdout (read with :func:`kvtransfer.testing.children.start_child`, within a deadline); its
stderr goes to a log file of its own, quoted when a test fails. They are stopped by pid:
SIGTERM, a bounded wait, then SIGKILL. Every HTTP request has a socket timeout and, for
streams, an overall deadline; every poll has a deadline.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest
import torch

from kvtransfer.testing.children import ChildError, start_child, stop_child
from kvtransfer.testing.openai_client import OpenAIClient

ROOT = Path(__file__).resolve().parent.parent

#: torch import + model load; generous because the test machine may be shared
STARTUP_S = 120.0
#: SIGTERM -> exit (a decode worker may be in a 5 s reconnect attempt to a dead prefill worker)
STOP_S = 20.0
#: one HTTP request's socket timeout
HTTP_S = 90.0
#: the workers' default block size (tokens per KV block)
BLOCK_SIZE = 16

_MODELS = Path(tempfile.mkdtemp(prefix="kvtransfer-worker-tests-"))
atexit.register(shutil.rmtree, _MODELS, ignore_errors=True)


# --- model folders -------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _model_folder(name: str, arch: str, seed: int, eos_boost: float | None, overrides: str) -> Path:
    from safetensors.torch import load_file, save_file

    from kvtransfer.model import make_random_model
    from kvtransfer.model.tokenizer import BYTE_EOS

    folder = make_random_model(_MODELS / name, seed=seed, arch=arch, **json.loads(overrides))
    if eos_boost is not None:
        file = folder / "model.safetensors"
        tensors = load_file(str(file))
        tensors["lm_head.weight"][BYTE_EOS] *= eos_boost
        save_file(tensors, str(file), metadata={"format": "pt"})
    return folder


def model_folder(name: str, arch: str = "llama", seed: int = 0, *, eos_boost: float | None = None,
                 **overrides: Any) -> Path:
    """A random model folder named ``name`` (the decode worker serves it under that name),
    written once per test session. Default shapes unless overridden. ``eos_boost``
    multiplies the output row of EOS, so greedy text reaches EOS now and then (the
    random models make EOS, like every non-printable byte, rare)."""
    return _model_folder(name, arch, seed, eos_boost, json.dumps(overrides, sort_keys=True))


@functools.lru_cache(maxsize=None)
def loaded_model(folder: Path):
    from kvtransfer.model import load_model

    return load_model(folder)


_REF_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def _reference(folder: Path, prompt: tuple[int, ...], max_tokens: int, temperature: float, top_p: float,
               seed: int | None, stop_ids: tuple[int, ...]) -> tuple[int, ...]:
    from kvtransfer.model.generate import reference_generate

    with _REF_LOCK, torch.no_grad():
        return tuple(reference_generate(loaded_model(folder), list(prompt), max_tokens, temperature=temperature,
                                        top_p=top_p, seed=seed, stop_ids=stop_ids, block_size=BLOCK_SIZE))


def reference(folder: Path, prompt: Sequence[int], max_tokens: int, *, temperature: float = 0.0,
              top_p: float = 1.0, seed: int | None = None, stop_ids: Sequence[int] = ()) -> list[int]:
    """The same weights in one process (:func:`kvtransfer.model.generate.reference_generate`)."""
    return list(_reference(folder, tuple(prompt), max_tokens, float(temperature), float(top_p), seed,
                           tuple(sorted(stop_ids))))


@functools.lru_cache(maxsize=None)
def _hf_model(folder: Path):
    from model_support import hf_model

    return hf_model(folder)


@functools.lru_cache(maxsize=None)
def _hf_reference(folder: Path, prompt: tuple[int, ...], steps: int) -> tuple[int, ...]:
    from model_support import hf_greedy

    with _REF_LOCK:
        return tuple(hf_greedy(_hf_model(folder), list(prompt), steps)[0])


def hf_reference(folder: Path, prompt: Sequence[int], steps: int) -> list[int]:
    """Hugging Face Transformers' greedy argmax loop on the same folder (float32; no EOS
    stop). Call ``pytest.importorskip("transformers")`` first."""
    return list(_hf_reference(folder, tuple(prompt), steps))


def prompt_ids(n: int, seed: int) -> list[int]:
    """``n`` seeded token ids in [0, 258): bytes, BOS and EOS of the byte-level tokenizer."""
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(0, 258, (n,), generator=g).tolist()


# --- worker processes ----------------------------------------------------------------------

def tail(path: Path, nchars: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-nchars:]
    except OSError:
        return "<no log>"


@dataclass(eq=False)  # compared (and hashed) by identity
class Worker:
    """A running worker process and its ready line."""
    what: str
    proc: subprocess.Popen
    hello: dict
    log_path: Path
    exit_code: int | None = None
    needed_kill: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return tail(self.log_path)

    def kill(self) -> None:
        """SIGKILL by pid (a process this suite started), reaped within a deadline."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.exit_code = self.proc.wait(timeout=STOP_S)

    def stop(self, timeout: float = STOP_S) -> int | None:
        """SIGTERM by pid, a bounded wait, then SIGKILL. Returns the exit status."""
        if not stop_child(self.proc, timeout, sig=signal.SIGTERM):
            self.needed_kill = True
        self.exit_code = self.proc.returncode
        return self.exit_code


@dataclass(eq=False)
class Prefill(Worker):
    kv_blocks: int = 0

    @property
    def endpoint(self) -> str:
        return self.hello["control"]


@dataclass(eq=False)
class Decode(Worker):
    kv_blocks: int = 0

    @property
    def url(self) -> str:
        return self.hello["url"]

    @property
    def http(self) -> OpenAIClient:
        return OpenAIClient(self.url, HTTP_S)

    def health(self) -> dict:
        r = self.http.get("/health")
        assert r.status == 200, f"{self.what}: GET /health -> {r.status} {r.body[:500]!r}\n{self.log()}"
        return r.json()

    def wait_idle(self, timeout: float = 30.0) -> dict:
        """Polls /health until nothing runs and every KV block is free again."""
        end = time.monotonic() + timeout
        while True:
            h = self.health()
            if h["running"] == 0 and h["free_blocks"] == self.kv_blocks:
                return h
            if time.monotonic() > end:
                pytest.fail(f"{self.what}: not idle {timeout} s later (pool of {self.kv_blocks}): {h}")
            time.sleep(0.05)


#: every worker started here, so that none outlives the test session (an interrupted run
#: may skip fixture teardown; atexit still runs)
_STARTED: list[Worker] = []


@atexit.register
def _kill_leftovers() -> None:
    for w in _STARTED:
        if w.proc.poll() is None:
            try:
                os.kill(w.proc.pid, signal.SIGKILL)
                w.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass


# The worker's stderr goes to its log file; cwd is the repository; a KVTRANSFER_TRANSPORT of
# the caller's must not choose transports for the tests. exec keeps the pid: it is the worker's.
_WRAP = 'cd "$0" || exit 70; log="$1"; shift; unset KVTRANSFER_TRANSPORT; exec "$@" 2>>"$log"'


class Fleet:
    """Starts workers (several at once when asked) and stops every one at :meth:`close`."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.workers: list[Worker] = []
        self._lock = threading.Lock()
        self._n = 0

    def _launch(self, cls, what: str, module: str, args: list[str], **extra) -> Worker:
        with self._lock:
            self._n += 1
            log = self.log_dir / f"{self._n:02d}-{what}.log"
        cmd = ["/bin/sh", "-c", _WRAP, str(ROOT), str(log), sys.executable, "-m", module, *args]
        try:
            proc, hello = start_child(cmd, STARTUP_S, what)
        except ChildError as e:
            pytest.fail(f"{what} did not start: {e}\n{' '.join(cmd[5:])}\nits log:\n{tail(log)}")
        w = cls(what, proc, hello, log, **extra)
        with self._lock:
            self.workers.append(w)
            _STARTED.append(w)
        assert hello.get("event") == "ready" and hello.get("pid") == proc.pid, f"{what}: ready line {hello}"
        return w

    def prefill(self, folder: Path, *extra: str, name: str = "prefill", kv_blocks: int = 512,
                control: str = "tcp://127.0.0.1:0") -> Prefill:
        args = ["--model", str(folder), "--control", control, "--kv-blocks", str(kv_blocks), "--name", name,
                *extra]
        return self._launch(Prefill, name, "prefill_worker", args, kv_blocks=kv_blocks)

    def decode(self, folder: Path, prefill: Sequence[Prefill | str], *extra: str, name: str = "decode",
               transport: str | None = None, kv_blocks: int = 512) -> Decode:
        args = ["--model", str(folder), "--port", "0", "--kv-blocks", str(kv_blocks)]
        for p in prefill:
            args += ["--prefill", p if isinstance(p, str) else p.endpoint]
        if transport:
            args += ["--transport", transport]
        return self._launch(Decode, name, "decode_worker", [*args, *extra], kv_blocks=kv_blocks)

    def together(self, *starts: Callable[[], Worker]) -> list[Worker]:
        """Runs several ``lambda: fleet.prefill(...)`` at once (startup is mostly torch's
        import); returns the workers in order."""
        with concurrent.futures.ThreadPoolExecutor(len(starts)) as ex:
            futures = [ex.submit(s) for s in starts]
            return [f.result(timeout=STARTUP_S + 30) for f in futures]

    def close(self) -> list[str]:
        """Stops every worker (all at once); returns problems: a worker that needed
        SIGKILL after SIGTERM, or exited non-zero (workers killed on purpose excepted)."""
        live = [w for w in self.workers if w.exit_code is None]
        with concurrent.futures.ThreadPoolExecutor(max(1, len(live))) as ex:
            list(ex.map(lambda w: w.stop(), live, timeout=2 * STOP_S + 10))
        problems = [f"{w.what} (pid {w.pid}): " + ("needed SIGKILL after SIGTERM" if w.needed_kill
                                                  else f"exit status {w.exit_code}, expected 0 after SIGTERM")
                    + f"; its log:\n{w.log()[-2000:]}"
                    for w in live if w.needed_kill or w.exit_code != 0]
        self.workers.clear()
        return problems


def run_refused(module: str, *args: str, timeout: float = 90.0) -> tuple[int, str]:
    """Runs a worker that must refuse to start: (exit status, stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "KVTRANSFER_TRANSPORT"}
    try:
        r = subprocess.run([sys.executable, "-m", module, *args], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired as e:  # run() killed it
        pytest.fail(f"{module} {' '.join(args)}: still running after {timeout} s; stderr:\n{e.stderr}")
    return r.returncode, r.stderr


# --- HTTP ---------------------------------------------------------------------------------

def concurrently(calls: Sequence[Callable[[], Any]], timeout: float = 2 * HTTP_S) -> list[Any]:
    """Runs every call in its own thread, all at once; their results in order (the first
    exception is raised). Bounded by ``timeout``."""
    ex = concurrent.futures.ThreadPoolExecutor(len(calls))
    try:
        futures = [ex.submit(c) for c in calls]
        done, pending = concurrent.futures.wait(futures, timeout=timeout)
        assert not pending, f"{len(pending)} of {len(calls)} concurrent calls still running after {timeout} s"
        return [f.result() for f in futures]
    finally:
        ex.shutdown(wait=False, cancel_futures=True)


def wait_until(check: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    """Polls ``check`` until it returns something truthy; fails after ``timeout`` s."""
    end = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > end:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(every)


# --- the prefill side's pool, through the control plane --------------------------------------

class PrefillProbe:
    """A control-plane session of this test process with a prefill worker, for its pool
    counters (``stats()``: free/used blocks, pinned requests). It holds a one-block pool
    of the same model, so the handshake accepts it; it never pulls."""

    def __init__(self, prefill: Prefill, folder: Path, timeout: float = 5.0):
        from kvtransfer import Engine
        from kvtransfer.control import ControlClient
        from kvtransfer.kv import CompatInfo
        from kvtransfer.model.identity import model_identity

        self.prefill = prefill
        layout = loaded_model(folder).kv_layout(1, BLOCK_SIZE)
        self._buf = torch.zeros(layout.region_nbytes(), dtype=torch.uint8)
        self._engine = Engine()
        try:
            self._region, _ = self._engine.register(self._buf)
            self.client = ControlClient(prefill.endpoint, engine=self._engine, regions=[self._region],
                                        layout=layout, compat=CompatInfo.of(layout, model_identity(folder)),
                                        timeout=timeout, name="test-probe")
        except BaseException:
            self._engine.close()
            raise

    def stats(self):
        return self.client.stats()

    def wait_idle(self, timeout: float = 30.0):
        """Polls until every block of the prefill worker's pool is free and nothing is pinned."""
        end = time.monotonic() + timeout
        while True:
            s = self.stats()
            if s.used_blocks == 0 and s.pinned_requests == 0 and s.free_blocks == self.prefill.kv_blocks:
                return s
            if time.monotonic() > end:
                pytest.fail(f"{self.prefill.what}: pool not idle {timeout} s later: {s}")
            time.sleep(0.05)

    def close(self) -> None:
        self.client.close()
        self._region.close()
        self._engine.close()

    def __enter__(self) -> "PrefillProbe":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
