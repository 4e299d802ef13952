"""Serving load on the decode worker's OpenAI HTTP API: the disaggregated pair vs one process.

    .venv/bin/python bench/serve.py                                    # 8 clients, 64 requests each system
    .venv/bin/python bench/serve.py --rate 4 --requests 32 --json serve.json
    .venv/bin/python bench/serve.py --prompt-tokens 1024 --max-tokens 64 --concurrency 16
    .venv/bin/python bench/serve.py --model DIR --worker-logs logs/

One run starts two systems on the same model (``--model``: a folder, a .gguf file or
``random``; else the workers' default, SmolLM2-135M-Instruct):

* ``pair``   the disaggregated pair: ``python -m prefill_worker --control tcp://127.0.0.1:0``
             and ``python -m decode_worker --prefill ENDPOINT``; the decode worker sends each
             prompt to the prefill worker and pulls its KV cache over the transfer engine.
* ``local``  one-process serving: ``python -m decode_worker --local-prefill`` computes the
             prompt's KV itself (no KV transfer).

Each worker prints one JSON line when ready (read with ``kvtransfer.testing.children.start_child``);
its stderr goes to a log file (``--worker-logs DIR``, else a temporary folder that is
removed after a clean run and kept, and named, otherwise). The workers are stopped by pid:
SIGTERM, a bounded wait, then SIGKILL; one that needs SIGKILL or exits non-zero on SIGTERM
is reported. All workers stay up for the whole run; the systems are measured one after
the other, so only one is loaded at a time (the idle one shares the CPUs).

1. verify   ``--verify`` greedy prompts (lengths: ``--prompt-tokens``, exactly one KV block
            with BOS, one block plus one token, 1 byte, then random), each sent to both
            systems non-streaming and streaming. The pair's ``token_ids`` must equal
            one-process serving's, and each system's streamed tokens must equal its own
            non-streamed ones; any difference names the prompt and the first differing
            position and exits 1. These requests also warm the workers up.
2. load     per system, the same ``--requests`` streaming greedy requests
            (``temperature`` 0, ``stream`` true, ``max_tokens`` ``--max-tokens``); prompt i is
            ``--prompt-tokens`` random printable ASCII bytes seeded by (``--seed``, i): with
            the byte-level tokenizer, 1 byte = 1 token, plus BOS. Either ``--concurrency N``
            closed-loop clients (each sends its next request when its last one ends) or
            ``--rate R`` open-loop Poisson arrivals (exponential gaps of mean 1/R s, seeded;
            requests are not capped in flight). An early EOS is accepted: the tokens counted
            are those streamed. Afterwards the greedy tokens of each request are compared
            across the two systems; a difference exits 1 as well.

One thread per client (``http.client``, a new connection per request); every request has
a socket timeout and an overall deadline (``--timeout``). A request fails (counted,
reasons summarized) on a connection error, a timeout, an HTTP status other than 200, an
error event or malformed JSON in the stream, or a stream that ends with neither a final
chunk (``finish_reason`` set) nor ``data: [DONE]``. Departures from the API that still let
the request be measured (a final chunk without ``usage`` or ``kv_transfer``, a
``usage.completion_tokens`` that is not the number of streamed tokens, several tokens in
one chunk, a missing ``[DONE]``, a wrong content type, streamed text deltas that do not
add up to the non-streamed text, a worker that does not shut down cleanly...) are counted per system and printed under "API deviations" and in the JSON.

Columns (one row per system; ms are milliseconds measured by this client):

* ``#req`` / ``#fail``   requests that completed / failed.
* ``#tokens``        output tokens streamed by the completed requests.
* ``time[s]``        wall time from the first request sent to the last one finished.
* ``Req/s``          completed requests / ``time``.
* ``Tok/s``          output tokens / ``time``.
* ``KV/TTFT``        median over requests of the final chunk's ``kv_transfer.transfer_s /
                     kv_transfer.ttft_s``: the share of the server-side time to first token
                     spent moving KV (0 for ``local``).
* ``KV[bytes]``      median ``kv_transfer.bytes`` per request.
* ``transport``      ``kv_transfer.transport`` (all values seen; ``local`` for one process).
* ``TTFT p50/p90/p99``  time to first token: request sent -> first SSE event carrying a token.
* ``ITL p50/p90/p99``   inter-token latency: gaps between consecutive token events, pooled
                        over all requests.
* ``E2E p50/p99``        request sent -> end of the stream.

Percentiles are numpy's (linear interpolation): with 64 requests, p99 is about the
slowest. Timestamps are taken when a whole SSE event has been read, in Python threads
that share the GIL, so sub-millisecond differences are noise. After the tables, one line
gives pair/local ratios.

``--json FILE`` writes a list of records, one per system: ``{"system", "url", "pids",
"model", "prompt_bytes", "prompt_tokens", "max_tokens", "load", "concurrency", "rate",
"requests", "completed", "failed", "failures", "output_tokens", "duration_s",
"req_per_s", "tok_per_s", "kv_share_p50", "kv_bytes_p50", "kv_gbps_p50",
"server_ttft_p50_ms", "transport", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms",
"itl_p50_ms", "itl_p90_ms", "itl_p99_ms", "e2e_p50_ms", "e2e_p99_ms", "verified",
"api_deviations"}`` (``prompt_tokens``: median ``usage.prompt_tokens``; ``verified``: the
verifying prompts ran and matched, false with ``--verify 0``; ``failures`` and
``api_deviations``: message -> count; a statistic with no samples is null).

Exit status: 0 when the run completed and verified (some failed requests are reported,
not fatal); 1 when the pair's greedy tokens differ from one-process serving's (or
streaming from non-streaming); 2 on any other error: a worker that did not start or
died, a verification request that failed, a system whose requests all failed, or an
interruption (Ctrl-C, SIGTERM: the workers are stopped first).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvtransfer.testing import children
from kvtransfer.testing.openai_client import COMPLETIONS, OpenAIClient, sse_events
from report import cpu_model, kv_lines

SYSTEMS = ("pair", "local")
SYSTEM_TITLES = {
    "pair": "disaggregated: prefill worker + decode worker, KV pulled over the transfer engine",
    "local": "one process: decode worker with --local-prefill (no KV transfer)",
}
THROUGHPUT_COLUMNS = ("system", "#req", "#fail", "#tokens", "time[s]", "Req/s", "Tok/s", "KV/TTFT", "KV[bytes]",
                      "transport")
LATENCY_COLUMNS = ("system", "TTFT p50", "TTFT p90", "TTFT p99", "ITL p50", "ITL p90", "ITL p99", "E2E p50",
                   "E2E p99")

STARTUP_TIMEOUT_S = 180.0  # a worker's ready line: torch import + (first run) converting the default model
STOP_TIMEOUT_S = 15.0      # a worker's exit after SIGTERM, before SIGKILL
PROBE_TIMEOUT_S = 10.0     # GET /health, /v1/models, /metrics
PRINTABLE = (0x20, 0x7F)   # prompt bytes: printable ASCII, space to tilde


class BenchError(Exception):
    """The benchmark could not run (exit status 2)."""


class VerifyError(BenchError):
    """Greedy tokens differ between systems or between streaming and not (exit status 1)."""


# --------------------------------------------------------------------------- bookkeeping

class Deviations:
    """Thread-safe counts of departures from the specified API, per system."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def add(self, system: str, message: str) -> None:
        with self.lock:
            self.counts[system][message] += 1

    def of(self, system: str) -> dict[str, int]:
        with self.lock:
            return dict(self.counts.get(system, {}))

    def lines(self) -> list[str]:
        with self.lock:
            return [f" {system}: {msg} (x{n})" for system in sorted(self.counts)
                    for msg, n in self.counts[system].most_common()]


DEVIATIONS = Deviations()


def prompt_text(nbytes: int, *seed: int) -> str:
    """``nbytes`` random printable ASCII characters (1 byte = 1 token, byte-level)."""
    rng = np.random.default_rng(list(seed))
    return rng.integers(*PRINTABLE, size=nbytes, dtype=np.uint8).tobytes().decode("ascii")


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else None


# --------------------------------------------------------------------------- workers

@dataclass
class Worker:
    what: str
    proc: subprocess.Popen
    hello: dict
    log: Path


@dataclass
class System:
    name: str
    url: str
    model: str
    workers: list[Worker]
    model_id: object = None  # the ready line's "model_id" (identity), when it has one

    def check_alive(self) -> None:
        for w in self.workers:
            code = w.proc.poll()
            if code is not None:
                raise BenchError(f"{w.what} (pid {w.proc.pid}) exited with status {code}; "
                                 f"last lines of {w.log}:\n{tail(w.log)}")


def tail(path: Path, nbytes: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-nbytes:].rstrip()
    except OSError:
        return "<log unavailable>"


class Fleet:
    """The worker processes of this run; stopped (last started first) by ``close``."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.lock = threading.Lock()
        self.workers: list[Worker] = []
        self.stopped = False

    def start(self, what: str, args: list[str], ready_key: str) -> Worker:
        log = self.log_dir / f"{what.replace(' ', '-')}.log"
        # sh only redirects stderr to the log, then execs the worker (same pid)
        cmd = ["/bin/sh", "-c", 'exec "$@" 2>>"$0"', str(log), sys.executable, *args]
        print(f"[serve] starting {what}: python {' '.join(args)}", file=sys.stderr, flush=True)
        try:
            proc, hello = children.start_child(cmd, STARTUP_TIMEOUT_S, what)
        except children.ChildError as e:
            raise BenchError(f"{e}; last lines of {log}:\n{tail(log)}") from None
        worker = Worker(what, proc, hello, log)
        with self.lock:
            self.workers.append(worker)
            if self.stopped:  # close() ran while this one was starting
                self._stop(worker)
        if hello.get("event") != "ready" or not isinstance(hello.get(ready_key), str):
            raise BenchError(f"{what} printed {json.dumps(hello)}, expected "
                             f'{{"event": "ready", "{ready_key}": ..., "pid": ..., "model": ...}}')
        if hello.get("pid") != proc.pid:
            DEVIATIONS.add("workers", f"{what}: ready line pid {hello.get('pid')} is not the process's "
                                      f"pid {proc.pid}")
        return worker

    def _stop(self, w: Worker) -> None:
        """SIGTERM by pid, a bounded wait, then SIGKILL; an unclean exit is a deviation."""
        running = w.proc.poll() is None  # one that died earlier is check_alive's to report
        stopped = children.stop_child(w.proc, STOP_TIMEOUT_S, sig=signal.SIGTERM)
        if not running:
            return
        if not stopped:
            DEVIATIONS.add("workers", f"{w.what}: still running {STOP_TIMEOUT_S:.0f} s after SIGTERM, killed")
        elif w.proc.returncode != 0:
            DEVIATIONS.add("workers", f"{w.what}: exit status {w.proc.returncode} after SIGTERM (expected 0)")

    def close(self) -> None:
        with self.lock:
            self.stopped = True
            workers, self.workers = self.workers[::-1], []
        for w in workers:
            self._stop(w)


def worker_options(args: argparse.Namespace) -> list[str]:
    """Options every worker gets. --block-size is in the decode worker's specified command
    line only as an extension, so it is passed to it only when not the default 16."""
    opts = ["--model", args.model] if args.model else []
    if args.kv_blocks:
        opts += ["--kv-blocks", str(args.kv_blocks)]
    return opts


def decode_options(args: argparse.Namespace) -> list[str]:
    opts = ["--host", "127.0.0.1", "--port", "0", "--max-batch", str(args.max_batch)]
    return opts + (["--block-size", str(args.block_size)] if args.block_size != 16 else [])


def start_pair(fleet: Fleet, args: argparse.Namespace) -> System:
    common = worker_options(args)
    pre = fleet.start("prefill worker", ["-m", "prefill_worker", *common, "--control", "tcp://127.0.0.1:0",
                                         "--block-size", str(args.block_size)], "control")
    dec = fleet.start("pair decode worker", ["-m", "decode_worker", *common, "--prefill", pre.hello["control"],
                                             *decode_options(args)], "url")
    # both ready lines carry the model's identity (architecture:digest) as "model_id"
    dec_id = dec.hello.get("model_id")
    if pre.hello.get("model_id") != dec_id:
        DEVIATIONS.add("workers", f"prefill worker serves model {pre.hello.get('model_id')!r}, its decode worker "
                                  f"{dec_id!r}")
    return System("pair", dec.hello["url"], str(dec.hello.get("model")), [pre, dec], dec_id)


def start_local(fleet: Fleet, args: argparse.Namespace) -> System:
    dec = fleet.start("local decode worker", ["-m", "decode_worker", *worker_options(args), "--local-prefill",
                                              *decode_options(args)], "url")
    return System("local", dec.hello["url"], str(dec.hello.get("model")), [dec],
                  dec.hello.get("model_id", dec.hello.get("model")))


# --------------------------------------------------------------------------- HTTP

def client(url: str, timeout: float) -> OpenAIClient:
    try:
        return OpenAIClient(url, timeout)
    except ValueError as e:
        raise BenchError(f"worker URL: {e}") from None


def get(url: str, path: str) -> tuple[int, str, str]:
    """(status, content type, body) of GET ``path``."""
    r = client(url, PROBE_TIMEOUT_S).get(path)
    return r.status, r.headers.get("content-type", ""), r.body[:1 << 20].decode(errors="replace")


def probe(system: System) -> None:
    """GET /health, /v1/models and /metrics; departures are deviations, no answer an error."""
    dev = lambda msg: DEVIATIONS.add(system.name, msg)  # noqa: E731
    try:
        status, _, body = get(system.url, "/health")
        if status != 200:
            raise BenchError(f"{system.name}: GET /health answered {status}: {body[:200]}")
        status, _, body = get(system.url, "/v1/models")
        if status != 200:
            dev(f"GET /v1/models answered HTTP {status}")
        else:
            try:
                ids = [m.get("id") for m in json.loads(body)["data"]]
                if system.model not in ids:
                    dev(f"GET /v1/models lists {ids}, not the ready line's model {system.model!r}")
            except (ValueError, KeyError, TypeError, AttributeError):
                dev(f"GET /v1/models is not an OpenAI model list: {body[:120]!r}")
        status, ctype, body = get(system.url, "/metrics")
        if status != 200 or not ctype.startswith("text/plain"):
            dev(f"GET /metrics answered HTTP {status}, Content-Type {ctype!r} (expected Prometheus text/plain)")
    except (OSError, http.client.HTTPException) as e:
        raise BenchError(f"{system.name} at {system.url} did not answer: {type(e).__name__}: {e}") from None


def body_of(system: System, prompt: str, max_tokens: int, stream: bool) -> dict:
    return {"model": system.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": stream}


def complete(system: System, prompt: str, max_tokens: int, timeout: float) -> dict:
    """A non-streaming greedy completion: its JSON (raises BenchError on any failure)."""
    try:
        resp = client(system.url, timeout).post(COMPLETIONS, body_of(system, prompt, max_tokens, False))
        raw = resp.body
        if resp.status != 200:
            raise BenchError(f"{system.name}: POST /v1/completions (not streaming) answered HTTP {resp.status}: "
                             f"{raw[:300].decode(errors='replace')}")
        doc = json.loads(raw)
        choice = doc["choices"][0]
        if not isinstance(choice.get("token_ids"), list):
            raise BenchError(f"{system.name}: non-streaming answer has no choices[0].token_ids: {raw[:300]!r}")
        for key in ("usage", "kv_transfer"):
            if not isinstance(doc.get(key), dict):
                DEVIATIONS.add(system.name, f"non-streaming answer has no {key!r}")
        if doc.get("object") != "text_completion":
            DEVIATIONS.add(system.name, f"non-streaming answer has object {doc.get('object')!r}")
        return doc
    except (OSError, http.client.HTTPException) as e:
        raise BenchError(f"{system.name}: POST /v1/completions failed: {type(e).__name__}: {e}") from None
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise BenchError(f"{system.name}: malformed non-streaming answer ({type(e).__name__}: {e})") from None


@dataclass
class Outcome:
    """One streaming request as this client saw it (times from time.monotonic())."""

    index: int
    t_send: float = 0.0
    t_end: float = 0.0
    token_times: list[float] = field(default_factory=list)  # one per token event
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False  # data: [DONE] came
    finish_reason: str | None = None
    usage: dict | None = None
    kv: dict | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.t_send if self.token_times else None

    @property
    def gaps(self) -> list[float]:
        return list(np.diff(self.token_times)) if len(self.token_times) > 1 else []


class StreamError(Exception):
    """A streaming request failed; the message is the reason (summarized in the report)."""


def stream(system: System, prompt: str, max_tokens: int, timeout: float, index: int) -> Outcome:
    """One streaming greedy request; never raises (failures land in ``Outcome.error``)."""
    out = Outcome(index)
    dev = lambda msg: DEVIATIONS.add(system.name, msg)  # noqa: E731
    try:
        out.t_send = time.monotonic()
        deadline = out.t_send + timeout
        fields = body_of(system, prompt, max_tokens, True)
        with client(system.url, timeout).open_stream(COMPLETIONS, **fields) as resp:
            read_stream(out, resp, deadline, dev)
        out.t_end = time.monotonic()
        if out.finish_reason is None:
            raise StreamError("stream ended without a chunk with finish_reason" +
                              ("" if out.done else " and without data: [DONE]"))
        if not out.done:
            dev("stream ended without data: [DONE]")
        check_final(out, max_tokens, dev)
    except StreamError as e:
        out.error = str(e)
    except TimeoutError as e:  # a socket timeout or the deadline
        out.error = f"timeout ({e or f'no byte in {timeout:.0f} s'})"
    except (OSError, http.client.HTTPException) as e:
        out.error = f"{type(e).__name__}: {e}"
    if not out.t_end:
        out.t_end = time.monotonic()
    return out


def read_stream(out: Outcome, resp: http.client.HTTPResponse, deadline: float, dev) -> None:
    """Reads a streamed answer into ``out``; StreamError when it cannot be measured."""
    if resp.status != 200:
        raise StreamError(f"HTTP {resp.status}: {resp.read(300).decode(errors='replace').strip()}")
    ctype = resp.getheader("Content-Type", "")
    if not ctype.startswith("text/event-stream"):
        dev(f"streaming answer has Content-Type {ctype!r}, not text/event-stream")
    for t, data in sse_events(resp, deadline):
        if out.done:
            dev("events after data: [DONE]")
            break
        if data.strip() == b"[DONE]":
            out.done = True
            continue
        try:
            chunk = json.loads(data)
        except ValueError:
            raise StreamError(f"an event is not JSON: {data[:80]!r}") from None
        if not isinstance(chunk, dict):
            raise StreamError(f"an event is not a JSON object: {data[:80]!r}")
        if "error" in chunk:
            raise StreamError(f"error event: {json.dumps(chunk['error'])[:200]}")
        if out.finish_reason is not None:
            dev("chunks after the one with finish_reason")
        try:
            choice = chunk["choices"][0]
            ids = choice["token_ids"]
            if not isinstance(ids, list):
                raise TypeError
        except (KeyError, IndexError, TypeError):
            raise StreamError(f"a chunk has no choices[0].token_ids: {data[:120]!r}") from None
        if ids:
            if len(ids) > 1:
                dev("a chunk carries several tokens (ITL counts it as one gap)")
            out.token_times.append(t)
            out.token_ids.extend(int(i) for i in ids)
        out.text += choice.get("text") or ""
        if choice.get("finish_reason") is not None:
            out.finish_reason = choice["finish_reason"]
            out.usage, out.kv = chunk.get("usage"), chunk.get("kv_transfer")
        elif "usage" in chunk and chunk["usage"] is not None:
            dev("usage in a chunk whose finish_reason is null")


def check_final(out: Outcome, max_tokens: int, dev) -> None:
    """Deviations of a finished stream's final chunk (the request still counts)."""
    n = len(out.token_ids)
    if out.finish_reason not in ("length", "stop"):
        dev(f"finish_reason {out.finish_reason!r} (expected 'length' or 'stop')")
    if n > max_tokens:
        dev(f"more tokens streamed than max_tokens ({n} > {max_tokens})")
    if out.finish_reason == "length" and n != max_tokens:
        dev("finish_reason 'length' before max_tokens tokens")
    if not isinstance(out.usage, dict):
        dev("final chunk has no usage")
    elif out.usage.get("completion_tokens") != n:
        dev("usage.completion_tokens differs from the number of streamed tokens")
    elif out.usage.get("total_tokens") != out.usage.get("prompt_tokens", 0) + n:
        dev("usage.total_tokens != prompt_tokens + completion_tokens")
    if not isinstance(out.kv, dict):
        dev("final chunk has no kv_transfer")
    elif not all(isinstance(out.kv.get(k), (int, float)) for k in ("bytes", "transfer_s", "ttft_s")):
        dev("kv_transfer lacks numeric bytes/transfer_s/ttft_s")


# --------------------------------------------------------------------------- verification

def first_difference(a: list[int], b: list[int]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"position {i}: {x} vs {y}"
    return f"lengths {len(a)} vs {len(b)} (one is a prefix of the other)"


def verify_lengths(args: argparse.Namespace) -> list[int]:
    """Prompt byte lengths of the verifying pass: the workload's, a prompt that fills
    exactly one block with BOS, one that spills one token into a second, one byte, then
    random lengths up to the workload's."""
    fixed = [args.prompt_tokens, args.block_size - 1, args.block_size, 1]
    rng = np.random.default_rng([args.seed, 2])
    extra = [int(x) for x in rng.integers(1, max(2, args.prompt_tokens + 1), size=max(0, args.verify - 4))]
    return [n for n in fixed + extra if n >= 1][:args.verify]


def verify(systems: list[System], args: argparse.Namespace) -> int:
    """Greedy tokens: pair == local, streaming == non-streaming. Returns tokens compared."""
    compared = 0
    for k, n in enumerate(verify_lengths(args)):
        prompt = prompt_text(n, args.seed, 1, k)
        ref: list[int] | None = None
        for system in systems:
            system.check_alive()
            try:
                doc = complete(system, prompt, args.max_tokens, args.timeout)
            except BenchError as e:
                raise BenchError(f"verifying prompt {k} ({n} bytes): {e}") from None
            ids = [int(i) for i in doc["choices"][0]["token_ids"]]
            s = stream(system, prompt, args.max_tokens, args.timeout, -1)
            if not s.ok:
                raise BenchError(f"{system.name}: verifying prompt {k} ({n} bytes), streaming: {s.error}")
            if s.token_ids != ids:
                raise VerifyError(f"{system.name}: verifying prompt {k} ({n} bytes): streamed tokens differ from "
                                  f"non-streamed ones at {first_difference(s.token_ids, ids)}")
            if s.text != doc["choices"][0].get("text"):
                DEVIATIONS.add(system.name, "streamed text deltas do not add up to the non-streamed text")
            if ref is None:
                ref = ids
            elif ids != ref:
                raise VerifyError(f"verifying prompt {k} ({n} bytes): {system.name} greedy tokens differ from "
                                  f"{systems[0].name}'s at {first_difference(ids, ref)}")
            compared += len(ids)
        print(f"[serve] verify prompt {k} ({n}-byte prompt): {len(ref or [])} tokens, identical on "
              f"{' and '.join(s.name for s in systems)}, streaming and not", file=sys.stderr, flush=True)
    return compared


# --------------------------------------------------------------------------- load

def run_load(system: System, prompts: list[str], args: argparse.Namespace) -> list[Outcome]:
    """All requests against ``system``: closed loop (``--concurrency``) or Poisson (``--rate``)."""
    outcomes: list[Outcome | None] = [None] * len(prompts)

    def one(i: int) -> None:
        outcomes[i] = stream(system, prompts[i], args.max_tokens, args.timeout, i)

    threads: list[threading.Thread] = []
    if args.rate:
        gaps = np.random.default_rng([args.seed, 3]).exponential(1.0 / args.rate, size=len(prompts))
        arrivals = np.cumsum(gaps) - gaps[0]  # the first request at once
        t0 = time.perf_counter()
        for i, at in enumerate(arrivals):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            th = threading.Thread(target=one, args=(i,), daemon=True)
            th.start()
            threads.append(th)
    else:
        lock = threading.Lock()
        todo = iter(range(len(prompts)))

        def client() -> None:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                one(i)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(min(args.concurrency, len(prompts)))]
        for th in threads:
            th.start()
    # every request ends by its own deadline; this bound only guards against a bug here
    limit = time.perf_counter() + args.timeout * (len(prompts) + 1) + 30
    for th in threads:
        th.join(max(0.0, limit - time.perf_counter()))
    if any(th.is_alive() for th in threads):
        raise BenchError(f"{system.name}: client threads still running past every request's deadline")
    return [o for o in outcomes if o is not None]


@dataclass
class Summary:
    system: System
    outcomes: list[Outcome]

    @property
    def good(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.ok]

    @property
    def failed(self) -> int:
        return len(self.outcomes) - len(self.good)

    @property
    def output_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.good)

    @property
    def duration_s(self) -> float:
        good = self.good
        return max(o.t_end for o in good) - min(o.t_send for o in good) if good else 0.0

    def kv_values(self, key: str) -> list[float]:
        return [float(o.kv[key]) for o in self.good
                if isinstance(o.kv, dict) and isinstance(o.kv.get(key), (int, float))]

    def kv_share(self) -> list[float]:
        return [float(o.kv["transfer_s"]) / float(o.kv["ttft_s"]) for o in self.good
                if isinstance(o.kv, dict) and isinstance(o.kv.get("transfer_s"), (int, float))
                and isinstance(o.kv.get("ttft_s"), (int, float)) and o.kv["ttft_s"] > 0]

    def transports(self) -> str:
        seen = sorted({str(o.kv.get("transport")) for o in self.good if isinstance(o.kv, dict)})
        return ",".join(seen) or "-"

    def record(self, args: argparse.Namespace, verified: bool) -> dict:
        good, dur = self.good, self.duration_s
        ttft = [o.ttft for o in good if o.ttft is not None]
        gaps = [g for o in good for g in o.gaps]
        e2e = [o.t_end - o.t_send for o in good]
        ms = lambda v, q: None if pct(v, q) is None else pct(v, q) * 1e3  # noqa: E731
        prompt_tokens = [o.usage["prompt_tokens"] for o in good
                         if isinstance(o.usage, dict) and isinstance(o.usage.get("prompt_tokens"), int)]
        server_ttft = self.kv_values("ttft_s")
        return {
            "system": self.system.name, "url": self.system.url, "pids": [w.proc.pid for w in self.system.workers],
            "model": self.system.model, "prompt_bytes": args.prompt_tokens,
            "prompt_tokens": pct(prompt_tokens, 50), "max_tokens": args.max_tokens,
            "load": "poisson" if args.rate else "closed", "concurrency": None if args.rate else args.concurrency,
            "rate": args.rate, "requests": len(self.outcomes), "completed": len(good), "failed": self.failed,
            "failures": dict(collections.Counter(o.error for o in self.outcomes if not o.ok).most_common()),
            "output_tokens": self.output_tokens, "duration_s": dur,
            "req_per_s": len(good) / dur if dur else None, "tok_per_s": self.output_tokens / dur if dur else None,
            "kv_share_p50": pct(self.kv_share(), 50), "kv_bytes_p50": pct(self.kv_values("bytes"), 50),
            "kv_gbps_p50": pct(self.kv_values("gb_per_s"), 50),
            "server_ttft_p50_ms": None if pct(server_ttft, 50) is None else pct(server_ttft, 50) * 1e3,
            "transport": self.transports(),
            "ttft_p50_ms": ms(ttft, 50), "ttft_p90_ms": ms(ttft, 90), "ttft_p99_ms": ms(ttft, 99),
            "itl_p50_ms": ms(gaps, 50), "itl_p90_ms": ms(gaps, 90), "itl_p99_ms": ms(gaps, 99),
            "e2e_p50_ms": ms(e2e, 50), "e2e_p99_ms": ms(e2e, 99),
            "verified": verified, "api_deviations": DEVIATIONS.of(self.system.name),
        }


def compare_workloads(summaries: dict[str, Summary]) -> int:
    """Compares the greedy tokens of each request completed on both systems; returns how
    many were compared, raises VerifyError on the first difference."""
    a, b = (summaries[s] for s in SYSTEMS)
    by_index = {o.index: o for o in b.good}
    both = [(o, by_index[o.index]) for o in sorted(a.good, key=lambda o: o.index) if o.index in by_index]
    for o, other in both:
        if o.token_ids != other.token_ids:
            raise VerifyError(f"workload request {o.index}: pair greedy tokens differ from local's at "
                              f"{first_difference(o.token_ids, other.token_ids)}")
    return len(both)


# --------------------------------------------------------------------------- report

def num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def table_lines(columns: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    """perftest layout: left-aligned, two spaces after each column title."""
    widths = [max([len(c) + 2] + [len(row[j]) + 1 for row in rows]) for j, c in enumerate(columns)]

    def line(cells) -> str:
        return " " + "".join(f"{c:<{w}}" for c, w in zip(cells, widths)).rstrip()

    return [line(columns)] + [line(row) for row in rows]


def report(header: list[tuple[str, str]], records: list[dict]) -> str:
    rule = "-" * 100
    out = [rule, *kv_lines(header), rule]
    out += [f" {r['system']:<6}: {SYSTEM_TITLES[r['system']]}" for r in records]
    out += [rule]
    out += table_lines(THROUGHPUT_COLUMNS, [
        [r["system"], str(r["completed"]), str(r["failed"]), str(r["output_tokens"]), num(r["duration_s"], ".2f"),
         num(r["req_per_s"], ".2f"), num(r["tok_per_s"], ".1f"), num(r["kv_share_p50"], ".3f"),
         num(r["kv_bytes_p50"], ".0f"), r["transport"]] for r in records])
    out += [rule]
    out += table_lines(LATENCY_COLUMNS, [
        [r["system"]] + [num(r[k], ".1f") for k in ("ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "itl_p50_ms",
                                                    "itl_p90_ms", "itl_p99_ms", "e2e_p50_ms", "e2e_p99_ms")]
        for r in records])
    out.append(" (latencies in ms, measured by this client)")
    by = {r["system"]: r for r in records}
    if all(s in by for s in SYSTEMS):
        p, q = by["pair"], by["local"]

        def ratio(key: str) -> str:
            return f"{p[key] / q[key]:5.2f}x" if p[key] and q[key] else "  -  "

        out += [rule, f" {'pair/local':<17}: Tok/s {ratio('tok_per_s')}   TTFT p50 {ratio('ttft_p50_ms')}   "
                      f"ITL p50 {ratio('itl_p50_ms')}   E2E p50 {ratio('e2e_p50_ms')}"]
    failures = [f" {r['system']}: {msg} (x{n})" for r in records for msg, n in r["failures"].items()]
    if failures:
        out += [rule, " Failed requests:", *failures]
    deviations = DEVIATIONS.lines()
    if deviations:
        out += [rule, " API deviations (requests still measured):", *deviations]
    out.append(rule)
    return "\n".join(out)


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:7]))
    load = ap.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, default=8,
                      help="closed-loop clients, each with one request in flight (default %(default)s)")
    load.add_argument("--rate", type=float, help="open-loop Poisson arrivals, requests per second "
                                                 "(instead of --concurrency)")
    ap.add_argument("--requests", type=int, default=64, help="requests per system (default %(default)s)")
    ap.add_argument("--prompt-tokens", type=int, default=512,
                    help="prompt length in bytes of printable text = tokens with the byte-level tokenizer, "
                         "plus BOS (default %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request (default %(default)s)")
    ap.add_argument("--verify", type=int, default=4,
                    help="greedy prompts checked on both systems before timing (default %(default)s)")
    ap.add_argument("--model", help="model of both workers: a folder, a .gguf file or 'random' "
                                       "(default: theirs, SmolLM2-135M-Instruct)")
    ap.add_argument("--kv-blocks", type=int, help="--kv-blocks of every worker (default: the workers')")
    ap.add_argument("--block-size", type=int, default=16, help="tokens per KV block, for the workers and the "
                                                               "verifying prompts' lengths (default %(default)s)")
    ap.add_argument("--max-batch", type=int, default=32, help="decode workers' --max-batch (default %(default)s)")
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="seconds: socket timeout and overall deadline of each request (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompts and arrival times")
    ap.add_argument("--json", metavar="FILE", help="write the results as a JSON list of records")
    ap.add_argument("--worker-logs", metavar="DIR", help="keep the workers' stderr in DIR (default: a temporary "
                                                          "folder, kept only if the run fails)")
    args = ap.parse_args(argv)
    if args.requests < 1 or args.prompt_tokens < 1 or args.max_tokens < 1 or args.verify < 0:
        ap.error("--requests, --prompt-tokens and --max-tokens must be >= 1, --verify >= 0")
    if args.rate is not None and args.rate <= 0:
        ap.error("--rate must be > 0")
    if args.rate is None and args.concurrency < 1:
        ap.error("--concurrency must be >= 1")
    if args.block_size < 2 or args.max_batch < 1 or args.timeout <= 0 or (args.kv_blocks is not None
                                                                           and args.kv_blocks < 1):
        ap.error("--block-size must be >= 2, --max-batch and --kv-blocks >= 1, --timeout > 0")
    return args


def run(args: argparse.Namespace, log_dir: Path) -> int:
    fleet = Fleet(log_dir)
    with contextlib.ExitStack() as stack:
        stack.callback(fleet.close)
        with ThreadPoolExecutor(2) as pool:  # both systems start at once; the pair's workers in order
            futures = [pool.submit(start_pair, fleet, args), pool.submit(start_local, fleet, args)]
            errors = [f.exception() for f in futures]
        for e in errors:
            if e is not None:
                raise e
        systems = [f.result() for f in futures]
        pair, local = systems
        if (pair.model, pair.model_id) != (local.model, local.model_id):
            DEVIATIONS.add("workers", f"pair serves model {pair.model!r} ({pair.model_id}), "
                                      f"local {local.model!r} ({local.model_id})")
        for system in systems:
            probe(system)

        compared = verify(systems, args)
        prompts = [prompt_text(args.prompt_tokens, args.seed, 0, i) for i in range(args.requests)]
        summaries: dict[str, Summary] = {}
        for system in systems:
            system.check_alive()
            outcomes = run_load(system, prompts, args)
            system.check_alive()
            summaries[system.name] = s = Summary(system, outcomes)
            print(f"[serve] {system.name}: {len(s.good)} of {len(outcomes)} requests completed, "
                  f"{s.output_tokens} tokens in {s.duration_s:.2f} s", file=sys.stderr, flush=True)
        all_failed = [name for name, s in summaries.items() if not s.good]
        same = 0 if all_failed else compare_workloads(summaries)
        fleet.close()  # now, so that unclean shutdowns make it into the report

    load = (f"Poisson arrivals, {args.rate:g} req/s (seed {args.seed}), open loop" if args.rate
            else f"closed loop, {args.concurrency} concurrent clients")
    header = [("Benchmark", "POST /v1/completions, streaming, greedy (temperature 0)"),
              ("Model", f"{pair.model}" + (f" = {pair.model_id}" if pair.model_id not in (None, pair.model) else "")
                        + (f" ({args.model})" if args.model else " (the workers' default, SmolLM2-135M-Instruct)")),
              ("Prompt tokens", f"{args.prompt_tokens} bytes of random printable ASCII"
                                + (f" -> {pct(ptoks, 50):.0f} tokens (usage.prompt_tokens)"
                                   if (ptoks := [o.usage["prompt_tokens"] for s in summaries.values()
                                                 for o in s.good if isinstance(o.usage, dict)
                                                 and isinstance(o.usage.get("prompt_tokens"), int)]) else "")),
              ("Max tokens", f"{args.max_tokens} (early EOS accepted; tokens counted as streamed)"),
              ("Load", load),
              ("Requests", f"{args.requests} per system, the same prompts, systems one after the other"),
              ("Pair", f"prefill pid {pair.workers[0].proc.pid} ({pair.workers[0].hello['control']}), "
                       f"decode pid {pair.workers[1].proc.pid} ({pair.url})"),
              ("Local", f"decode pid {local.workers[0].proc.pid} ({local.url}), --local-prefill"),
              ("Workers", f"--max-batch {args.max_batch}, --block-size {args.block_size}"
                          + (f", --kv-blocks {args.kv_blocks}" if args.kv_blocks else "")),
              ("Host", f"{socket.gethostname()}, Linux {platform.release()}, Python {platform.python_version()}"),
              ("CPUs", f"{len(os.sched_getaffinity(0))} usable of {os.cpu_count()} ({cpu_model()})"),
              ("Verified", (f"yes: {len(verify_lengths(args))} greedy prompts ({compared} tokens) pair == local, "
                            "streaming == non-streaming; " if args.verify else "no verifying prompts (--verify 0); ")
                           + f"workload tokens pair == local for all {same} requests completed on both")]
    verified = args.verify > 0  # when it ran, verify() passed: a difference raised VerifyError
    records = [summaries[s].record(args, verified) for s in SYSTEMS]
    for r in records:  # the workers' shutdown deviations belong to every record
        for msg, n in DEVIATIONS.of("workers").items():
            r["api_deviations"][f"workers: {msg}"] = n
    print(report(header, records), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1) + "\n")
    if all_failed:
        print(f"serve: error: every request failed on {', '.join(all_failed)}", file=sys.stderr)
        return 2
    return 0


def on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, on_sigterm)  # unwind and stop the workers, as on Ctrl-C
    if args.worker_logs:
        log_dir = Path(args.worker_logs)
        log_dir.mkdir(parents=True, exist_ok=True)
    else:
        log_dir = Path(tempfile.mkdtemp(prefix="kvtransfer-serve-"))
    status = 2
    try:
        status = run(args, log_dir)
    except VerifyError as e:
        print(f"serve: VERIFY FAILED: {e}", file=sys.stderr)
        status = 1
    except BenchError as e:
        print(f"serve: error: {e}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt as e:
        print(f"serve: interrupted{f' ({e})' if str(e) else ''}; workers stopped", file=sys.stderr)
        status = 2
    finally:
        if args.worker_logs:
            pass
        elif status == 0:
            shutil.rmtree(log_dir, ignore_errors=True)
        else:
            print(f"serve: worker logs kept in {log_dir}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
