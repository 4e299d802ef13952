"""The decode worker's HTTP front door (OpenAI-compatible; stdlib only).

``POST /v1/completions`` (``stream: true``: server-sent events, one chunk per token,
then ``data: [DONE]``), ``GET /v1/models``, ``GET /health``, ``GET /metrics``
(Prometheus). One thread per connection; the scheduler batches across them. A client
that goes away mid-stream cancels its sequence, which frees its blocks.
"""

from __future__ import annotations

import json
import logging
import queue
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvtransfer.errors import KVTransferError

from .openai_api import BadRequest, completion_body, error_body, models_body, parse_completion
from .router import NoPrefillWorker
from .worker import ITL, REQUESTS, DecodeWorker, Generation

log = logging.getLogger("decode_worker")

MAX_BODY = 16 << 20
#: a request that produced no token for this long is failed (the scheduler is stuck)
TOKEN_TIMEOUT_S = 120.0


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


class Handler(BaseHTTPRequestHandler):
    server_version = "kvtransfer-decode/0.1"
    protocol_version = "HTTP/1.1"
    worker: DecodeWorker  # set on the subclass made by make_server

    def log_message(self, fmt: str, *args) -> None:
        log.debug("%s %s", self.address_string(), fmt % args)

    # --- plumbing ------------------------------------------------------------------------

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        if self.path.startswith("/v1/completions"):
            REQUESTS.labels(str(status)).inc()

    def _error(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        log.info("%s %s -> %d: %s", self.command, self.path, status, message)
        self._json(status, error_body(message, param, code, kind))

    # --- routes --------------------------------------------------------------------------

    def do_GET(self) -> None:
        w = self.worker
        if self.path == "/health":
            self._json(200, w.health())
        elif self.path == "/v1/models":
            self._json(200, models_body(w.served_name, w.model_id))
        elif self.path == "/metrics":
            data = generate_latest()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            self._error(404, f"no route GET {self.path}")

    def do_POST(self) -> None:
        if self.path != "/v1/completions":
            return self._error(404, f"no route POST {self.path}")
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            return self._error(411, "a Content-Length header is required")
        if int(length) > MAX_BODY:
            self.close_connection = True
            return self._error(413, f"the body is {length} bytes; the limit is {MAX_BODY}")
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            return self._error(400, f"the body is not valid JSON: {e}")
        w = self.worker
        try:
            req = parse_completion(body, served_model=w.served_name, tokenizer=w.tokenizer,
                                   vocab_size=w.vocab_size, max_context=w.max_context)
            gen = w.start(req, w.new_request_id())
        except BadRequest as e:
            return self._error(e.status, str(e), e.param, e.code)
        except NoPrefillWorker as e:
            return self._error(503, str(e), code="no_prefill_worker")
        except KVTransferError as e:
            return self._error(502, f"prefill failed: {e}", code="prefill_failed")
        except Exception as e:  # a bug: answer it, log it, keep serving
            log.exception("POST /v1/completions failed")
            return self._error(500, f"internal error: {type(e).__name__}: {e}", code="internal_error")
        if req.stream:
            self._stream(gen, _Stop(req.stop))
        else:
            self._complete(gen, _Stop(req.stop))

    # --- generation ----------------------------------------------------------------------

    def _events(self, gen: Generation):
        """Yields ("token", id) ... then ("done", reason) or ("error", message)."""
        last = gen.arrived
        while True:
            try:
                kind, value, at = gen.seq.events.get(timeout=TOKEN_TIMEOUT_S)
            except queue.Empty:
                gen.seq.cancel()
                yield "error", f"no token for {TOKEN_TIMEOUT_S} s"
                return
            if kind == "token":
                if at > last and last != gen.arrived:
                    ITL.observe(at - last)
                last = at
            yield kind, value
            if kind != "token":
                return

    def _finish(self, gen: Generation, stop: _Stop, tokens: list[int], reason: str) -> tuple[str, str]:
        text = self.worker.tokenizer.decode(tokens)
        cut = stop.cut(text)
        if cut is not None:
            return text[:cut], "stop"
        return text, "stop" if reason == "cancelled" else reason

    def _usage(self, gen: Generation, n: int) -> dict:
        return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": n, "total_tokens": gen.prompt_tokens + n}

    def _complete(self, gen: Generation, stop: _Stop) -> None:
        tokens: list[int] = []
        for kind, value in self._events(gen):
            if kind == "token":
                tokens.append(value)
                if stop.stops and stop.cut(self.worker.tokenizer.decode(tokens)) is not None:
                    gen.seq.cancel()
            elif kind == "error":
                return self._error(500, f"generation failed: {value}", code="generation_failed")
            else:
                text, reason = self._finish(gen, stop, tokens, value)
                return self._json(200, completion_body(gen.request_id, self.worker.served_name, text, tokens,
                                                       reason, self._usage(gen, len(tokens)), gen.kv))

    def _stream(self, gen: Generation, stop: _Stop) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        REQUESTS.labels("200").inc()
        tok = self.worker.tokenizer
        tokens: list[int] = []
        sent = ""  # text already sent
        try:
            for kind, value in self._events(gen):
                if kind == "token":
                    tokens.append(value)
                    text = tok.decode(tokens)
                    if stop.stops and stop.cut(text) is not None:
                        gen.seq.cancel()
                        continue
                    # hold back an unfinished UTF-8 character and a possible stop string start
                    ready = text[:stop.safe(text.rstrip("\ufffd"))]
                    delta, sent = (ready[len(sent):], ready) if ready.startswith(sent) else ("", sent)
                    self._event(completion_body(gen.request_id, self.worker.served_name, delta, [value], None))
                elif kind == "error":
                    self._event(error_body(f"generation failed: {value}", kind="server_error"))
                    break
                else:
                    text, reason = self._finish(gen, stop, tokens, value)
                    self._event(completion_body(gen.request_id, self.worker.served_name, text[len(sent):], [],
                                                reason, self._usage(gen, len(tokens)), gen.kv))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            gen.seq.cancel()  # the client left: its blocks go back to the pool
            log.info("request %s: client disconnected", gen.request_id)

    def _event(self, body: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(body).encode() + b"\n\n")
        self.wfile.flush()


class _Server(ThreadingHTTPServer):
    #: the listen() backlog: socketserver's default of 5 makes the kernel reset connections
    #: when more clients than that connect at once
    request_queue_size = 1024


def make_server(worker: DecodeWorker, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"worker": worker})
    server = _Server((host, port), handler)
    server.daemon_threads = True
    return server
