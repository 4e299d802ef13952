"""A small client of the decode worker's HTTP API (stdlib only): what the demo, the
serving benchmark and the tests use. Every call has a timeout."""

from __future__ import annotations

import http.client
import json
import time
from typing import Iterator
from urllib.parse import urlsplit


class HTTPError(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


def _connect(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    u = urlsplit(url)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=timeout), u.path.rstrip("/")


def _call(url: str, method: str, path: str, body: dict | None, timeout: float) -> dict:
    conn, base = _connect(url, timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, base + path, json.dumps(body) if body is not None else None, headers)
        r = conn.getresponse()
        data = r.read().decode()
        if r.status != 200:
            raise HTTPError(r.status, data)
        return json.loads(data)
    finally:
        conn.close()


def get_json(url: str, path: str, timeout: float = 10.0) -> dict:
    return _call(url, "GET", path, None, timeout)


def complete(url: str, body: dict, timeout: float = 120.0) -> dict:
    """POST /v1/completions (not streamed); raises HTTPError on a non-200 answer."""
    return _call(url, "POST", "/v1/completions", body, timeout)


def stream(url: str, body: dict, timeout: float = 120.0) -> Iterator[tuple[float, dict]]:
    """POST /v1/completions with ``stream: true``; yields ``(time.monotonic(), chunk)``
    per server-sent event until ``[DONE]``. ``timeout`` bounds each read."""
    conn, base = _connect(url, timeout)
    try:
        conn.request("POST", base + "/v1/completions", json.dumps({**body, "stream": True}),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            raise HTTPError(r.status, r.read().decode())
        for line in r:
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            if line == b"data: [DONE]":
                return
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise HTTPError(500, json.dumps(chunk))
            yield time.monotonic(), chunk
        raise HTTPError(0, "the stream ended without [DONE]")
    finally:
        conn.close()
