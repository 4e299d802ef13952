"""The proxy against small real HTTP engines (proxy_support.FakeEngine) on loopback:
what it sends each engine, what the client gets back (streamed and not, completions and
chat), the least-busy choice, and every failure answered in time, never a hang."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from kvtransfer.connector.proxy import Proxy
from proxy_support import FakeEngine, ServerThread, free_port, generate, sse_events

ROOT = Path(__file__).resolve().parents[1]
PROMPT = list(range(5, 45))


@pytest.fixture
def engines():
    """Factory of FakeEngines, all closed at teardown."""
    made: list[FakeEngine] = []

    def make(**kwargs) -> FakeEngine:
        made.append(FakeEngine(**kwargs))
        return made[-1]

    yield make
    for e in made:
        e.close()


@pytest.fixture
def proxy():
    """Factory: ``proxy(prefill_engines, decode_engines, **Proxy options)`` -> base URL;
    ``proxy.made`` holds the Proxy objects."""
    made: list[ServerThread] = []

    def make(prefill, decode, **kwargs) -> str:
        urls = [p if isinstance(p, str) else p.url for p in prefill], [d if isinstance(d, str) else d.url for d in decode]
        make.made.append(Proxy(*urls, **kwargs))
        made.append(ServerThread(make.made[-1].app()))
        return made[-1].url

    make.made = []
    yield make
    for s in made:
        s.close()


def _post(url: str, body: dict, timeout: float = 10.0) -> httpx.Response:
    return httpx.post(url, json=body, timeout=timeout)


def test_completion_goes_prefill_then_decode(engines, proxy):
    p, d = engines(), engines()
    url = proxy([p], [d])
    r = _post(url + "/v1/completions", {"model": "toy", "prompt": PROMPT, "max_tokens": 12, "min_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["token_ids"] == generate(PROMPT, 12)
    # the producer was asked for one token, not streamed, KV kept for a remote decode
    (sent_p,) = p.requests
    assert sent_p["max_tokens"] == 1 and sent_p["stream"] is False and "min_tokens" not in sent_p
    assert sent_p["kv_transfer_params"] == {"do_remote_decode": True}
    # the consumer got the client's request plus the producer's params, and pulled the KV
    (sent_d,) = d.requests
    assert sent_d["max_tokens"] == 12 and sent_d["min_tokens"] == 4 and sent_d["prompt"] == PROMPT
    assert sent_d["kv_transfer_params"]["do_remote_prefill"] is True
    assert p.kv == {}, "the producer still holds the request's KV"


def test_streamed_completion_equals_the_engine_asked_directly(engines, proxy):
    p, d, plain = engines(), engines(), engines()
    url = proxy([p], [d])
    body = {"model": "toy", "prompt": PROMPT, "max_tokens": 20, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=10) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    got = [t for e in events[:-1] for t in e["choices"][0]["token_ids"]]
    with httpx.stream("POST", plain.url + "/v1/completions", json=body, timeout=10) as r:
        ref = [t for e in sse_events(r.iter_lines())[:-1] for t in e["choices"][0]["token_ids"]]
    assert got == ref == generate(PROMPT, 20)
    assert "stream_options" not in p.requests[0] and p.requests[0]["stream"] is False


@pytest.mark.parametrize("stream", [False, True])
def test_chat_completion(engines, proxy, stream):
    p, d = engines(), engines()
    url = proxy([p], [d])
    body = {"model": "toy", "messages": [{"role": "user", "content": "hello there"}],
            "max_completion_tokens": 6, "max_tokens": 6, "stream": stream,
            "stream_options": {"include_usage": True}}
    want = generate(list(b"hello there"), 6)
    if stream:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=10) as r:
            assert r.status_code == 200
            events = sse_events(r.iter_lines())
        got = [t for e in events[:-1] for t in e["choices"][0]["token_ids"]]
    else:
        r = _post(url + "/v1/chat/completions", body)
        assert r.status_code == 200, r.text
        got = r.json()["choices"][0]["token_ids"]
    assert got == want
    assert p.requests[0]["max_completion_tokens"] == 1 and "stream_options" not in p.requests[0]
    assert d.requests[0]["stream_options"] == {"include_usage": True}


def test_least_busy_engines_are_chosen(engines, proxy):
    p1, p2 = engines(), engines()
    busy, idle = engines(token_delay_s=0.05), engines()
    url = proxy([p1, p2], [busy.url, idle.url])
    # one long stream holds a consumer; every request after it goes to the other one
    body = {"prompt": PROMPT, "max_tokens": 200, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as held:
        assert held.status_code == 200
        lines = held.iter_lines()  # kept: a dropped iterator closes the response
        next(lines)
        holder = busy if busy.requests else idle
        other = idle if holder is busy else busy
        for i in range(4):
            r = _post(url + "/v1/completions", {"prompt": PROMPT[i:], "max_tokens": 3})
            assert r.status_code == 200, r.text
        assert len(holder.requests) == 1 and len(other.requests) == 4
    # idle producers are taken in turn
    assert len(p1.requests) + len(p2.requests) == 5 and min(len(p1.requests), len(p2.requests)) >= 2


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_upstream_error_keeps_its_status_and_message(engines, proxy, role):
    bad = engines(fail=(400, "This model's maximum context length is 64 tokens"))
    good = engines()
    url = proxy([bad], [good]) if role == "prefill" else proxy([good], [bad])
    r = _post(url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "stream": True})
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "maximum context length is 64" in msg and msg.startswith(f"{role} {bad.url}")
    if role == "prefill":
        assert good.requests == [], "the consumer was asked although the prefill failed"


def test_producer_without_a_connector_is_502(engines, proxy):
    plain, d = engines(connector=False), engines()
    r = _post(proxy([plain], [d]) + "/v1/completions", {"prompt": PROMPT, "max_tokens": 4})
    assert r.status_code == 502 and "no kv_transfer_params" in r.json()["error"]["message"]
    assert d.requests == []


def test_dead_engine_is_502_at_once(engines, proxy):
    d = engines()
    dead = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    r = _post(proxy([dead], [d]) + "/v1/completions", {"prompt": PROMPT, "max_tokens": 4})
    assert r.status_code == 502 and r.json()["error"]["message"].startswith(f"prefill {dead}: ConnectError")
    assert time.monotonic() - t0 < 5


def test_slow_producer_is_504_at_the_deadline(engines, proxy):
    slow, d = engines(delay_s=5.0), engines()
    url = proxy([slow], [d], timeout_s=0.5)
    t0 = time.monotonic()
    r = _post(url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 4})
    took = time.monotonic() - t0
    assert r.status_code == 504 and "no answer in time" in r.json()["error"]["message"]
    assert took < 4, f"took {took:.1f} s"
    assert d.requests == []


def test_consumer_silent_mid_stream_ends_with_an_error_event(engines, proxy):
    p, stalls = engines(), engines(stall_after=3)
    url = proxy([p], [stalls], timeout_s=0.5)
    with httpx.stream("POST", url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 10, "stream": True},
                      timeout=10) as r:
        assert r.status_code == 200
        events = sse_events(r.iter_lines())
    assert [len(e["choices"]) for e in events[:3]] == [1, 1, 1]
    assert events[-1]["error"]["code"] == 504 and "decode" in events[-1]["error"]["message"]


def test_client_disconnect_cancels_the_consumer_stream(engines, proxy):
    p, d = engines(), engines(token_delay_s=0.02)
    url = proxy([p], [d])
    with httpx.stream("POST", url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 500, "stream": True},
                      timeout=10) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 5
    while not d.cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(d.cancelled) == 1 and d.finished == []


def test_client_disconnect_during_prefill_cancels_it(engines, proxy):
    slow, d = engines(delay_s=30.0), engines()
    url = proxy([slow], [d])
    with pytest.raises(httpx.ReadTimeout):
        _post(url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 4}, timeout=0.5)
    # the proxy let go of the producer's request at once
    pool = proxy.made[-1].prefill
    deadline = time.monotonic() + 5
    while pool.upstreams[0].in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.upstreams[0].in_flight == 0 and d.requests == []


def test_bad_bodies(engines, proxy):
    p, d = engines(), engines()
    url = proxy([p], [d], max_body_bytes=1000)
    r = httpx.post(url + "/v1/completions", content=b"{not json", timeout=5)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = _post(url + "/v1/completions", [1, 2])
    assert r.status_code == 400
    r = _post(url + "/v1/completions", {"prompt": list(range(1000))})
    assert r.status_code == 413 and "the limit is 1000" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", content=b"[" * 65 + b"]" * 65, timeout=5)  # within any recursion limit
    assert r.status_code == 400 and "deeper than 64" in r.json()["error"]["message"]
    deep = proxy([p], [d], max_body_bytes=1 << 20)
    r = httpx.post(deep + "/v1/completions", content=b"[" * 100_000 + b"]" * 100_000, timeout=5)
    assert r.status_code == 400 and "nests" in r.json()["error"]["message"]
    assert p.requests == [] and d.requests == []


def test_health_and_models(engines, proxy):
    p, d = engines(), engines()
    r = httpx.get(proxy([p], [d]) + "/health", timeout=5)
    assert r.status_code == 200 and r.json() == {"prefill": {p.url: "ok"}, "decode": {d.url: "ok"}}
    dead = f"http://127.0.0.1:{free_port()}"
    r = httpx.get(proxy([p], [dead]) + "/health", timeout=5)
    assert r.status_code == 503 and r.json()["decode"][dead].startswith("ConnectError")
    r = httpx.get(proxy([p], [d]) + "/v1/models", timeout=5)
    assert r.json()["data"][0]["id"] == "toy"


def test_command_line_serves_and_stops(engines):
    p, d = engines(), engines()
    cmd = [sys.executable, "-m", "kvtransfer.connector.proxy", "--prefill", p.url, "--decode", d.url, "--port", "0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = _read_line(proc, timeout_s=30)
        assert line.startswith("kvtransfer proxy: listening on http://127.0.0.1:"), line
        url = line.split()[-1]
        r = _post(url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 5})
        assert r.json()["choices"][0]["token_ids"] == generate(PROMPT, 5)
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught
        assert proc.wait(timeout=10) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


def _read_line(proc: subprocess.Popen, timeout_s: float) -> str:
    """The process's next stdout line, or fail (and kill it) after ``timeout_s``."""
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout_s)
    if not out:
        proc.kill()
        pytest.fail(f"no line from {proc.args} in {timeout_s} s")
    return out[0].strip()
