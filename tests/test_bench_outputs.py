"""Benchmarks write their records and plots exactly where told, or refuse the path before
any work (a long run must not end unable to write; `make bench-rdma` checks its JSON= path
with bench/report.py --check-out before the soft-RoCE guest boots)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BW = str(ROOT / "bench" / "transfer_bw.py")
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def test_bad_output_paths_are_refused_up_front(tmp_path):
    for opt, path, why in (("--json", tmp_path / "no" / "bw.json", "does not exist"),
                           ("--json", tmp_path, "is a folder"),
                           ("--plot", tmp_path / "bw.txt", "expected a .png"),
                           ("--plot", tmp_path / "no" / "bw.png", "does not exist")):
        p = run(BW, "--transports", "memcpy", opt, str(path), timeout=30)
        assert p.returncode == 2 and f"{opt}: " in p.stderr and why in p.stderr, (opt, path, p.stderr)
        assert "Benchmark" not in p.stdout  # nothing ran
    p = run(str(ROOT / "bench" / "report.py"), "--check-out", str(tmp_path / "no" / "x.json"), timeout=30)
    assert p.returncode != 0 and "refused" in p.stderr


def test_json_and_plot_land_where_told(tmp_path):
    js, png = tmp_path / "deep" / "bw.json", tmp_path / "deep" / "bw.png"
    js.parent.mkdir()
    p = run(BW, "--transports", "shm,memcpy", "--total", "1M", "--sizes", "64K,256K", "--iters", "2", "--reps", "2",
            "--json", str(js), "--plot", str(png))
    assert p.returncode == 0, p.stdout + p.stderr
    assert {r["system"] for r in json.loads(js.read_text())} == {"shm", "memcpy"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
