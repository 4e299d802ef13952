"""bench/serve.py end to end: a short run against the real workers (exit 0, its JSON
records), then its exit statuses and reports against tiny fake workers.

The fakes are ``prefill_worker`` / ``decode_worker`` packages written to a temporary
folder that the benchmark runs in: ``python -m decode_worker`` finds the current folder
first, so the benchmark starts them instead of the real ones. They speak the specified
API (ready line, SSE stream, [DONE]) with made-up tokens, and misbehave on request
(``FAKE_MODE``): ``mismatch`` (one-process serving answers other tokens), ``fail``
(HTTP 500 for every completion), ``sloppy`` (no usage, no [DONE]).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVE = ROOT / "bench" / "serve.py"

RECORD_KEYS = {
    "system", "url", "pids", "model", "prompt_bytes", "prompt_tokens", "max_tokens", "load", "concurrency", "rate",
    "requests", "completed", "failed", "failures", "output_tokens", "duration_s", "req_per_s", "tok_per_s",
    "kv_share_p50", "kv_bytes_p50", "kv_gbps_p50", "server_ttft_p50_ms", "transport", "ttft_p50_ms", "ttft_p90_ms",
    "ttft_p99_ms", "itl_p50_ms", "itl_p90_ms", "itl_p99_ms", "e2e_p50_ms", "e2e_p99_ms", "verified",
    "api_deviations",
}

FAKE_PREFILL = r'''
import json, os, signal, socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
print(json.dumps({"event": "ready", "control": "tcp://127.0.0.1:%d" % s.getsockname()[1], "pid": os.getpid(),
                  "model": "fake", "model_id": "fake-id"}), flush=True)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
while True:
    time.sleep(1)
'''

FAKE_DECODE = r'''
import argparse, hashlib, json, os, signal, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
ap = argparse.ArgumentParser()
ap.add_argument("--model"); ap.add_argument("--prefill", action="append"); ap.add_argument("--local-prefill",
    action="store_true"); ap.add_argument("--host"); ap.add_argument("--port", type=int)
ap.add_argument("--kv-blocks"); ap.add_argument("--max-batch"); ap.add_argument("--block-size")
args = ap.parse_args()
MODE, LOCAL = os.environ.get("FAKE_MODE", ""), args.local_prefill

def tokens(prompt, n):
    h = hashlib.sha256(prompt.encode()).digest()
    ids = [(h[i % 32] + i) % 256 for i in range(n)]
    if MODE == "mismatch" and LOCAL:
        ids[-1] ^= 1
    return ids[: n // 2] if h[0] % 3 == 0 else ids   # some stop early (EOS)

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def send(self, status, doc, ctype="application/json"):
        b = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        self.send_response(status); self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(b))); self.end_headers(); self.wfile.write(b)
    def do_GET(self):
        if self.path == "/v1/models":
            self.send(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
        elif self.path == "/metrics":
            self.send(200, b"fake_requests_total 1\n", "text/plain; version=0.0.4")
        else:
            self.send(200, {"status": "ok"})
    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if MODE == "fail":
            return self.send(500, {"error": {"message": "fake failure"}})
        ids = tokens(req["prompt"], req["max_tokens"])
        fin = "length" if len(ids) == req["max_tokens"] else "stop"
        pt = len(req["prompt"].encode()) + 1
        kv = {"prefill_worker": "local" if LOCAL else "fake-prefill", "transport": "local" if LOCAL else "shm",
              "bytes": 0 if LOCAL else 2048 * pt, "transfer_s": 0.0 if LOCAL else 0.001, "gb_per_s": None,
              "ttft_s": 0.004, "prompt_tokens": pt}
        usage = {"prompt_tokens": pt, "completion_tokens": len(ids), "total_tokens": pt + len(ids)}
        time.sleep(0.004)
        text = lambda t: bytes(t).decode("latin-1")
        if not req.get("stream"):
            return self.send(200, {"id": "x", "object": "text_completion", "created": 0, "model": "fake",
                                   "choices": [{"index": 0, "text": text(ids), "token_ids": ids,
                                                "finish_reason": fin}], "usage": usage, "kv_transfer": kv})
        self.send_response(200); self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close"); self.end_headers()
        chunks = [{"index": 0, "text": text([t]), "token_ids": [t], "finish_reason": None} for t in ids]
        chunks.append({"index": 0, "text": "", "token_ids": [], "finish_reason": fin})
        for k, c in enumerate(chunks):
            doc = {"id": "x", "object": "text_completion", "created": 0, "model": "fake", "choices": [c]}
            if c["finish_reason"] and MODE != "sloppy":
                doc.update(usage=usage, kv_transfer=kv)
            self.wfile.write(b"data: " + json.dumps(doc).encode() + b"\n\n"); self.wfile.flush()
            time.sleep(0.002)
        if MODE != "sloppy":
            self.wfile.write(b"data: [DONE]\n\n")
        self.close_connection = True

srv = ThreadingHTTPServer((args.host, args.port), Handler)
print(json.dumps({"event": "ready", "url": "http://127.0.0.1:%d" % srv.server_address[1], "pid": os.getpid(),
                  "model": "fake", "model_id": "fake-id"}), flush=True)
signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=srv.shutdown).start())
srv.serve_forever()
'''


def run_serve(tmp_path: Path, *args: str, cwd: Path = ROOT, mode: str = "",
              timeout: float = 240) -> tuple[subprocess.CompletedProcess, list[dict] | None]:
    out = tmp_path / "serve.json"
    env = {**os.environ, "FAKE_MODE": mode}
    proc = subprocess.run([sys.executable, str(SERVE), "--json", str(out), "--worker-logs", str(tmp_path / "logs"),
                           "--timeout", "30", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    records = json.loads(out.read_text()) if out.exists() else None
    return proc, records


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-4000:]}"


@pytest.fixture
def fakes(tmp_path: Path) -> Path:
    for pkg, main in (("prefill_worker", FAKE_PREFILL), ("decode_worker", FAKE_DECODE)):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
        (tmp_path / pkg / "__main__.py").write_text(main)
    return tmp_path


def check_records(records: list[dict], requests: int) -> dict[str, dict]:
    assert [r["system"] for r in records] == ["pair", "local"]
    for r in records:
        assert set(r) == RECORD_KEYS, set(r) ^ RECORD_KEYS
        assert r["requests"] == requests and r["completed"] + r["failed"] == requests
    return {r["system"]: r for r in records}


def test_real_workers_short_run(tmp_path):
    """The disaggregated pair and one-process serving, a few requests each: verified,
    every request completed, the JSON has the table's numbers."""
    proc, records = run_serve(tmp_path, "--model", "random", "--requests", "6", "--concurrency", "3",
                              "--prompt-tokens", "40", "--max-tokens", "6", "--verify", "2")
    assert proc.returncode == 0, explain(proc)
    by = check_records(records, 6)
    for name in ("TTFT p50", "ITL p99", "KV/TTFT", "Tok/s", " pair/local"):
        assert name in proc.stdout
    assert "Verified         : yes" in proc.stdout
    for r in by.values():
        assert r["failed"] == 0 and r["failures"] == {}
        assert r["verified"] is True and r["load"] == "closed" and r["concurrency"] == 3 and r["rate"] is None
        assert 0 < r["output_tokens"] <= 6 * 6
        assert r["prompt_bytes"] == 40 and r["prompt_tokens"] == 41  # byte-level tokenizer: + BOS
        assert r["duration_s"] > 0 and r["tok_per_s"] > 0 and r["req_per_s"] > 0
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p90_ms"] <= r["ttft_p99_ms"] <= r["e2e_p99_ms"]
        assert r["e2e_p50_ms"] <= r["e2e_p99_ms"]
        assert r["api_deviations"] == {}, r["api_deviations"]
    assert by["pair"]["transport"] in ("shm", "tcp", "verbs") and by["pair"]["kv_bytes_p50"] > 0
    assert 0 < by["pair"]["kv_share_p50"] < 1
    assert by["local"]["transport"] == "local" and by["local"]["kv_bytes_p50"] == 0
    assert by["pair"]["output_tokens"] == by["local"]["output_tokens"]  # same greedy tokens
    assert len(by["pair"]["pids"]) == 2 and len(by["local"]["pids"]) == 1


def test_poisson_arrivals_against_fakes(fakes, tmp_path):
    proc, records = run_serve(tmp_path, "--rate", "40", "--requests", "12", "--prompt-tokens", "20",
                              "--max-tokens", "5", cwd=fakes)
    assert proc.returncode == 0, explain(proc)
    by = check_records(records, 12)
    for r in by.values():
        assert r["load"] == "poisson" and r["rate"] == 40 and r["concurrency"] is None
        assert r["failed"] == 0 and r["api_deviations"] == {}, r
        assert r["model"] == "fake" and r["prompt_tokens"] == 21
    assert by["pair"]["kv_share_p50"] == pytest.approx(0.25) and by["pair"]["transport"] == "shm"
    assert "Poisson arrivals, 40 req/s" in proc.stdout


def test_tokens_that_differ_exit_1(fakes, tmp_path):
    proc, records = run_serve(tmp_path, "--requests", "4", "--prompt-tokens", "20", "--max-tokens", "5",
                              cwd=fakes, mode="mismatch")
    assert proc.returncode == 1, explain(proc)
    assert "VERIFY FAILED" in proc.stderr and "position 4" in proc.stderr
    assert records is None  # nothing timed, nothing written


def test_failed_requests_are_counted_and_all_failed_exits_2(fakes, tmp_path):
    proc, records = run_serve(tmp_path, "--requests", "5", "--verify", "0", "--prompt-tokens", "20", cwd=fakes,
                              mode="fail")
    assert proc.returncode == 2, explain(proc)
    for r in check_records(records, 5).values():
        assert r["completed"] == 0 and r["failed"] == 5
        assert r["verified"] is False  # --verify 0: nothing was verified
        assert list(r["failures"]) == ['HTTP 500: {"error": {"message": "fake failure"}}']
        assert r["ttft_p50_ms"] is None and r["tok_per_s"] is None
    assert "Failed requests:" in proc.stdout and "every request failed" in proc.stderr


def test_verifying_request_that_fails_exits_2(fakes, tmp_path):
    proc, _ = run_serve(tmp_path, "--requests", "2", "--prompt-tokens", "20", cwd=fakes, mode="fail")
    assert proc.returncode == 2, explain(proc)
    assert "verifying prompt 0" in proc.stderr and "HTTP 500" in proc.stderr


def test_api_deviations_are_reported(fakes, tmp_path):
    proc, records = run_serve(tmp_path, "--requests", "4", "--prompt-tokens", "20", "--max-tokens", "4",
                              cwd=fakes, mode="sloppy")
    assert proc.returncode == 0, explain(proc)
    for r in check_records(records, 4).values():
        assert r["failed"] == 0
        assert r["api_deviations"]["final chunk has no usage"] >= 4
        assert r["api_deviations"]["stream ended without data: [DONE]"] >= 4
        assert r["kv_share_p50"] is None and r["transport"] == "-"
    assert "API deviations" in proc.stdout
