"""Reading an HTTP request's JSON body within limits, for the project's two HTTP servers
(the decode worker's front door and the vLLM proxy): a body over ``max_bytes`` is 413
(refused from its Content-Length before it is read, else as it streams in), one that is
not JSON, or nests deeper than ``max_depth``, is 400."""

from __future__ import annotations

import json
from typing import Any, AsyncIterable


class BodyError(Exception):
    """Why a body was refused: ``status`` (400 or 413) and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def json_depth(value: Any) -> int:
    """Nesting depth of decoded JSON, iteratively (a recursive walk could overflow)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


async def read_json_body(chunks: AsyncIterable[bytes], content_length: str | None, *, max_bytes: int,
                         max_depth: int) -> Any:
    """The decoded body streamed as ``chunks`` (Starlette's ``request.stream()``), whose
    Content-Length header is ``content_length`` (or None); raises :class:`BodyError`."""
    if content_length is not None:
        if not content_length.strip().isdigit():
            raise BodyError(400, f"Content-Length {content_length!r} is not a number")
        if int(content_length) > max_bytes:
            raise BodyError(413, f"the body is {int(content_length)} bytes; the limit is {max_bytes}")
    raw = bytearray()
    async for chunk in chunks:
        raw += chunk
        if len(raw) > max_bytes:
            raise BodyError(413, f"the body is over the limit of {max_bytes} bytes")
    try:
        body = json.loads(raw)
    except RecursionError:  # nesting past the interpreter's limit
        raise BodyError(400, f"the body nests deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BodyError(400, f"the body is not valid JSON: {e}") from None
    if json_depth(body) > max_depth:
        raise BodyError(400, f"the body nests deeper than {max_depth} levels")
    return body
