"""An OpenAI-compatible proxy in front of vLLM producer (prefill) and consumer (decode)
engines that run a KV connector (ours, or any that follows vLLM's ``kv_transfer_params``
convention, such as NixlConnector).

``python -m kvtransfer.connector.proxy --prefill URL [URL...] --decode URL [URL...] --port P``

For ``POST /v1/completions`` and ``POST /v1/chat/completions`` it
1. sends the request to the least busy producer with ``max_tokens=1``, ``stream`` off and
   ``kv_transfer_params={"do_remote_decode": true}``: the producer computes the prompt's
   KV, keeps its blocks pinned and answers with ``kv_transfer_params`` that say where;
2. sends the client's request unchanged, plus those ``kv_transfer_params``, to the least
   busy consumer, which pulls the KV and decodes; its answer (streamed or not) goes back
   to the client as it comes.

``GET /v1/models`` is a consumer's; ``GET /health`` asks every upstream. An upstream's
HTTP error comes back with the upstream's status and message (naming the upstream); an
upstream that cannot be reached is 502, one that stops answering 504 (every upstream call
has a deadline). A client that goes away cancels the upstream request, so the engine
aborts it and frees its blocks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import socket
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import anyio
import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..json_body import BodyError, read_json_body

log = logging.getLogger("kvtransfer.proxy")

#: the largest request body accepted, and the largest non-streamed upstream answer read
MAX_BODY_BYTES = 16 << 20
#: JSON nesting accepted in a request body (an OpenAI request needs about 5)
MAX_BODY_DEPTH = 64
#: request headers passed on to the engines (an engine started with --api-key needs the first)
FORWARDED_HEADERS = ("authorization", "x-request-id")


class UpstreamError(Exception):
    """An upstream failed: ``status`` and ``message`` are what the client gets."""

    def __init__(self, status: int, message: str, kind: str = "UpstreamError"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


def error_response(status: int, message: str, kind: str) -> JSONResponse:
    """An error in the shape vLLM's OpenAI server answers with."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}},
                        status_code=status)


@dataclass
class Upstream:
    """One engine's base URL and how many proxied requests it is serving now."""

    url: str
    in_flight: int = 0


@dataclass
class Pool:
    """Engines of one role; :meth:`take` picks the least busy (ties in turn)."""

    role: str
    upstreams: list[Upstream]
    _turn: int = field(default=0)

    def acquire(self) -> Upstream:
        n = len(self.upstreams)
        order = [self.upstreams[(self._turn + i) % n] for i in range(n)]
        self._turn = (self._turn + 1) % n
        up = min(order, key=lambda u: u.in_flight)
        up.in_flight += 1
        return up

    def release(self, up: Upstream) -> None:
        up.in_flight -= 1

    @contextlib.contextmanager
    def take(self) -> Iterator[Upstream]:
        up = self.acquire()
        try:
            yield up
        finally:
            self.release(up)


def _upstream_message(body: bytes) -> str:
    """The message of an upstream's error body (vLLM's shapes, else the text itself)."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:2000] or "(empty body)"
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if "message" in data:
            return str(data["message"])
        if isinstance(err, str):
            return err
    return json.dumps(data)[:2000]


def _transport_error(role: str, up: Upstream, exc: httpx.HTTPError) -> UpstreamError:
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamError(504, f"{role} {up.url}: no answer in time ({type(exc).__name__})",
                             "UpstreamTimeout")
    return UpstreamError(502, f"{role} {up.url}: {type(exc).__name__}: {exc}", "UpstreamUnavailable")


async def _read_bounded(resp: httpx.Response, limit: int, role: str, up: Upstream) -> bytes:
    declared = resp.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise UpstreamError(502, f"{role} {up.url}: answer of {declared} bytes exceeds {limit}")
    chunks, size = [], 0
    async for chunk in resp.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise UpstreamError(502, f"{role} {up.url}: answer exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _sse_error(message: str, kind: str, status: int) -> bytes:
    """An error inside an event stream already under way (its HTTP status is sent)."""
    err = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return f"data: {json.dumps(err)}\n\n".encode()


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The producer's request: one token, not streamed, KV kept for a remote decode."""
    req = dict(body)
    req["max_tokens"] = 1
    if "max_completion_tokens" in req:
        req["max_completion_tokens"] = 1
    req["stream"] = False
    for key in ("stream_options", "min_tokens"):
        req.pop(key, None)
    req["kv_transfer_params"] = {"do_remote_decode": True}
    return req


class Proxy:
    """The proxy's state: the two pools, the upstream HTTP client and the limits."""

    def __init__(self, prefill: list[str], decode: list[str], *, timeout_s: float = 300.0,
                 connect_timeout_s: float = 5.0, max_body_bytes: int = MAX_BODY_BYTES,
                 max_connections: int = 256):
        if not prefill or not decode:
            raise ValueError("the proxy needs at least one --prefill and one --decode URL")
        self.prefill = Pool("prefill", [Upstream(u.rstrip("/")) for u in prefill])
        self.decode = Pool("decode", [Upstream(u.rstrip("/")) for u in decode])
        self.max_body_bytes = max_body_bytes
        # read: the longest silence allowed from an engine (a prefill, or between tokens)
        self.timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s, pool=connect_timeout_s)
        self.limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=32)
        self.client: httpx.AsyncClient | None = None

    # --- lifecycle ------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        async with httpx.AsyncClient(timeout=self.timeout, limits=self.limits) as client:
            self.client = client
            yield
        self.client = None

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ], lifespan=self.lifespan)

    # --- routes ---------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        return await self._until_disconnect(request, self._proxy(request, "/v1/completions"))

    async def chat_completions(self, request: Request) -> Response:
        return await self._until_disconnect(request, self._proxy(request, "/v1/chat/completions"))

    async def models(self, request: Request) -> Response:
        with self.decode.take() as up:
            try:
                status, data = await self._fetch(request, "decode", up, "GET", "/v1/models")
            except UpstreamError as e:
                return error_response(e.status, e.message, e.kind)
        return Response(data, status, media_type="application/json")

    async def health(self, request: Request) -> Response:
        """200 when at least one producer and one consumer answer their /health."""
        ups = [("prefill", u) for u in self.prefill.upstreams] + [("decode", u) for u in self.decode.upstreams]

        async def probe(up: Upstream) -> str:
            try:
                resp = await self.client.get(up.url + "/health", timeout=self.timeout.connect)
                return "ok" if resp.status_code == 200 else f"HTTP {resp.status_code}"
            except httpx.HTTPError as exc:
                return f"{type(exc).__name__}: {exc}"

        states = await asyncio.gather(*(probe(u) for _, u in ups))
        report = {role: {} for role in ("prefill", "decode")}
        for (role, up), state in zip(ups, states):
            report[role][up.url] = state
        ok = all(any(s == "ok" for s in report[r].values()) for r in report)
        return JSONResponse(report, status_code=200 if ok else 503)

    # --- the two-step request -------------------------------------------------------------
    async def _until_disconnect(self, request: Request, work: Awaitable[Response]) -> Response:
        """Runs ``work`` until it answers or the client goes away (then cancels it, which
        closes the upstream request). Streaming bodies watch for disconnects themselves."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return Response(status_code=499)
        return task.result()

    async def _proxy(self, request: Request, path: str) -> Response:
        try:
            body = await self._body(request)
            params = await self._prefill(request, path, body)
            body["kv_transfer_params"] = params
            return await self._decode(request, path, body)
        except UpstreamError as e:
            log.warning("%s: %s", path, e.message)
            return error_response(e.status, e.message, e.kind)

    async def _body(self, request: Request) -> dict[str, Any]:
        try:
            body = await read_json_body(request.stream(), request.headers.get("content-length"),
                                        max_bytes=self.max_body_bytes, max_depth=MAX_BODY_DEPTH)
        except BodyError as e:
            raise UpstreamError(e.status, e.message, "BadRequestError") from None
        if not isinstance(body, dict):
            raise UpstreamError(400, "request body must be a JSON object", "BadRequestError")
        return body

    async def _fetch(self, request: Request, side: str, up: Upstream, method: str, path: str,
                     body: dict[str, Any] | None = None) -> tuple[int, bytes]:
        """One whole (not streamed) upstream answer: its status and body, read within
        ``max_body_bytes``; a transport failure raises :class:`UpstreamError` (502/504)."""
        try:
            req = self.client.build_request(method, up.url + path, json=body, headers=_headers(request))
            resp = await self.client.send(req, stream=True)
            try:
                return resp.status_code, await _read_bounded(resp, self.max_body_bytes, side, up)
            finally:
                await resp.aclose()
        except httpx.HTTPError as exc:
            raise _transport_error(side, up, exc) from None

    async def _prefill(self, request: Request, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """The producer's ``kv_transfer_params`` for this request."""
        with self.prefill.take() as up:
            status, data = await self._fetch(request, "prefill", up, "POST", path, prefill_body(body))
        if status != 200:
            raise UpstreamError(status, f"prefill {up.url}: {_upstream_message(data)}",
                                "UpstreamError")
        try:
            params = json.loads(data).get("kv_transfer_params")
        except (ValueError, AttributeError):
            raise UpstreamError(502, f"prefill {up.url}: answer is not a JSON object") from None
        if not isinstance(params, dict):
            raise UpstreamError(502, f"prefill {up.url}: answer carries no kv_transfer_params "
                                "(does it run a KV connector with kv_role kv_producer or kv_both?)")
        return params

    async def _decode(self, request: Request, path: str, body: dict[str, Any]) -> Response:
        """The consumer's answer, streamed through as it comes."""
        up = self.decode.acquire()
        try:
            req = self.client.build_request("POST", up.url + path, json=body, headers=_headers(request))
            resp = await self.client.send(req, stream=True)
        except BaseException as exc:
            self.decode.release(up)
            if isinstance(exc, httpx.HTTPError):
                raise _transport_error("decode", up, exc) from None
            raise
        if resp.status_code != 200 or not body.get("stream"):
            try:
                data = await _read_bounded(resp, self.max_body_bytes, "decode", up)
            except httpx.HTTPError as exc:
                raise _transport_error("decode", up, exc) from None
            finally:
                await resp.aclose()
                self.decode.release(up)
            if resp.status_code != 200:
                raise UpstreamError(resp.status_code, f"decode {up.url}: {_upstream_message(data)}",
                                    "UpstreamError")
            return Response(data, 200, media_type=resp.headers.get("content-type", "application/json"))

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in resp.aiter_raw():
                    yield chunk
            except httpx.HTTPError as exc:
                e = _transport_error("decode", up, exc)
                log.warning("%s: %s", path, e.message)
                yield _sse_error(e.message, e.kind, e.status)
            finally:
                # shielded: a client disconnect cancels this generator, and the close
                # itself must still run to tell the engine to abort the request
                with anyio.CancelScope(shield=True):
                    await resp.aclose()
                self.decode.release(up)

        return StreamingResponse(relay(), status_code=200,
                                 media_type=resp.headers.get("content-type", "text/event-stream"))


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone away (the body was read before this is called)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _headers(request: Request) -> dict[str, str]:
    headers = {k: request.headers[k] for k in FORWARDED_HEADERS if k in request.headers}
    # one id for the request on both engines, so their logs can be matched
    headers.setdefault("x-request-id", uuid.uuid4().hex)
    return headers


def serve(proxy: Proxy, host: str, port: int, *, max_concurrency: int = 256,
          ready: Callable[[int], None] | None = None) -> None:
    """Runs the proxy until SIGINT/SIGTERM. ``port`` 0 takes a free one; ``ready(port)`` is
    called with the bound port before requests are served."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # before ready(): a client told the port may connect at once
    config = uvicorn.Config(proxy.app(), limit_concurrency=max_concurrency, timeout_keep_alive=30,
                            log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    if ready is not None:
        ready(sock.getsockname()[1])
    server.run(sockets=[sock])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m kvtransfer.connector.proxy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefill", nargs="+", required=True, metavar="URL", help="producer engines' base URLs")
    ap.add_argument("--decode", nargs="+", required=True, metavar="URL", help="consumer engines' base URLs")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="seconds an engine may stay silent (a prefill, or between streamed tokens)")
    ap.add_argument("--connect-timeout", type=float, default=5.0)
    ap.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES)
    ap.add_argument("--max-concurrency", type=int, default=256, help="requests in flight; more get 503")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    proxy = Proxy(args.prefill, args.decode, timeout_s=args.timeout, connect_timeout_s=args.connect_timeout,
                  max_body_bytes=args.max_body_bytes, max_connections=args.max_concurrency)

    def ready(port: int) -> None:
        print(f"kvtransfer proxy: listening on http://{args.host}:{port}", flush=True)

    serve(proxy, args.host, args.port, max_concurrency=args.max_concurrency, ready=ready)


if __name__ == "__main__":
    sys.exit(main())
