"""The decode worker's HTTP front door against hostile and unlucky clients (issue 18,
weakness 10), and its chat endpoint.

One decode worker (``--local-prefill``: the front door is what is tested, not the KV
transfer) with short read deadlines, reached over real loopback sockets: deeply nested
JSON is a 400, not a dropped connection; a non-streamed client that leaves stops its
generation; 300 half-sent requests hold no thread each, are dropped at the header or
body deadline, and the worker serves others meanwhile. Chat completions render the
folder's chat template, and their tokens equal the one-process model's on the same
rendered prompt.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvtransfer.model import load_tokenizer
from kvtransfer.model.chat import ChatTemplate
from worker_support import Decode, Fleet, model_folder, prompt_ids, reference, wait_until

pytestmark = pytest.mark.timeout(240)

KV_BLOCKS = 256
HEADER_S = 3.0   # the worker's --header-timeout
BODY_S = 3.0     # the worker's --body-timeout
IDLE_S = 2.0     # the worker's --keep-alive
CAP = 8          # the capped worker's --max-connections
SOCK_S = 30.0    # any one socket operation of this test
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def folder() -> Path:
    """The default shapes with a ChatML template (a folder of this module's own)."""
    f = model_folder("chatml")
    (f / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    return f


@pytest.fixture(scope="module")
def decode(folder, tmp_path_factory) -> Iterator[Decode]:
    fleet = Fleet(tmp_path_factory.mktemp("front-door"))
    try:
        yield fleet.decode(folder, [], "--local-prefill", "--header-timeout", str(HEADER_S), "--body-timeout",
                           str(BODY_S), "--keep-alive", str(IDLE_S), name="decode-local", kv_blocks=KV_BLOCKS)
    finally:
        problems = fleet.close()
        assert not problems, f"the worker did not shut down cleanly on SIGTERM: {problems}"


def dial(d: Decode) -> socket.socket:
    s = socket.create_connection((d.http.host, d.http.port), timeout=SOCK_S)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # close = RST
    return s


def post_bytes(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def metric(d: Decode, name: str, **labels: str) -> float:
    """A sample's value from GET /metrics (0 when absent)."""
    for family in text_string_to_metric_families(d.http.get("/metrics").body.decode()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no Threads: line for pid {pid}")


def check_serves(d: Decode, folder: Path) -> None:
    prompt = prompt_ids(7, seed=7)
    body = d.http.complete(prompt=prompt, max_tokens=4, temperature=0, ignore_eos=True)
    assert body["choices"][0]["token_ids"] == reference(folder, prompt, 4)


# --- JSON that nests too deep ------------------------------------------------------------

@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"prompt": ' + b"[" * 5_000 + b"1" + b"]" * 5_000 + b"}",
                                  b'{"prompt": "hi", "x": ' + b'{"a": ' * 40 + b"1" + b"}" * 40 + b"}"],
                         ids=["unclosed-100k", "closed-5k", "object-40"])
def test_deeply_nested_json_is_a_400(decode, folder, body):
    r = decode.http.post("/v1/completions", body)
    assert r.status == 400, f"{r.status} {r.body[:300]!r}"
    assert "nests deeper" in r.error_message()
    assert decode.health()["free_blocks"] == KV_BLOCKS
    check_serves(decode, folder)


def test_a_body_over_the_limit_is_a_413(decode, folder):
    r = decode.http.post("/v1/completions", b'{"prompt": "' + b"a" * (5 << 20) + b'"}')
    assert r.status == 413, f"{r.status} {r.body[:300]!r}"
    assert "limit" in r.error_message()
    check_serves(decode, folder)


# --- a client that leaves ----------------------------------------------------------------

def test_a_non_streamed_client_that_leaves_stops_its_generation(decode, folder):
    """The worker notices the closed connection while it generates and cancels the
    sequence: its blocks come back, and it produced far fewer than the tokens asked for
    (each token it hands to the request is one inter-token observation)."""
    max_tokens = 1900
    gone0 = metric(decode, "kvtransfer_client_disconnects_total", mode="complete")
    itl0 = metric(decode, "kvtransfer_inter_token_seconds_count")
    s = dial(decode)
    try:
        s.sendall(post_bytes("/v1/completions", json.dumps(
            {"prompt": prompt_ids(20, seed=20), "max_tokens": max_tokens, "temperature": 0,
             "ignore_eos": True}).encode()))
        wait_until(lambda: decode.health()["running"] == 1, 60, "the generation to start")
    finally:
        s.close()
    decode.wait_idle(timeout=60)
    made = metric(decode, "kvtransfer_inter_token_seconds_count") - itl0 + 1
    assert made < max_tokens / 2, f"{made} of {max_tokens} tokens generated for a client that left"
    assert metric(decode, "kvtransfer_client_disconnects_total", mode="complete") == gone0 + 1
    check_serves(decode, folder)


# --- clients that never finish their request ----------------------------------------------

def test_half_sent_requests_are_dropped_and_others_served(decode, folder):
    """150 clients stop mid-headers, 150 mid-body. While they hang the worker serves a
    completion and holds no thread per connection; each is then answered 408 (or closed)
    at its deadline."""
    before = threads(decode.pid)
    body = json.dumps({"prompt": "never finished", "max_tokens": 4}).encode()
    request = post_bytes("/v1/completions", body)
    halves = [request[:30], request[:-len(body) // 2]]
    socks: list[tuple[socket.socket, float]] = []
    try:
        for i in range(300):
            s = dial(decode)
            s.sendall(halves[i % 2])
            socks.append((s, time.monotonic()))
        check_serves(decode, folder)
        held = threads(decode.pid)
        assert held < before + 50, f"{held} threads with 300 half-sent requests (was {before})"
        dropped_after = []
        for s, opened in socks:
            data = b""
            while chunk := s.recv(4096):  # bounded by SOCK_S per read
                data += chunk
            dropped_after.append(time.monotonic() - opened)
            assert data == b"" or data.startswith(b"HTTP/1.1 408 "), data[:200]
    finally:
        for s, _ in socks:
            s.close()
    # none outlived its deadlines by much (the slack: a shared, loaded test machine)
    assert max(dropped_after) < HEADER_S + BODY_S + 20, f"slowest drop {max(dropped_after):.1f} s"
    assert min(dropped_after) >= min(HEADER_S, BODY_S) - 0.5
    check_serves(decode, folder)


def test_an_idle_connection_is_closed_after_the_keep_alive(decode):
    s = dial(decode)
    try:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        t0 = time.monotonic()
        data = b""
        while chunk := s.recv(4096):  # the answer, then the close; each read bounded by SOCK_S
            data += chunk
        idle = time.monotonic() - t0
    finally:
        s.close()
    assert data.startswith(b"HTTP/1.1 200 ") and b'"status":"ok"' in data, data[:300]
    assert IDLE_S - 0.5 <= idle < IDLE_S + 20, f"closed after {idle:.1f} s idle"


def test_requests_beyond_the_connection_cap_get_503(folder, tmp_path_factory):
    """With ``--max-connections CAP``, CAP - 1 idle connections leave room for no other
    request (503, with a body); once they are gone, requests are served again."""
    fleet = Fleet(tmp_path_factory.mktemp("capped"))
    idle: list[socket.socket] = []
    try:
        d = fleet.decode(folder, [], "--local-prefill", "--max-connections", str(CAP), name="decode-capped",
                         kv_blocks=16)
        idle = [dial(d) for _ in range(CAP - 1)]
        for s in idle:  # a request each, so the server has surely accepted the connection
            s.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 ")
        r = d.http.get("/health")
        assert r.status == 503, f"{r.status} {r.body[:200]!r}"
        for s in idle:
            s.close()
        idle = []
        wait_until(lambda: d.http.get("/health").status == 200, 30, "a request served after the others left")
    finally:
        for s in idle:
            s.close()
        problems = fleet.close()
        assert not problems, f"the capped worker did not shut down cleanly on SIGTERM: {problems}"


# --- chat completions ---------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


def chat_reference(folder: Path, messages: list[dict], n: int) -> list[int]:
    """The folder's template rendered here, tokenized without special tokens (the template
    writes them), then the same weights greedy in one process."""
    text = ChatTemplate.from_folder(folder).render(messages, add_generation_prompt=True)
    return reference(folder, load_tokenizer(folder).encode(text, add_special_tokens=False), n)


def test_chat_completion_equals_one_process(decode, folder):
    body = decode.http.complete("/v1/chat/completions", messages=MESSAGES, max_tokens=12, temperature=0,
                                ignore_eos=True)
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["token_ids"] == chat_reference(folder, MESSAGES, 12)
    assert choice["message"] == {"role": "assistant", "content": load_tokenizer(folder).decode(choice["token_ids"])}
    assert choice["finish_reason"] == "length"


def test_streamed_chat_equals_non_streamed(decode, folder):
    parts = [{"type": "text", "text": "Name a "}, {"type": "text", "text": "colour."}]
    messages = [MESSAGES[0], {"role": "user", "content": parts}]
    s = decode.http.stream("/v1/chat/completions", messages=messages, max_completion_tokens=10, temperature=0,
                           ignore_eos=True)
    assert s.status == 200 and s.done, s
    assert s.chunks[0]["object"] == "chat.completion.chunk"
    assert s.chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert s.token_ids == chat_reference(folder, MESSAGES, 10)
    assert s.text == load_tokenizer(folder).decode(s.token_ids)
    assert s.final["choices"][0]["finish_reason"] == "length"
    assert s.final["usage"]["completion_tokens"] == 10


@pytest.mark.parametrize("body,param", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "messages"),
    ({"messages": MESSAGES, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": MESSAGES, "temperature": "hot"}, "temperature"),
], ids=["no-messages", "empty", "string", "unknown-role", "content-number", "image-part", "max-zero", "temperature"])
def test_a_bad_chat_request_is_refused_with_a_message(decode, body, param):
    r = decode.http.post("/v1/chat/completions", body)
    assert r.status == 400, f"{r.status} {r.body[:300]!r}"
    r.error_message()
    assert r.json()["error"]["param"] == param
    assert decode.health()["free_blocks"] == KV_BLOCKS
