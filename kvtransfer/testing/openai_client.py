"""A client of an OpenAI-compatible HTTP server (stdlib only): the one the tests, the
serving benchmark and the demo use against the decode worker (or any ``vllm serve``).

A new connection per request; every read is bounded by the socket timeout and a stream
as a whole by a deadline. Streams are read as server-sent events (``data:`` lines joined,
per the SSE spec) until ``data: [DONE]``.

    client = OpenAIClient("http://127.0.0.1:8000")
    client.complete(prompt="Hi", max_tokens=8)                  # the JSON answer
    for at, chunk in client.events(prompt="Hi", max_tokens=8):  # streamed chunks
        ...
"""

from __future__ import annotations

import contextlib
import http.client
import json
import time
from dataclasses import dataclass, field
from typing import Any, Iterator
from urllib.parse import urlsplit

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


class HTTPError(Exception):
    """A non-200 answer, an error event in a stream, or a stream cut short (status 0)."""

    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def error_message(self) -> str:
        """The OpenAI error body's message (asserts there is one)."""
        body = self.json()
        assert isinstance(body.get("error"), dict), f"no error object in {body}"
        msg = body["error"].get("message")
        assert isinstance(msg, str) and msg.strip(), f"no error message in {body}"
        return msg


@dataclass
class Stream:
    """A streamed answer read to its end: the chunks (decoded JSON events), when each
    arrived (``time.monotonic()``), and whether it ended with ``data: [DONE]``."""
    status: int
    content_type: str
    chunks: list[dict] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    done: bool = False
    body: bytes = b""  # a non-200 answer's body

    def _choices(self) -> Iterator[dict]:
        return (c["choices"][0] for c in self.chunks if c.get("choices"))

    @property
    def token_ids(self) -> list[int]:
        return [t for c in self._choices() for t in c.get("token_ids") or []]

    @property
    def text(self) -> str:
        """The completion's text deltas, or the chat deltas' content, joined."""
        return "".join(c.get("text") or (c.get("delta") or {}).get("content") or "" for c in self._choices())

    @property
    def final(self) -> dict:
        """The last chunk, which carries finish_reason, usage and kv_transfer."""
        assert self.chunks, "no chunks"
        return self.chunks[-1]

    @property
    def errors(self) -> list[dict]:
        return [c for c in self.chunks if "error" in c]


def sse_events(resp: http.client.HTTPResponse, deadline: float) -> Iterator[tuple[float, bytes]]:
    """``(time.monotonic(), data)`` of each server-sent event until the stream ends.
    Comments and other fields (``event:``, ``id:``) carry no data and are skipped.
    Raises TimeoutError past ``deadline`` (``time.monotonic()``)."""
    data: list[bytes] = []
    while True:
        line = resp.readline(1 << 20)
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError("the event stream passed its deadline")
        if not line:
            if data:
                yield now, b"\n".join(data)
            return
        line = line.rstrip(b"\r\n")
        if not line:
            if data:
                yield now, b"\n".join(data)
                data = []
        elif line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)


class OpenAIClient:
    """``url``: ``http://HOST:PORT`` (a path prefix is kept). ``timeout``: seconds any
    one socket operation may take."""

    def __init__(self, url: str, timeout: float = 90.0):
        u = urlsplit(url)
        if u.scheme != "http" or not u.hostname or not u.port:
            raise ValueError(f"{url!r} is not http://HOST:PORT")
        self.url, self.host, self.port, self.base = url, u.hostname, u.port, u.path.rstrip("/")
        self.timeout = timeout

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Response:
        conn = self.connection()
        try:
            conn.request(method, self.base + path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        finally:
            conn.close()

    def get(self, path: str) -> Response:
        return self.request("GET", path)

    def post(self, path: str, body: Any) -> Response:
        """``body``: bytes as they are, anything else as JSON."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.request("POST", path, data, {"Content-Type": "application/json"})

    def complete(self, path: str = COMPLETIONS, **fields: Any) -> dict:
        """A non-streamed answer's JSON; HTTPError unless it is 200."""
        r = self.post(path, fields)
        if r.status != 200:
            raise HTTPError(r.status, r.body.decode(errors="replace"))
        return r.json()

    @contextlib.contextmanager
    def open_stream(self, path: str = COMPLETIONS, **fields: Any) -> Iterator[http.client.HTTPResponse]:
        """POSTs ``fields`` with ``stream: true``; the response, its status unchecked, to
        read (with :func:`sse_events`) inside the ``with``."""
        conn = self.connection()
        try:
            conn.request("POST", self.base + path, body=json.dumps({**fields, "stream": True}).encode(),
                         headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
            yield conn.getresponse()
        finally:
            conn.close()

    def stream(self, path: str = COMPLETIONS, deadline_s: float | None = None, **fields: Any) -> Stream:
        """A streamed answer read to its end (a non-200 one: status and body)."""
        deadline = time.monotonic() + (deadline_s or self.timeout)
        with self.open_stream(path, **fields) as resp:
            out = Stream(resp.status, resp.getheader("Content-Type", ""))
            if resp.status != 200:
                out.body = resp.read()
                return out
            for at, data in sse_events(resp, deadline):
                if data == b"[DONE]":
                    out.done = True
                    break
                out.chunks.append(json.loads(data))
                out.times.append(at)
            return out

    def events(self, path: str = COMPLETIONS, deadline_s: float | None = None,
               **fields: Any) -> Iterator[tuple[float, dict]]:
        """``(time.monotonic(), chunk)`` as each chunk arrives, until ``[DONE]``.
        HTTPError on a non-200 answer, an error event, or a stream ended without ``[DONE]``."""
        deadline = time.monotonic() + (deadline_s or self.timeout)
        with self.open_stream(path, **fields) as resp:
            if resp.status != 200:
                raise HTTPError(resp.status, resp.read().decode(errors="replace"))
            for at, data in sse_events(resp, deadline):
                if data == b"[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise HTTPError(500, json.dumps(chunk))
                yield at, chunk
            raise HTTPError(0, "the stream ended without [DONE]")
