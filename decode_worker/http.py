"""The decode worker's HTTP front door: an OpenAI-compatible ASGI app (Starlette), served
by uvicorn (:mod:`.server`).

``POST /v1/completions`` and ``POST /v1/chat/completions`` (``stream: true``:
server-sent events, one chunk per token, then ``data: [DONE]``), ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus).

Limits here: a body over ``max_body`` bytes is 413, one that is not JSON or nests deeper
than ``max_depth`` is 400, a bad field is 400 naming it (:mod:`.openai_api`). A client
that goes away — streamed or not — cancels its sequence, which frees its blocks at the
scheduler's next step. Generation runs in the scheduler's thread; its events reach the
event loop through :class:`_LoopSink`, so a waiting request holds no thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

import anyio.to_thread
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kvtransfer.errors import KVTransferError
from kvtransfer.json_body import BodyError, read_json_body

from .openai_api import BadRequest, CompletionRequest, error_body, models_body, parse_chat, parse_completion, \
    response_body
from .router import NoPrefillWorker
from .worker import ITL, REQUESTS, DecodeWorker, Generation

log = logging.getLogger("decode_worker")

CLIENT_GONE = Counter("kvtransfer_client_disconnects", "Generations cancelled because the client went away",
                      ["mode"])


@dataclass(frozen=True)
class AppLimits:
    max_body: int = 4 << 20        # bytes of a request body
    max_depth: int = 32            # JSON nesting (an OpenAI request needs about 5)
    token_timeout: float = 120.0   # no token for this long: the scheduler is stuck, fail the request


class _Problem(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


class _Stop:
    """Stop strings over the decoded text: where to cut, and what is safe to emit
    (text that could still become the start of a stop string is held back)."""

    def __init__(self, stops: list[str]):
        self.stops = stops

    def cut(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def safe(self, text: str) -> int:
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        return len(text) - keep


class _LoopSink:
    """A sequence's event queue on the event loop: the scheduler's thread puts, a request
    awaits. Events for a loop that has closed (the server stopped) are dropped."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self.queue: asyncio.Queue[tuple] = asyncio.Queue()

    def put(self, event: tuple) -> None:
        try:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:
            pass


async def _until_disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    """Returns when the client has gone (the request's body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class OpenAIApp:
    def __init__(self, worker: DecodeWorker, limits: AppLimits = AppLimits()):
        self.worker, self.limits = worker, limits
        self.app = Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ], exception_handlers={404: self._not_found, 405: self._not_allowed})

    # --- plumbing ------------------------------------------------------------------------

    def _error(self, request: Request, status: int, message: str, param: str | None = None,
               code: str | None = None) -> JSONResponse:
        kind = "invalid_request_error" if status < 500 else "server_error"
        log.info("%s %s -> %d: %s", request.method, request.url.path, status, message)
        if request.url.path.startswith("/v1/") and request.method == "POST":
            REQUESTS.labels(str(status)).inc()
        return JSONResponse(error_body(message, param, code, kind), status)

    async def _not_found(self, request: Request, exc: Exception) -> JSONResponse:
        return self._error(request, 404, f"no route {request.method} {request.url.path}")

    async def _not_allowed(self, request: Request, exc: Exception) -> JSONResponse:
        return self._error(request, 405, f"{request.url.path} does not take {request.method}")

    async def _body(self, request: Request) -> Any:
        """The request's JSON, within the size and nesting limits."""
        try:
            return await read_json_body(request.stream(), request.headers.get("content-length"),
                                        max_bytes=self.limits.max_body, max_depth=self.limits.max_depth)
        except BodyError as e:
            raise _Problem(e.status, e.message) from None

    # --- routes --------------------------------------------------------------------------

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse(self.worker.health())

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse(models_body(self.worker.served_name, self.worker.model_id))

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, chat: bool) -> Response:
        w = self.worker
        try:
            body = await self._body(request)
            parse = parse_chat if chat else parse_completion
            req = parse(body, served_model=w.served_name, tokenizer=w.tokenizer, vocab_size=w.vocab_size,
                        max_context=w.max_context, **({"chat_template": w.chat_template} if chat else {}))
            sink = _LoopSink(asyncio.get_running_loop())
            gen = await anyio.to_thread.run_sync(w.start, req, w.new_request_id(), sink)
        except ClientDisconnect:
            return Response(status_code=499)
        except _Problem as e:
            return self._error(request, e.status, str(e), e.param, e.code)
        except BadRequest as e:
            return self._error(request, e.status, str(e), e.param, e.code)
        except NoPrefillWorker as e:
            return self._error(request, 503, str(e), code="no_prefill_worker")
        except KVTransferError as e:
            return self._error(request, 502, f"prefill failed: {e}", code="prefill_failed")
        except Exception as e:  # a bug: answer it, log it, keep serving
            log.exception("POST %s failed", request.url.path)
            return self._error(request, 500, f"internal error: {type(e).__name__}: {e}", code="internal_error")
        run = _Run(self, gen, sink, req, chat)
        if req.stream:
            REQUESTS.labels("200").inc()
            return StreamingResponse(run.sse(request.receive), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await run.complete(request)


class _Run:
    """One generation from the first token to the response's end."""

    def __init__(self, api: OpenAIApp, gen: Generation, sink: _LoopSink, req: CompletionRequest, chat: bool):
        self.api, self.gen, self.sink, self.chat = api, gen, sink, chat
        self.stop = _Stop(req.stop)
        self.tok = api.worker.tokenizer
        self.finished = False  # the sequence ended on its own (or failed), not by the client leaving

    async def events(self) -> AsyncIterator[tuple[str, Any]]:
        """("token", id) ... then ("done", reason) or ("error", message)."""
        gen, last = self.gen, self.gen.arrived
        timeout = self.api.limits.token_timeout
        while True:
            try:
                kind, value, at = await asyncio.wait_for(self.sink.queue.get(), timeout)
            except asyncio.TimeoutError:
                gen.seq.cancel()
                self.finished = True
                yield "error", f"no token for {timeout} s"
                return
            if kind == "token":
                if at > last and last != gen.arrived:
                    ITL.observe(at - last)
                last = at
            else:
                self.finished = True
            yield kind, value
            if kind != "token":
                return

    def _finish(self, tokens: list[int], reason: str) -> tuple[str, str]:
        text = self.tok.decode(tokens)
        cut = self.stop.cut(text)
        if cut is not None:
            return text[:cut], "stop"
        return text, "stop" if reason == "cancelled" else reason

    def _usage(self, n: int) -> dict:
        return {"prompt_tokens": self.gen.prompt_tokens, "completion_tokens": n,
                "total_tokens": self.gen.prompt_tokens + n}

    def _body(self, text: str, tokens: list[int], reason: str | None, usage: dict | None = None,
              kv: dict | None = None, *, chunk: bool, first: bool = False) -> dict:
        return response_body(self.gen.request_id, self.api.worker.served_name, text, tokens, reason, usage, kv,
                             chat=self.chat, chunk=chunk, first=first)

    def _left(self, mode: str) -> None:
        self.gen.seq.cancel()  # the scheduler frees the blocks at its next step
        CLIENT_GONE.labels(mode).inc()
        log.info("request %s: client disconnected (%s)", self.gen.request_id, mode)

    async def complete(self, request: Request) -> Response:
        collect = asyncio.ensure_future(self._collect())
        gone = asyncio.ensure_future(_until_disconnect(request.receive))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not collect.done():
                self._left("complete")
                await collect  # ends at the scheduler's next step, with "cancelled"
                REQUESTS.labels("499").inc()  # nginx's "client closed request"; nobody reads it
                return Response(status_code=499)
            status, body = collect.result()
            REQUESTS.labels(str(status)).inc()
            return JSONResponse(body, status)
        finally:
            gone.cancel()
            collect.cancel()

    async def _collect(self) -> tuple[int, dict]:
        tokens: list[int] = []
        async for kind, value in self.events():
            if kind == "token":
                tokens.append(value)
                if self.stop.stops and self.stop.cut(self.tok.decode(tokens)) is not None:
                    self.gen.seq.cancel()
            elif kind == "error":
                return 500, error_body(f"generation failed: {value}", code="generation_failed", kind="server_error")
            else:
                text, reason = self._finish(tokens, value)
                return 200, self._body(text, tokens, reason, self._usage(len(tokens)), self.gen.kv, chunk=False)
        raise AssertionError("events() ends with done or error")

    async def sse(self, receive: Callable[[], Awaitable[dict]]) -> AsyncIterator[bytes]:
        """The stream's events; a client that leaves cancels the sequence (noticed by
        ``receive``, or by the next write failing)."""
        gone = asyncio.ensure_future(_until_disconnect(receive))
        gone.add_done_callback(lambda f: None if f.cancelled() or self.finished else self._left("stream"))
        tokens: list[int] = []
        sent = ""  # text already sent
        try:
            if self.chat:  # OpenAI's first chat chunk names the role
                yield self._event(self._body("", [], None, chunk=True, first=True))
            async for kind, value in self.events():
                if kind == "token":
                    tokens.append(value)
                    text = self.tok.decode(tokens)
                    if self.stop.stops and self.stop.cut(text) is not None:
                        self.gen.seq.cancel()
                        continue
                    # hold back an unfinished UTF-8 character and a possible stop string start
                    ready = text[:self.stop.safe(text.rstrip("\ufffd"))]
                    delta, sent = (ready[len(sent):], ready) if ready.startswith(sent) else ("", sent)
                    yield self._event(self._body(delta, [value], None, chunk=True))
                elif kind == "error":
                    yield self._event(error_body(f"generation failed: {value}", kind="server_error"))
                    break
                else:
                    text, reason = self._finish(tokens, value)
                    yield self._event(self._body(text[len(sent):], [], reason, self._usage(len(tokens)),
                                                 self.gen.kv, chunk=True))
            yield b"data: [DONE]\n\n"
        finally:
            if not gone.done():
                gone.cancel()
                if not self.finished:  # closed mid-stream without receive() noticing first
                    self._left("stream")

    @staticmethod
    def _event(body: dict) -> bytes:
        return b"data: " + json.dumps(body).encode() + b"\n\n"


def make_app(worker: DecodeWorker, limits: AppLimits = AppLimits()) -> Starlette:
    return OpenAIApp(worker, limits).app
