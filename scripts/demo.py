"""The main demo (`make demo`): a prefill and a decode worker answer questions.

It starts ``python -m prefill_worker`` and ``python -m decode_worker`` on the default model
(SmolLM2-135M-Instruct, converted from its GGUF file on first use) and asks a few plain
questions at once through the OpenAI-compatible HTTP API: each is rendered with the
model's chat template (:mod:`kvtransfer.model.chat`) and sent to ``/v1/completions``,
streamed, greedy, until the model's end-of-turn token. It prints each question, its
answer and what moving its KV took (bytes, transport, transfer time), then runs the same
model in this one process and checks that every answer is the same, token for token.
Workers are stopped at the end, also on Ctrl-C. A model without a chat template
(``--model random``) gets the questions as plain prompts.

    .venv/bin/python scripts/demo.py [--model DIR|FILE.gguf|random] [--max-tokens 64]
                                     [--transport shm|tcp] [--device cuda]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
import time

from kvtransfer.errors import InvalidArgumentError
from kvtransfer.model.chat import ChatTemplate
from kvtransfer.testing.children import start_child, stop_child
from kvtransfer.testing.openai_client import OpenAIClient
from kvtransfer.worker_cli import model_folder

QUESTIONS = [
    "What is the capital of France?",
    "What is 2+2?",
    "Name three fruits, as a short list.",
]

#: a worker's exit after SIGTERM, before SIGKILL
STOP_S = 20.0


class Progress:
    """One status line, redrawn in place on a terminal (plain lines otherwise)."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self.lock = threading.Lock()

    def show(self, text: str) -> None:
        with self.lock:
            if self.tty:
                print("\r\033[K" + text, end="", flush=True)

    def done(self, text: str) -> None:
        with self.lock:
            print(("\r\033[K" if self.tty else "") + text, flush=True)


def chat_prompts(folder: str) -> list[str]:
    """Each question as one user turn in the model's chat template (plain text without one)."""
    try:
        template = ChatTemplate.from_folder(folder)
    except InvalidArgumentError:
        return list(QUESTIONS)
    return [template.render([{"role": "user", "content": q}], add_generation_prompt=True) for q in QUESTIONS]


def run_requests(url: str, prompts: list[str], max_tokens: int, progress: Progress) -> list[dict]:
    results: list[dict] = [{} for _ in prompts]
    counts = [0] * len(prompts)

    def one(i: int) -> None:
        t0 = time.monotonic()
        body = {"prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0}
        ids, text, first = [], "", None
        try:
            for at, chunk in OpenAIClient(url, timeout=120).events(**body):
                c = chunk["choices"][0]
                ids += c["token_ids"]
                text += c["text"]
                first = first or at
                counts[i] = len(ids)
                progress.show(f"  generating: {sum(counts)} tokens, {sum(1 for r in results if r)}/{len(prompts)} "
                              f"requests done")
                if c["finish_reason"] is not None:
                    results[i] = {"ids": ids, "text": text, "kv": chunk.get("kv_transfer", {}),
                                  "usage": chunk.get("usage", {}), "ttft": first - t0, "total": at - t0}
        except Exception as e:
            results[i] = {"error": str(e)}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model folder, .gguf file or 'random' (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--max-tokens", type=int, default=64, help="most tokens an answer may have [%(default)s]")
    ap.add_argument("--transport", choices=("shm", "tcp"), help="force the KV transport (default: the engine's choice)")
    ap.add_argument("--device", default="cpu", help="torch device of both workers' model and KV pool (e.g. cuda)")
    args = ap.parse_args(argv)
    from kvtransfer.model import load_model, load_tokenizer
    from kvtransfer.model.generate import reference_generate

    folder = str(model_folder(args.model))
    prompts = chat_prompts(folder)
    py = sys.executable
    progress = Progress()
    procs: list[tuple[subprocess.Popen, str]] = []
    try:
        print(f"model: {folder}")
        progress.show("  starting the prefill worker ...")
        pf, hello = start_child([py, "-m", "prefill_worker", "--model", folder, "--control", "tcp://127.0.0.1:0",
                                 "--device", args.device, "--log-level", "warning"], timeout=120,
                                what="prefill worker")
        procs.append((pf, "prefill worker"))
        progress.done(f"prefill worker  pid {pf.pid}, control plane {hello['control']}")
        progress.show("  starting the decode worker ...")
        cmd = [py, "-m", "decode_worker", "--model", folder, "--prefill", hello["control"], "--port", "0",
               "--device", args.device, "--log-level", "warning"]
        cmd += ["--transport", args.transport] if args.transport else []
        dw, ready = start_child(cmd, timeout=120, what="decode worker")
        procs.append((dw, "decode worker"))
        url = ready["url"]
        progress.done(f"decode worker   pid {dw.pid}, OpenAI API at {url}/v1/completions")
        print(f"\nasking {len(prompts)} questions at once (chat template, streamed, greedy, "
              f"at most {args.max_tokens} tokens each) ...")
        results = run_requests(url, prompts, args.max_tokens, progress)
        progress.done(f"  {sum(1 for r in results if 'ids' in r)}/{len(prompts)} requests done")
        failed = [r["error"] for r in results if "error" in r]
        if failed:
            print("FAILED requests:\n  " + "\n  ".join(failed))
            return 1

        for i, (q, r) in enumerate(zip(QUESTIONS, results)):
            kv = r["kv"]
            answer = r["text"].strip().replace("\n", "\n       ")
            print(f"\n[{i}] Q: {q}\n    A: {answer}")
            print(f"    KV {kv['bytes']:,} bytes ({r['usage']['prompt_tokens']} prompt tokens) over "
                  f"{kv['transport']} in {kv['transfer_s'] * 1e3:.2f} ms; first token after "
                  f"{r['ttft'] * 1e3:.0f} ms, {len(r['ids'])} tokens in {r['total']:.2f} s")

        progress.show("  checking against the same model in one process ...")
        model, tok = load_model(folder, device=args.device), load_tokenizer(folder)
        same = 0
        for p, r in zip(prompts, results):
            want = reference_generate(model, tok.encode(p), args.max_tokens, stop_ids=tok.eos_token_ids)
            same += want == r["ids"]
        progress.done(f"\none-process reference: {same}/{len(prompts)} answers token-for-token identical"
                      + ("" if same == len(prompts) else "  <-- MISMATCH"))
        return 0 if same == len(prompts) else 1
    except KeyboardInterrupt:
        progress.done("\ninterrupted; stopping the workers")
        return 130
    finally:
        for proc, what in reversed(procs):
            if not stop_child(proc, STOP_S, sig=signal.SIGTERM):
                print(f"  {what} did not stop in {STOP_S:.0f} s after SIGTERM; killed it")
        if procs:
            print("workers stopped")


if __name__ == "__main__":
    sys.exit(main())
