"""Small HTTP engines that keep vLLM's side of the proxy contract, for the proxy's tests.

A :class:`FakeEngine` answers ``/v1/completions`` and ``/v1/chat/completions`` in vLLM's
shapes (token-id prompts, ``token_ids`` in each choice, server-sent events ending in
``data: [DONE]``) with a fixed toy model (:func:`generate`), and follows the
``kv_transfer_params`` convention of vLLM's KV connectors: asked with
``{"do_remote_decode": true}`` it keeps the prompt's "KV" (here, its tokens) and answers
with ``do_remote_prefill`` params naming where; asked with those params it pulls that KV
from the producer over HTTP (which frees it there) and refuses a KV of another prompt.
The real engines are exercised by test_vllm_http.py; these make the proxy's error,
timeout and load paths reproducible.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


def generate(prompt: list[int], n: int) -> list[int]:
    """The toy model: greedy tokens after ``prompt``, each a function of all before it."""
    seq = list(prompt)
    for _ in range(n):
        seq.append((sum(seq) * 31 + len(seq)) % 997)
    return seq[len(prompt):]


def prompt_tokens(body: dict[str, Any]) -> list[int]:
    """A completion's token-id prompt, or a chat's messages as UTF-8 bytes."""
    if "messages" in body:
        return list("".join(m["content"] for m in body["messages"]).encode())
    prompt = body["prompt"]
    return list(prompt.encode()) if isinstance(prompt, str) else list(prompt)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "BadRequestError", "param": None,
                                   "code": status}}, status_code=status)


class FakeEngine:
    """One engine on a random loopback port; ``requests`` holds every body it received,
    ``kv`` the prompts it keeps for remote decodes, ``cancelled`` the ids of streams whose
    client went away. Behaviours: ``fail`` = (status, message) answers every completion
    with that error; ``delay_s`` before answering; ``token_delay_s`` between streamed
    tokens; ``stall_after`` tokens, a stream goes silent."""

    def __init__(self, *, fail: tuple[int, str] | None = None, delay_s: float = 0.0,
                 token_delay_s: float = 0.0, stall_after: int | None = None, connector: bool = True):
        self.connector = connector
        self.fail, self.delay_s = fail, delay_s
        self.token_delay_s, self.stall_after = token_delay_s, stall_after
        self.requests: list[dict[str, Any]] = []
        self.kv: dict[str, list[int]] = {}
        self.cancelled: list[str] = []
        self.finished: list[str] = []
        app = Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", lambda r: Response(status_code=200), methods=["GET"]),
            Route("/kv/{rid}", self.pull, methods=["GET"]),
        ])
        self.server = ServerThread(app)
        self.url = self.server.url

    def close(self) -> None:
        self.server.close()

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "toy", "object": "model"}]})

    async def pull(self, request: Request) -> Response:
        tokens = self.kv.pop(request.path_params["rid"], None)
        if tokens is None:
            return _error(404, "no such request")
        return JSONResponse({"tokens": tokens})

    async def completions(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        if self.fail is not None:
            return _error(*self.fail)
        await asyncio.sleep(self.delay_s)
        prompt = prompt_tokens(body)
        params = (body.get("kv_transfer_params") or {}) if self.connector else {}
        if params.get("do_remote_prefill"):
            url = f"http://{params['remote_host']}:{params['remote_port']}/kv/{params['remote_request_id']}"
            async with httpx.AsyncClient(timeout=5.0) as client:
                got = await client.get(url)
            if got.status_code != 200:
                return _error(500, f"KV load failed: {got.text}")
            if got.json()["tokens"] != prompt:
                return _error(400, "the pulled KV belongs to another prompt")
        out_params = None
        if params.get("do_remote_decode"):
            rid = uuid.uuid4().hex
            self.kv[rid] = prompt
            out_params = {"do_remote_prefill": True, "remote_request_id": rid,
                          "remote_host": "127.0.0.1", "remote_port": self.server.port}
        tokens = generate(prompt, int(body.get("max_tokens", 16)))
        rid = request.headers.get("x-request-id", uuid.uuid4().hex)
        if body.get("stream"):
            return StreamingResponse(self._stream(rid, tokens), media_type="text/event-stream")
        return JSONResponse({"id": rid, "object": "text_completion", "model": "toy",
                             "choices": [{"index": 0, "text": _text(tokens), "token_ids": tokens,
                                          "finish_reason": "length"}],
                             "kv_transfer_params": out_params})

    async def _stream(self, rid: str, tokens: list[int]):
        try:
            for i, tok in enumerate(tokens):
                if self.stall_after is not None and i == self.stall_after:
                    await asyncio.sleep(3600)
                await asyncio.sleep(self.token_delay_s)
                last = i == len(tokens) - 1
                chunk = {"id": rid, "object": "text_completion", "model": "toy",
                         "choices": [{"index": 0, "text": _text([tok]), "token_ids": [tok],
                                      "finish_reason": "length" if last else None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
            self.finished.append(rid)
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.append(rid)
            raise


def _text(tokens: list[int]) -> str:
    return "".join(f" {t}" for t in tokens)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """A uvicorn server for ``app`` on a random loopback port, in a thread; ``close()``
    stops it within a deadline (or fails)."""

    def __init__(self, app, start_timeout_s: float = 10.0):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.close()
                raise RuntimeError(f"server on port {self.port} did not start in {start_timeout_s} s")
            time.sleep(0.01)

    def close(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"server on port {self.port} did not stop in {timeout_s} s"


def sse_events(lines) -> list[Any]:
    """The JSON events of a server-sent event stream (``[DONE]`` as the string)."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out
