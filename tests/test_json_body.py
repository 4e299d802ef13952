"""kvtransfer.json_body: the one reader of HTTP JSON bodies (decode worker and proxy)."""

from __future__ import annotations

import asyncio

import pytest

from kvtransfer.json_body import BodyError, json_depth, read_json_body


async def _chunks(data: bytes, size: int = 7):
    for i in range(0, len(data), size):
        yield data[i:i + size]


def _read(data: bytes, length: str | None = "auto", max_bytes: int = 100, max_depth: int = 4):
    declared = str(len(data)) if length == "auto" else length
    return asyncio.run(read_json_body(_chunks(data), declared, max_bytes=max_bytes, max_depth=max_depth))


def test_a_body_within_the_limits_is_decoded():
    assert _read(b'{"prompt": [1, [2, [3]]]}') == {"prompt": [1, [2, [3]]]}
    assert _read(b'[1, 2]', length=None) == [1, 2]


@pytest.mark.parametrize("data, length, status, words", [
    (b"x" * 101, "auto", 413, "101 bytes; the limit is 100"),   # refused from its header
    (b"[" + b"1," * 60 + b"1]", None, 413, "over the limit of 100"),  # refused as it streams
    (b"[1]", "12abc", 400, "is not a number"),
    (b"{not json", "auto", 400, "not valid JSON"),
    (b"\xff\xfe", "auto", 400, "not valid JSON"),
    (b"[[[[[1]]]]]", "auto", 400, "deeper than 4"),
    (b"[" * 50_000 + b"]" * 50_000, "auto", 400, "deeper than 4"),   # past the interpreter's recursion
])
def test_a_bad_body_is_refused_saying_why(data, length, status, words):
    with pytest.raises(BodyError) as e:
        _read(data, length, max_bytes=100 if status == 413 or len(data) <= 100 else 1 << 20)
    assert e.value.status == status and words in e.value.message


def test_depth_is_counted_without_recursion():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert json_depth(deep) == 100_001 and json_depth({"a": [1, {"b": 2}]}) == 3 and json_depth(5) == 0
