"""The standalone workers, end to end: ``python -m prefill_worker`` and ``python -m
decode_worker`` as real processes, driven through the decode worker's OpenAI HTTP API.

Workers are shared module-wide (no test here kills one), on one random Llama folder:
the pair — a prefill worker and two decode workers that know only it, one forcing
``--transport shm``, one ``--transport tcp`` — and a cluster of two prefill workers (the
pair's and another) with two decode workers given both endpoints. A Qwen2 pair serves
the Qwen2 and EOS tests.

The invariant: greedy tokens through the disaggregated pair equal those of the same
weights in one process (``reference_generate``) and those of Hugging Face Transformers
— for prompts of 1, block_size-1, block_size, block_size+1 and hundreds of tokens,
alone and 8 at once, over shm and tcp; 32 streamed requests spread over both decode
workers use both prefill workers; seeded sampling draws what one process draws.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvtransfer.model import load_tokenizer
from kvtransfer.testing.openai_client import sse_events
from worker_support import (BLOCK_SIZE, Decode, Fleet, Prefill, PrefillProbe, concurrently, hf_reference,
                            model_folder, prompt_ids, reference)

pytestmark = pytest.mark.timeout(240)

KV_BLOCKS = 512
MAX_NEW = 20
#: prompt lengths around a block boundary, a single token, and several hundred
LENGTHS = [1, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 300]
TRANSPORTS = ("shm", "tcp")


@dataclass
class Cluster:
    folder: Path
    prefills: list[Prefill]
    decodes: dict[str, Decode]   # by forced transport

    @property
    def prefill(self) -> Prefill:
        return self.prefills[0]

    def logs(self) -> str:
        return "\n".join(f"--- {w.what} (pid {w.pid}) ---\n{w.log()}" for w in [*self.prefills,
                                                                              *self.decodes.values()])


def _close(fleet: Fleet) -> None:
    problems = fleet.close()
    assert not problems, f"workers did not shut down cleanly on SIGTERM: {problems}"


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Iterator[Cluster]:
    """The disaggregated pair: one prefill worker, and a decode worker on it per transport
    (one forced to shm, one to tcp; each decode worker knows only this prefill worker)."""
    folder = model_folder("llama")  # the default shapes, seed 0
    fleet = Fleet(tmp_path_factory.mktemp("pair"))
    try:
        p = fleet.prefill(folder, name="prefill", kv_blocks=KV_BLOCKS)
        decodes = fleet.together(*[lambda t=t: fleet.decode(folder, [p], name=f"decode-{t}", transport=t,
                                                            kv_blocks=KV_BLOCKS) for t in TRANSPORTS])
        yield Cluster(folder, [p], dict(zip(TRANSPORTS, decodes)))
    finally:
        _close(fleet)


@pytest.fixture(scope="module")
def cluster(pair, tmp_path_factory) -> Iterator[Cluster]:
    """Two prefill workers (the pair's and another) and two decode workers given both
    endpoints, one forced to shm, one to tcp."""
    fleet = Fleet(tmp_path_factory.mktemp("cluster"))
    try:
        pa = pair.prefill
        pb = fleet.prefill(pair.folder, name="prefill-b", kv_blocks=KV_BLOCKS)
        decodes = fleet.together(*[lambda t=t: fleet.decode(pair.folder, [pa, pb], name=f"decode-both-{t}",
                                                            transport=t, kv_blocks=KV_BLOCKS) for t in TRANSPORTS])
        yield Cluster(pair.folder, [pa, pb], dict(zip(TRANSPORTS, decodes)))
    finally:
        _close(fleet)


@pytest.fixture(params=["one-process", "transformers"])
def greedy_reference(request) -> Callable[[Path, list[int], int], list[int]]:
    """(folder, prompt ids, n) -> the n greedy tokens of a one-process reference."""
    if request.param == "transformers":
        pytest.importorskip("transformers")
        return hf_reference
    return reference


def check_completion(body: dict, *, transport: str, prompt_len: int, max_tokens: int, finish: str = "length"
                     ) -> list[int]:
    """The response's shape; returns its token ids."""
    choice = body["choices"][0]
    tokens = choice["token_ids"]
    assert choice["finish_reason"] == finish, body
    if finish == "length":
        assert len(tokens) == max_tokens, body
    assert body["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": len(tokens),
                             "total_tokens": prompt_len + len(tokens)}, body
    kv = body["kv_transfer"]
    assert kv["transport"] == transport, kv
    assert kv["prompt_tokens"] == prompt_len, kv
    assert kv["bytes"] > 0, kv
    return tokens


def first_difference(got: list[int], want: list[int]) -> str:
    i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return f"first difference at token {i}: got {got[i:i + 5]}, want {want[i:i + 5]} (of {len(want)})"


# --- 1. greedy tokens equal one process and Transformers ---------------------------------------

@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_greedy_single_request(pair, greedy_reference, transport, n):
    """One request through the pair == the same weights in one process / in Transformers."""
    prompt = prompt_ids(n, seed=n)
    body = pair.decodes[transport].http.complete(prompt=prompt, max_tokens=MAX_NEW, temperature=0,
                                                    ignore_eos=True)
    got = check_completion(body, transport=transport, prompt_len=n, max_tokens=MAX_NEW)
    want = greedy_reference(pair.folder, prompt, MAX_NEW)
    assert got == want, first_difference(got, want)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_greedy_8_concurrent_requests(pair, greedy_reference, transport):
    """8 requests at once (decoded in one batch, prompts of mixed lengths) each equal
    their one-process / Transformers reference."""
    prompts = [prompt_ids(n, seed=100 + i) for i, n in enumerate([*LENGTHS, 2, 33, 250])]
    http = pair.decodes[transport].http
    bodies = concurrently([lambda p=p: http.complete(prompt=p, max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
                           for p in prompts])
    for p, body in zip(prompts, bodies):
        got = check_completion(body, transport=transport, prompt_len=len(p), max_tokens=MAX_NEW)
        want = greedy_reference(pair.folder, p, MAX_NEW)
        assert got == want, f"prompt of {len(p)} tokens: {first_difference(got, want)}"
    pair.decodes[transport].wait_idle()


def test_string_prompt_is_bytes_after_bos(pair):
    """A string prompt with the byte-level tokenizer: BOS, then one token per UTF-8 byte."""
    text = "The KV cache moves, the tokens stay: ünïcödé ✓"
    prompt = [256, *text.encode("utf-8")]
    want = reference(pair.folder, prompt, MAX_NEW)
    for transport, d in pair.decodes.items():
        body = d.http.complete(prompt=text, max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
        got = check_completion(body, transport=transport, prompt_len=len(prompt), max_tokens=MAX_NEW)
        assert got == want, first_difference(got, want)
        assert body["choices"][0]["text"] == bytes(t for t in got if t < 256).decode("utf-8", errors="replace")
        # a batch of one ([prompt]) is the same request
        body = d.http.complete(prompt=[text], max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
        assert body["choices"][0]["token_ids"] == want


@pytest.fixture(scope="module")
def qwen2_pair(tmp_path_factory) -> Iterator[tuple[Path, Decode]]:
    """A prefill and a decode worker (tcp) on a Qwen2 folder whose EOS row is boosted
    (so greedy continuations reach EOS: the EOS test runs here too)."""
    folder = model_folder("qwen2", arch="qwen2", eos_boost=6.0)
    fleet = Fleet(tmp_path_factory.mktemp("qwen2"))
    try:
        p = fleet.prefill(folder, name="prefill-qwen2", kv_blocks=KV_BLOCKS)
        yield folder, fleet.decode(folder, [p], name="decode-qwen2", transport="tcp", kv_blocks=KV_BLOCKS)
    finally:
        _close(fleet)


def test_greedy_qwen2_concurrent(qwen2_pair, greedy_reference):
    """A Qwen2 folder (q/k/v biases) through a pair: 8 requests at once, the first
    traffic of a fresh session (one prefill worker, so nothing is retried elsewhere)."""
    folder, d = qwen2_pair
    prompts = [prompt_ids(n, seed=7 * n) for n in (1, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 40, 100, 3, 64)]
    bodies = concurrently([lambda p=p: d.http.complete(prompt=p, max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
                           for p in prompts])
    for p, body in zip(prompts, bodies):
        got = check_completion(body, transport="tcp", prompt_len=len(p), max_tokens=MAX_NEW)
        want = greedy_reference(folder, p, MAX_NEW)
        assert got == want, f"prompt of {len(p)} tokens: {first_difference(got, want)}"
    d.wait_idle()


def test_greedy_stops_at_eos(qwen2_pair):
    """Without ignore_eos the decode worker stops at the tokenizer's EOS (included, as
    reference_generate includes it), finish_reason "stop"; with it, it runs on past it."""
    folder, d = qwen2_pair
    tok = load_tokenizer(folder)
    eos = sorted(tok.eos_token_ids)
    n = 40
    for i in range(100):  # a prompt whose greedy continuation reaches EOS after a few tokens
        text = f"prompt {i}"
        want = reference(folder, tok.encode(text), n, stop_ids=eos)
        if want[-1] in eos and 2 < len(want) < n:
            break
    else:
        pytest.fail("no prompt of the 100 tried reaches EOS within 40 greedy tokens")
    prompt = tok.encode(text)
    body = d.http.complete(prompt=text, max_tokens=n, temperature=0)
    got = check_completion(body, transport="tcp", prompt_len=len(prompt), max_tokens=n, finish="stop")
    assert got == want, first_difference(got, want)
    assert body["choices"][0]["text"] == tok.decode(got)
    s = d.http.stream(prompt=text, max_tokens=n, temperature=0)
    assert s.done and s.token_ids == want and s.final["choices"][0]["finish_reason"] == "stop"
    body = d.http.complete(prompt=text, max_tokens=n, temperature=0, ignore_eos=True)
    got = check_completion(body, transport="tcp", prompt_len=len(prompt), max_tokens=n)
    assert got[:len(want)] == want
    assert got == reference(folder, prompt, n)
    d.wait_idle()


# --- 2. two prefill and two decode workers, 32 streamed requests -----------------------------

def test_32_streamed_requests_over_two_decode_and_two_prefill_workers(cluster):
    decodes = [cluster.decodes[t] for t in TRANSPORTS]
    max_tokens = 16
    prompts = [prompt_ids(3 + (37 * i) % 120, seed=300 + i) for i in range(32)]
    wants = [reference(cluster.folder, p, max_tokens) for p in prompts]  # before the clock starts
    streams = concurrently([lambda i=i: decodes[i % 2].http.stream(prompt=prompts[i], max_tokens=max_tokens,
                                                                   temperature=0, ignore_eos=True)
                            for i in range(32)], timeout=180)
    used = set()
    for i, (s, want) in enumerate(zip(streams, wants)):
        d = decodes[i % 2]
        assert s.status == 200, f"request {i}: {s.status} {s.body[:500]!r}\n{cluster.logs()}"
        assert s.content_type.startswith("text/event-stream"), s.content_type
        assert s.done, f"request {i}: the stream did not end with data: [DONE]"
        assert not s.errors, f"request {i}: error events {s.errors}"
        assert s.token_ids == want, f"request {i} via {d.what}: {first_difference(s.token_ids, want)}"
        # one chunk per token, then a final chunk with the reason, usage and kv_transfer
        assert [len(c["choices"][0]["token_ids"]) for c in s.chunks] == [1] * max_tokens + [0]
        final = s.final
        assert final["choices"][0]["finish_reason"] == "length"
        assert final["usage"]["completion_tokens"] == max_tokens
        assert final["usage"]["prompt_tokens"] == len(prompts[i])
        assert final["kv_transfer"]["transport"] == TRANSPORTS[i % 2]
        used.add(final["kv_transfer"]["prefill_worker"])
    assert used == {p.endpoint for p in cluster.prefills}, f"prefill workers used: {used}"
    for d in decodes:
        d.wait_idle()
    for p in cluster.prefills:
        with PrefillProbe(p, cluster.folder) as probe:
            probe.wait_idle()


def test_client_leaving_mid_stream_frees_its_blocks(pair):
    """A client that closes its connection mid-stream: the decode worker cancels the
    sequence and every block goes back to its pool; the worker serves on."""
    d = pair.decodes["shm"]
    http = d.http
    conn = http.connection()
    resp = None
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(
            {"prompt": prompt_ids(50, seed=50), "max_tokens": 1500, "temperature": 0, "ignore_eos": True,
             "stream": True}).encode(), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        events = sse_events(resp, time.monotonic() + 60)
        for _ in range(3):
            assert json.loads(next(events)[1])["choices"][0]["token_ids"]
        assert d.health()["free_blocks"] < KV_BLOCKS  # the sequence holds its blocks
    finally:
        if resp is not None:
            resp.close()  # the socket closes with its last reference: the response's
        conn.close()
    t0 = time.monotonic()
    d.wait_idle(timeout=60)
    # noticed at the next token written, not after the 1500 tokens asked for (~10 s here)
    assert time.monotonic() - t0 < 5.0
    prompt = prompt_ids(5, seed=5)
    assert d.http.complete(prompt=prompt, max_tokens=4, temperature=0,
                           ignore_eos=True)["choices"][0]["token_ids"] == reference(pair.folder, prompt, 4)


# --- 6. seeded sampling draws what one process draws -----------------------------------------

def test_sampling_with_a_seed_equals_one_process(pair):
    prompt = prompt_ids(24, seed=24)
    n = 24
    want = reference(pair.folder, prompt, n, temperature=0.8, seed=1234)
    assert want != reference(pair.folder, prompt, n), "temperature 0.8 drew the greedy tokens"
    for transport, d in pair.decodes.items():
        for _ in range(2):
            body = d.http.complete(prompt=prompt, max_tokens=n, temperature=0.8, seed=1234, ignore_eos=True)
            got = check_completion(body, transport=transport, prompt_len=len(prompt), max_tokens=n)
            assert got == want, first_difference(got, want)
    other = reference(pair.folder, prompt, n, temperature=0.8, seed=4321)
    assert other != want
    nucleus = reference(pair.folder, prompt, n, temperature=0.8, top_p=0.9, seed=1234)
    d = pair.decodes["tcp"]
    assert d.http.complete(prompt=prompt, max_tokens=n, temperature=0.8, seed=4321,
                           ignore_eos=True)["choices"][0]["token_ids"] == other
    assert d.http.complete(prompt=prompt, max_tokens=n, temperature=0.8, top_p=0.9, seed=1234,
                           ignore_eos=True)["choices"][0]["token_ids"] == nucleus
    for seed in (-2**63, -5, 0, 2**63 - 1):  # every 64-bit seed, through the prefill request too
        got = d.http.complete(prompt=prompt, max_tokens=8, temperature=0.8, seed=seed,
                              ignore_eos=True)["choices"][0]["token_ids"]
        assert got == reference(pair.folder, prompt, 8, temperature=0.8, seed=seed), f"seed {seed}"


def test_sampling_in_a_batch_equals_one_process(pair):
    """Seeded requests decoded together (and streamed) draw what each draws alone."""
    n = 16
    cases = [(prompt_ids(10 + 9 * s, seed=50 + s), s) for s in range(6)]
    decodes = [pair.decodes[t] for t in TRANSPORTS]
    streams = concurrently([lambda i=i, p=p, s=s: decodes[i % 2].http.stream(
        prompt=p, max_tokens=n, temperature=0.8, top_p=0.95, seed=s, ignore_eos=True)
        for i, (p, s) in enumerate(cases)])
    for (p, s), st in zip(cases, streams):
        assert st.status == 200 and st.done and not st.errors, (st.status, st.body, st.errors)
        want = reference(pair.folder, p, n, temperature=0.8, top_p=0.95, seed=s)
        assert st.token_ids == want, f"seed {s}: {first_difference(st.token_ids, want)}"


# --- 4. the API's refusals and its other routes ----------------------------------------------

MAX_CONTEXT = 2048  # the folder's max_position_embeddings (checked below)

BAD_REQUESTS = [
    # (id, body, status, param)
    ("empty-string-prompt", {"prompt": ""}, 400, "prompt"),
    ("empty-list-prompt", {"prompt": []}, 400, "prompt"),
    ("no-prompt", {"max_tokens": 4}, 400, "prompt"),
    ("prompt-longer-than-context", {"prompt": [65] * (MAX_CONTEXT + 1), "max_tokens": 1}, 400, "prompt"),
    ("prompt-fills-context", {"prompt": [65] * MAX_CONTEXT, "max_tokens": 1}, 400, "prompt"),
    ("prompt-plus-max-tokens-beyond-context", {"prompt": [65] * 2000, "max_tokens": 49}, 400, "max_tokens"),
    ("unknown-model", {"model": "no-such-model", "prompt": "hi"}, 404, "model"),
    ("malformed-json", b'{"prompt": "hi", "max_tokens": ', 400, None),
    ("not-utf8", b'{"prompt": "\xff\xfe"}', 400, None),
    ("body-not-an-object", [1, 2, 3], 400, None),
    ("max-tokens-zero", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-negative", {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("max-tokens-string", {"prompt": "hi", "max_tokens": "8"}, 400, "max_tokens"),
    ("max-tokens-float", {"prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens"),
    ("max-tokens-bool", {"prompt": "hi", "max_tokens": True}, 400, "max_tokens"),
    ("prompt-number", {"prompt": 42}, 400, "prompt"),
    ("prompt-mixed-list", {"prompt": [1, "a", 2]}, 400, "prompt"),
    ("prompt-bool-ids", {"prompt": [True, False]}, 400, "prompt"),
    ("prompt-id-outside-vocab", {"prompt": [1, 384]}, 400, "prompt"),
    ("prompt-negative-id", {"prompt": [1, -1]}, 400, "prompt"),
    ("prompt-batch-of-two", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("temperature-string", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("temperature-negative", {"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("top-p-zero", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("seed-string", {"prompt": "hi", "seed": "7"}, 400, "seed"),
    ("seed-float", {"prompt": "hi", "seed": 1.5}, 400, "seed"),
    ("seed-beyond-64-bits", {"prompt": "hi", "seed": 2**64}, 400, "seed"),
    ("seed-just-beyond-int64", {"prompt": "hi", "seed": 2**63}, 400, "seed"),
    ("seed-below-int64", {"prompt": "hi", "seed": -2**63 - 1}, 400, "seed"),
    ("stream-string", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("ignore-eos-number", {"prompt": "hi", "ignore_eos": 1}, 400, "ignore_eos"),
    ("stop-number", {"prompt": "hi", "stop": 5}, 400, "stop"),
    ("n-two", {"prompt": "hi", "n": 2}, 400, "n"),
]


def test_the_context_is_the_folders(pair):
    config = json.loads((pair.folder / "config.json").read_text())
    assert config["max_position_embeddings"] == MAX_CONTEXT


@pytest.mark.parametrize("body,status,param", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_is_refused_with_a_message(pair, body, status, param):
    d = pair.decodes["shm"]
    r = d.http.post("/v1/completions", body)
    assert r.status == status, f"{r.status} {r.body[:300]!r}"
    assert r.headers.get("content-type", "").startswith("application/json")
    r.error_message()
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error", err
    if param is not None:
        assert err["param"] == param, err
    # the worker stays healthy, with every block back in its pool
    assert d.health()["status"] == "ok"
    assert d.health()["free_blocks"] == KV_BLOCKS


def test_a_good_request_after_bad_ones(pair):
    d = pair.decodes["shm"]
    for body in (b"{", {"prompt": ""}, {"prompt": "x", "max_tokens": 0}):
        assert d.http.post("/v1/completions", body).status == 400
    prompt = prompt_ids(5, seed=5)
    got = d.http.complete(prompt=prompt, max_tokens=4, temperature=0, ignore_eos=True)["choices"][0]["token_ids"]
    assert got == reference(pair.folder, prompt, 4)


def test_unknown_routes_are_404(pair):
    http = pair.decodes["shm"].http
    assert http.get("/v1/nothing").status == 404
    r = http.post("/v1/chat/nothing", {"prompt": "hi"})
    assert r.status == 404 and r.error_message()


def test_models_route(pair):
    for d in pair.decodes.values():
        r = d.http.get("/v1/models")
        assert r.status == 200
        body = r.json()
        assert body["object"] == "list" and len(body["data"]) == 1
        entry = body["data"][0]
        assert entry["id"] == "llama" == d.hello["model"]  # the folder's name
        assert entry["root"] == d.hello["model_id"] == pair.prefills[0].hello["model_id"]
        # the served name is accepted as "model"
        assert d.http.complete(model="llama", prompt="hi", max_tokens=1)["model"] == "llama"


def test_health_route(pair):
    for transport, d in pair.decodes.items():
        h = d.health()
        assert h["status"] == "ok" and h["model"] == "llama", h
        assert h["running"] == 0 and h["free_blocks"] == KV_BLOCKS, h
        assert h["prefill_workers"] == {p.endpoint: transport for p in pair.prefills}, h


def test_metrics_route(pair):
    d = pair.decodes["tcp"]
    d.http.complete(prompt="metrics", max_tokens=2)
    r = d.http.get("/metrics")
    assert r.status == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.body.decode())}
    ours = {name for name in families if name.startswith("kvtransfer_")}
    for name in ("kvtransfer_completions", "kvtransfer_ttft_seconds", "kvtransfer_inter_token_seconds",
                 "kvtransfer_running_sequences", "kvtransfer_pull_bytes", "kvtransfer_handshake_seconds"):
        assert name in ours, f"{name} missing from /metrics: {sorted(ours)}"
    ok = [s.value for s in families["kvtransfer_completions"].samples
          if s.name == "kvtransfer_completions_total" and s.labels.get("status") == "200"]
    assert ok and ok[0] >= 1
    pulled = [s.value for s in families["kvtransfer_pull_bytes"].samples
              if s.name == "kvtransfer_pull_bytes_total" and s.labels.get("transport") == "tcp"]
    assert pulled and pulled[0] > 0


def test_stop_strings_cut_the_text(pair):
    """A stop string ends generation there: the text stops before it, finish_reason is
    "stop", streamed and not; the tokens are the reference's up to that point."""
    d = pair.decodes["shm"]
    tok = load_tokenizer(pair.folder)
    want = reference(pair.folder, tok.encode("stop here"), 24)
    text = tok.decode(want)
    start = next(i for i in range(3, len(text) - 3) if "\ufffd" not in text[i:i + 3])
    stop = text[start:start + 3]
    cut = text.index(stop)
    body = d.http.complete(prompt="stop here", max_tokens=24, temperature=0, ignore_eos=True, stop=[stop, "\x00\x01"])
    c = body["choices"][0]
    assert (c["text"], c["finish_reason"]) == (text[:cut], "stop")
    assert c["token_ids"] and c["token_ids"] == want[:len(c["token_ids"])], first_difference(c["token_ids"], want)
    s = d.http.stream(prompt="stop here", max_tokens=24, temperature=0, ignore_eos=True, stop=stop)
    assert s.done and s.text == text[:cut] and s.final["choices"][0]["finish_reason"] == "stop"
    assert s.token_ids == want[:len(s.token_ids)], first_difference(s.token_ids, want)
    d.wait_idle()
