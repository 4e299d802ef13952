"""``vllm serve`` as a child process, for the tests and ``bench/vllm_pd.py``.

The command line is the one the README prints (``vllm serve`` there is .venv-vllm's shim
for ``python -m kvtransfer.connector.vllm_cli``): loopback, offline, token-id prompts
(``--skip-tokenizer-init``), float32, eager mode, a small KV cache. The child runs in its
own session, so :meth:`VllmServer.stop` ends its EngineCore too; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Sequence

import httpx

#: what a test or benchmark engine's environment must say (offline; CPU; no telemetry)
BASE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_TARGET_DEVICE": "cpu",
            "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def serve_args(model: Path | str, port: int, kv_transfer_config: dict | None, *, name: str = "tiny-llama",
               block_size: int = 32, max_model_len: int = 1024, kv_cache_bytes: int = 64 << 20,
               extra: Sequence[str] = ()) -> list[str]:
    """The arguments after ``vllm`` (``serve MODEL ...``)."""
    args = ["serve", str(model), "--host", "127.0.0.1", "--port", str(port), "--served-model-name", name,
            "--skip-tokenizer-init", "--dtype", "float32", "--enforce-eager", "--block-size", str(block_size),
            "--max-model-len", str(max_model_len), "--kv-cache-memory-bytes", str(kv_cache_bytes), *extra]
    if kv_transfer_config is not None:
        args += ["--kv-transfer-config", json.dumps(kv_transfer_config)]
    return args


class VllmServer:
    """One ``vllm serve`` child; output goes to ``log``. ``cpu``: the cores its OpenMP
    threads are bound to (``VLLM_CPU_OMP_THREADS_BIND``)."""

    def __init__(self, python: Path | str, args: list[str], *, cpu: str, log: Path, env: dict[str, str] | None = None):
        self.url = f"http://127.0.0.1:{args[args.index('--port') + 1]}"
        self.log = log
        child_env = {**os.environ, **BASE_ENV, "VLLM_CPU_OMP_THREADS_BIND": cpu, **(env or {})}
        child_env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override --kv-cache-memory-bytes
        with log.open("w") as out:
            self.proc = subprocess.Popen([str(python), "-m", "kvtransfer.connector.vllm_cli", *args], stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env,
                                         start_new_session=True)

    def wait_ready(self, deadline: float) -> None:
        """Until ``/health`` answers 200; RuntimeError with the log's tail if the child exits
        or ``deadline`` (time.monotonic()) passes."""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited ({self.proc.returncode}); {self.log}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"vllm serve at {self.url} not ready in time; {self.log}:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the child's process group, then SIGKILL after ``timeout``."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left in the group (the EngineCore)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=timeout)
