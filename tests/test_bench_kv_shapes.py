"""bench/transfer_bw.py --model-shape: a request's paged KV built through kvtransfer.kv,
moved layer by layer between two processes, bytes checked before timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import kv_shapes  # noqa: E402


def test_fragmented_tables_and_plans_cover_the_request():
    for shape in kv_shapes.MODEL_SHAPES:
        w = kv_shapes.build(shape, 1000, seed=3)
        layers = kv_shapes.MODEL_SHAPES[shape][1]
        assert len(w.plans) == layers
        blocks = -(-1000 // 16)
        assert w.kv_bytes == layers * blocks * w.layout.block_bytes  # block_bytes: K and V (or the latent)
        ends = [int((p["dst_off"] + p["len"]).max()) for p in w.plans]
        assert max(ends) <= w.nbytes
    t = kv_shapes.fragmented_table(np.random.default_rng(0), 100, 140)
    assert len(set(t.tolist())) == 100 and t.max() < 140
    assert np.count_nonzero(np.diff(t) != 1) > 10  # fragmented: many runs


def test_kv_request_over_shm_and_tcp(tmp_path):
    out = tmp_path / "kv.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "transfer_bw.py"), "--model-shape", "llama3-70b-tp8",
                        "--prompt-tokens", "100", "--transports", "shm,tcp", "--iters", "2", "--reps", "2",
                        "--warmup", "0", "--json", str(out)], capture_output=True, text=True, timeout=180,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 0, p.stdout + p.stderr  # 1: a byte differed
    recs = json.loads(out.read_text())
    assert [r["system"] for r in recs] == ["shm", "tcp"]
    for r in recs:
        assert r["layers"] == 80 and len(r["per_layer_us"]) == 80 and r["requests"] == 4
        assert 0 < r["first_layer_us"] <= r["total_us"]
