"""The main demo (`make demo`): a prefill and a decode worker on this machine.

It starts ``python -m prefill_worker`` and ``python -m decode_worker`` (the default
model: a small seeded random Llama, generated on first use — its text is noise; the
point is that both paths make the same noise), sends prompts of different lengths at
once through the OpenAI-compatible HTTP API (streamed), prints the completions and, per
request, what moving its KV took; then runs the same model in this one process and
checks that every token is the same. Workers are stopped at the end, also on Ctrl-C.

    python -m kvtransfer.demo [--model DIR] [--max-tokens 24] [--transport shm|tcp] [--device cuda]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
import time

from .testing.children import start_child, stop_child
from .testing.openai_client import OpenAIClient
from .worker_cli import model_folder

PROMPTS = [
    "Hi",
    "The KV cache moves, not the prompt.",  # about two blocks
    "Prefill computes the prompt's keys and values once; decode pulls them with one-sided reads "
    "and keeps generating, token after token, while the prefill worker takes the next prompt.",
    "Disaggregated serving splits the two phases of LLM inference: " * 6,
    "A long prompt: " + "lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 12,
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


def run_requests(url: str, prompts: list[str], max_tokens: int, progress: Progress) -> list[dict]:
    results: list[dict] = [{} for _ in prompts]
    counts = [0] * len(prompts)

    def one(i: int) -> None:
        t0 = time.monotonic()
        body = {"prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
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
    ap.add_argument("--model", help="model folder (default: the seeded random Llama)")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--transport", choices=("shm", "tcp"), help="force the KV transport (default: the engine's choice)")
    ap.add_argument("--device", default="cpu", help="torch device of both workers' model and KV pool (e.g. cuda)")
    args = ap.parse_args(argv)
    from .model import load_model, load_tokenizer
    from .model.generate import reference_generate

    folder = str(model_folder(args.model))
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
        print(f"\nsending {len(PROMPTS)} prompts at once (streamed, greedy, {args.max_tokens} tokens each) ...")
        results = run_requests(url, PROMPTS, args.max_tokens, progress)
        progress.done(f"  {sum(1 for r in results if 'ids' in r)}/{len(PROMPTS)} requests done")
        failed = [r["error"] for r in results if "error" in r]
        if failed:
            print("FAILED requests:\n  " + "\n  ".join(failed))
            return 1

        print()
        for i, (p, r) in enumerate(zip(PROMPTS, results)):
            print(f"[{i}] {p[:60]!r}{'...' if len(p) > 60 else ''}\n    -> {r['text'][:70]!r}")
        print(f"\n {'#':>2} {'prompt tok':>10} {'KV bytes':>10} {'transport':>9} {'transfer ms':>11} "
              f"{'GB/s':>7} {'TTFT ms':>8} {'tokens':>6}")
        for i, r in enumerate(results):
            kv = r["kv"]
            gbps = f"{kv['gb_per_s']:.2f}" if kv.get("gb_per_s") else "-"
            print(f" {i:>2} {r['usage']['prompt_tokens']:>10} {kv['bytes']:>10} {kv['transport']:>9} "
                  f"{kv['transfer_s'] * 1e3:>11.2f} {gbps:>7} {r['ttft'] * 1e3:>8.1f} {len(r['ids']):>6}")

        progress.show("  checking against the same model in one process ...")
        model, tok = load_model(folder, device=args.device), load_tokenizer(folder)
        same = 0
        for p, r in zip(PROMPTS, results):
            want = reference_generate(model, tok.encode(p), args.max_tokens)
            same += want == r["ids"]
        progress.done(f"\none-process reference: {same}/{len(PROMPTS)} completions token-for-token identical"
                      + ("" if same == len(PROMPTS) else "  <-- MISMATCH"))
        return 0 if same == len(PROMPTS) else 1
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
