"""bench/transfer_bw.py's repetitions and peers (--reps, --peers): real processes, real
transfers, bytes checked by each system's verifying pass. The peers' own environment
(.venv-peers, `make bench-peers`) is not part of `make test`: their test skips without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BW = str(ROOT / "bench" / "transfer_bw.py")
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def bench(tmp_path: Path, *args: str, timeout: float = 240) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = tmp_path / "bw.json"
    p = subprocess.run([sys.executable, BW, "--total", "2M", "--sizes", "64K,1M", "--iters", "2", "--warmup", "0",
                        "--json", str(out), *args], capture_output=True, text=True, timeout=timeout, env=ENV)
    return p, json.loads(out.read_text()) if out.exists() else []


def test_reps_interleave_and_ratios_pair_by_pair(tmp_path):
    p, recs = bench(tmp_path, "--transports", "shm,memcpy", "--reps", "3")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Repetitions: 3, systems interleaved" in p.stdout and "shm/memcpy" in p.stdout
    by = {(r["system"], r["block_bytes"]): r for r in recs}
    for size in (64 << 10, 1 << 20):
        shm, mem = by["shm", size], by["memcpy", size]
        assert shm["reps"] == 3 and len(shm["rep_bw_gbps"]) == 3 and shm["iters"] == 6
        assert shm["bw_min_gbps"] <= shm["bw_median_gbps"] <= shm["bw_max_gbps"]
        ratios = sorted(a / b for a, b in zip(shm["rep_bw_gbps"], mem["rep_bw_gbps"]))
        assert mem["ratios"]["shm/memcpy"]["median"] == pytest.approx(ratios[1])


def test_a_peer_that_cannot_start_is_a_row_that_says_why(tmp_path):
    p, recs = bench(tmp_path, "--transports", "shm", "--peers", "nixl", "--peers-python", str(tmp_path / "none"))
    assert p.returncode == 0, p.stdout + p.stderr
    # in the header and above its table, for each of its two systems
    assert p.stdout.count("NOT RUN: no peers' environment") == 4 and "make bench-peers" in p.stdout
    missing = [r for r in recs if "unavailable" in r]
    assert {r["system"] for r in missing} == {"nixl-sm", "nixl-tcp"} and len(missing) == 4
    assert bench(tmp_path, "--peers", "rdma-magic")[0].returncode == 2  # unknown: refused up front


@pytest.mark.skipif(not PEERS_PYTHON.exists(), reason="no .venv-peers: `make bench-peers` installs NIXL and "
                                                      "Mooncake (not part of make test)")
@pytest.mark.timeout(600)  # six peer processes start, each importing its library (~50 s on an idle machine)
def test_nixl_and_mooncake_read_our_workload(tmp_path):
    p, recs = bench(tmp_path, "--transports", "shm,tcp", "--peers", "nixl,mooncake", "--reps", "2", timeout=400)
    assert p.returncode == 0, p.stdout + p.stderr
    by = {(r["system"], r["block_bytes"]): r for r in recs}
    for system, ours in (("nixl-sm", "shm"), ("nixl-tcp", "tcp"), ("mooncake-tcp", "tcp")):
        for size in (64 << 10, 1 << 20):
            r = by[system, size]
            assert "unavailable" not in r, r
            assert r["reps"] == 2 and f"{ours}/{system}" in r["ratios"]
    assert "UCX_TLS=sm,self" in p.stdout and "MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER" in p.stdout
