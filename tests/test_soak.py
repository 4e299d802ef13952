"""The soak: engine reads, control pulls (through the decode worker's HTTP API, over
tcp) and HTTP load at once, with hostile tcp clients mixed in (idle holders, slow
readers, garbage frames, trickled hellos) against the read target and the prefill
worker's tcp server. RSS, descriptors and threads of every process are sampled; at the
end they must be back near where they started, and every byte read and every token
generated must have been right.

One minute in ``make test``; ``make soak`` runs it for ``SOAK_SECONDS`` (default 600)
and prints the samples' summary. Real processes throughout: a ``kvtransfer.testing.target``, a
prefill and a decode worker on a small random Llama.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from kvtransfer import Engine
from soak_support import Load, Sampler, hostile, reads
from support import TargetLauncher
from worker_support import Fleet, PrefillProbe, model_folder, prompt_ids, reference

SOAK_S = float(os.environ.get("KVT_SOAK_SECONDS", "60"))
MAX_NEW = 8
#: after the loads stop, how much more than before they started each process may hold
FDS_SLACK, THREADS_SLACK, RSS_SLACK_KIB = 16, 8, 96 << 10


def table(before: dict, after: dict, sampler: Sampler) -> str:
    lines = [f"{'process':<8} {'RSS MiB before':>15} {'after':>8} {'peak':>8} {'fds before':>11} {'after':>6} "
             f"{'peak':>5} {'threads before':>15} {'after':>6} {'peak':>5}"]
    for n in before:
        b, a = before[n], after[n]
        lines.append(f"{n:<8} {b['rss_kib'] / 1024:>15.1f} {a['rss_kib'] / 1024:>8.1f} "
                     f"{sampler.peak(n, 'rss_kib') / 1024:>8.1f} {b['fds']:>11} {a['fds']:>6} "
                     f"{sampler.peak(n, 'fds'):>5} {b['threads']:>15} {a['threads']:>6} "
                     f"{sampler.peak(n, 'threads'):>5}")
    return "\n".join(lines)


@pytest.mark.timeout(SOAK_S + 600)
def test_soak(tmp_path):
    folder = model_folder("llama")
    prompts = [prompt_ids(n, seed=500 + n) for n in (5, 17, 40)]
    wants = [reference(folder, p, MAX_NEW) for p in prompts]  # before the soak: it is CPU-heavy
    fleet, launcher = Fleet(tmp_path), TargetLauncher()
    try:
        target = launcher.start(32 << 20, 21, "--io-timeout", "2", "--idle-timeout", "3")
        prefill = fleet.prefill(folder, kv_blocks=256)
        decode = fleet.decode(folder, [prefill], transport="tcp", kv_blocks=256)
        with PrefillProbe(prefill, folder) as probe, Engine(io_timeout=30) as eng:
            prefill_engine = probe.client.peer.descriptor
            peer = eng.connect(target.engine, transport="tcp")
            http = decode.http

            def completion(load: Load) -> None:
                i = load.ok % len(prompts)
                body = http.complete(prompt=prompts[i], max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
                got = body["choices"][0]["token_ids"]
                if got != wants[i] or body["kv_transfer"]["transport"] != "tcp":
                    raise AssertionError(f"prompt {i}: tokens {got} != {wants[i]} ({body['kv_transfer']})")
                load.ok += 1

            read_step = reads(eng, peer, target.region, target.expected, seed=3)
            # warm-up: every path once, so that "before" counts what a steady state holds
            for step in (read_step, completion):
                step(Load("warm-up"))
            sampler = Sampler({"test": os.getpid(), "target": target.pid, "prefill": prefill.pid,
                               "decode": decode.pid})
            before = sampler.sample_now()
            sampler.start()
            loads = [Load("reads").start(read_step), Load("http").start(completion),
                     Load("hostile").start(hostile("127.0.0.1", [target.engine.tcp_port, prefill_engine.tcp_port],
                                                   [target.engine.engine_id, prefill_engine.engine_id],
                                                   (target.region.region_id, target.region.key), hold_s=4.0))]
            end = time.monotonic() + SOAK_S
            while time.monotonic() < end and all(ld.error is None for ld in loads):
                time.sleep(0.5)
            for ld in loads:
                ld.finish(timeout=90)
            time.sleep(3.5)  # the target's idle and io timeouts end what hostile clients left
            after = sampler.sample_now()
            sampler.stop.set()
            sampler.join(timeout=5)
            target.proc.stdin.write("stats\n")
            target.proc.stdin.flush()
            tstats = json.loads(target.readline())
            summary = (f"soak {SOAK_S:.0f} s: {loads[0].ok} read batches ({loads[0].bytes / 2**30:.2f} GiB, bytes "
                       f"checked), {loads[1].ok} completions (tokens checked), {loads[2].ok} hostile rounds; "
                       f"target tcp server {tstats}\n" + table(before, after, sampler))
            print(summary)
            for ld in loads:
                assert ld.error is None, f"{ld.name}: {ld.error}\n{summary}"
                assert ld.ok > 0, f"{ld.name} did nothing\n{summary}"
            for name in before:
                b, a = before[name], after[name]
                assert a["fds"] <= b["fds"] + FDS_SLACK, f"{name}: descriptors grew\n{summary}"
                assert a["threads"] <= b["threads"] + THREADS_SLACK, f"{name}: threads grew\n{summary}"
                assert a["rss_kib"] <= b["rss_kib"] + RSS_SLACK_KIB, f"{name}: RSS grew\n{summary}"
            assert tstats["connections"] <= 4 + 1, summary  # the engine's own, and a straggler at most
            assert tstats["dropped_idle"] + tstats["dropped_deadline"] > 0, summary
            assert decode.alive() and prefill.alive(), summary
    finally:
        problems = fleet.close()
        launcher.close()
    assert not problems, problems
