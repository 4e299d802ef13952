"""The small benchmark tools that need no GPU: bench/trace_summary.py reads the lines
the C core prints under KVTRANSFER_TRACE=1 (taken here from a real read)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

READ = """
import numpy as np
from kvtransfer import Engine, alloc_host
n = 2000
with Engine() as a, Engine() as b:
    src, dst = alloc_host(n * 64), alloc_host(n * 64)
    _r, desc = a.register(src)
    local, _ = b.register(dst)
    peer = b.connect(a.descriptor, transport="shm")
    lo = np.arange(n, dtype=np.int64) * 64
    peer.read_blocks(local, lo, desc, lo[::-1].copy(), 64).wait(30)
"""


def test_trace_summary_reads_the_c_cores_lines(tmp_path):
    env = dict(os.environ, KVTRANSFER_TRACE="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", READ], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.startswith("kvtransfer trace:")]
    assert len(lines) == 1 and "2000 entries" in lines[0], p.stderr
    log = tmp_path / "trace.txt"
    # the host read above, and a GPU batch as the shm CUDA path reports one
    log.write_text(lines[0] + "\nkvtransfer trace: 16384 entries, 10 jobs: checked +7.7 us, cut +87.5, first pop "
                   "+10.7, first launch +20.1, last launch +229.5, done +328.6 us; gpu 304.5 us\n")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "trace_summary.py"), str(log)], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    host, gpu = out.splitlines()
    assert "2000 entries, 1 batches" in host and "checked" in host and "done" in host and "first launch" not in host and "gpu" not in host
    assert "16384 entries, 1 batches" in gpu and "first launch 20.1" in gpu and "gpu 304.5" in gpu, gpu


def test_engine_kernel_reads_the_kernels_cuda_copy_c_compiles():
    """bench/engine_kernel.py times the kernel the engine launches: the CUDA C it takes
    from csrc/cuda_copy.c is the source NVRTC gets (every kernel the C side looks up)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from engine_kernel import kernel_source
    finally:
        sys.path.remove(str(ROOT / "bench"))
    c = (ROOT / "csrc" / "cuda_copy.c").read_text()
    src = kernel_source(c)
    assert src.startswith("struct kvt_copy") and src.count("__global__") == 3
    for name in ("kvt_gather_device", "kvt_gather_staged", "kvt_gather_cols"):
        assert f'"{name}"' in c and f"{name}(" in src, name
