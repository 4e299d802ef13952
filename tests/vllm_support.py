"""Test support for the vLLM connector: a tiny random Llama and real vLLM engines.

The model is written at test time (kvtransfer.model.random_model: 2 layers, hidden 128,
head size 32, 2 KV heads), so nothing is downloaded. Each engine is ``tests/vllm_engine.py``
run by .venv-vllm's Python (scripts/setup_vllm.sh installs it), offline, on token-id
prompts, in its own process group: vLLM starts an EngineCore process under it, and a
test that kills "the producer" kills the whole group. Every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from connector_support import ROOT, JsonChild

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
BLOCK_SIZE = 32
MODEL_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, vocab_size=384, max_position_embeddings=1024)
#: an engine's start: 30-50 s on two idle cores, over 4 minutes on two cores shared by many
START_S = 900.0
GENERATE_S = 120.0


def make_tiny_llama(folder: Path, seed: int = 0) -> Path:
    from kvtransfer.model.random_model import make_random_model

    return make_random_model(folder, seed=seed, **MODEL_SHAPE)


def free_port_base(span: int = 30) -> int:
    """A base port with ``span`` ports after it that are free now (on loopback)."""
    import random
    import socket

    for _ in range(100):
        base = random.randrange(20000, 60000 - span)
        try:
            socks = []
            for p in range(base, base + span):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free range of loopback ports")


def require_vllm() -> None:
    if not VLLM_PYTHON.exists():
        pytest.skip(f"{VLLM_PYTHON} is missing: run scripts/setup_vllm.sh (make setup-vllm)")


def connector_config(role: str, port: int, **extra: Any) -> dict:
    return {"kv_connector": "KVTransferConnector", "kv_connector_module_path": "kvtransfer.connector.vllm",
            "kv_role": role, "kv_connector_extra_config": {"port": port, "host": "127.0.0.1", **extra}}


class VllmEngine(JsonChild):
    """One engine process (see tests/vllm_engine.py)."""

    def __init__(self, name: str, model: Path, *, cpu: str, kv_transfer_config: dict | None = None,
                 failure_policy: str | None = None) -> None:
        cfg = {"model": str(model), "kv_transfer_config": kv_transfer_config,
               "kv_load_failure_policy": failure_policy, "kv_cache_bytes": 64 << 20}
        env: dict[str, str | None] = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_TARGET_DEVICE": "cpu",
               "VLLM_CPU_OMP_THREADS_BIND": cpu, "VLLM_CPU_KVCACHE_SPACE": None, "VLLM_LOGGING_LEVEL": "INFO",
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false",
               "KVTRANSFER_TRANSPORT": None}
        self.name = name
        super().__init__(["tests/vllm_engine.py", json.dumps(cfg)], env=env, python=str(VLLM_PYTHON),
                         ready_timeout=None, what=f"vLLM engine {name}", new_session=True)

    def wait_ready(self, timeout: float = START_S) -> dict:
        return super().wait_ready(timeout)

    def generate(self, prompts: list[list[int]], max_tokens: int, params: list[dict | None] | None = None) -> list[dict]:
        return self.call(GENERATE_S, op="generate", prompts=prompts, max_tokens=max_tokens, params=params)["outputs"]

    def kill_group(self) -> None:
        """SIGKILL to the engine's process group (the driver and its EngineCore)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 60.0) -> None:
        """End of stdin, a bounded wait for the driver, then SIGKILL to the group: vLLM's
        EngineCore outlives its driver and holds the stdout pipe (closing our end while the
        reader thread waits on it would hang)."""
        import subprocess

        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        super().stop(timeout)
