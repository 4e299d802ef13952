"""bench/transfer_bw.py --serve / --connect across two network namespaces joined by a veth
pair (made here, removed after): the path two real hosts take, bytes verified by the reader."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kvtransfer.testing.children import stop_child

ROOT = Path(__file__).resolve().parent.parent
BW = str(ROOT / "bench" / "transfer_bw.py")
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


@pytest.fixture
def two_hosts():
    """(server namespace, reader namespace, server address); skipped only where the kernel
    refuses namespaces (EPERM: an unprivileged container)."""
    tag = f"kvt16{os.getpid() % 100000}"
    a, b = f"{tag}a", f"{tag}b"
    p = ip("netns", "add", a, check=False)
    if p.returncode != 0:
        if "Operation not permitted" in p.stderr:
            pytest.skip(f"the kernel refuses network namespaces here (EPERM): {p.stderr.strip()}")
        raise AssertionError(f"ip netns add: {p.stderr}")
    try:
        ip("netns", "add", b)
        ip("link", "add", f"{tag}x", "netns", a, "type", "veth", "peer", "name", f"{tag}y", "netns", b)
        for ns, dev, addr in ((a, f"{tag}x", "10.216.0.1/24"), (b, f"{tag}y", "10.216.0.2/24")):
            ip("-n", ns, "addr", "add", addr, "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield a, b, "10.216.0.1"
    finally:
        for ns in (a, b):  # the veth pair goes with its namespaces
            ip("netns", "del", ns, check=False)


def test_serve_and_connect_across_two_namespaces(two_hosts, tmp_path):
    a, b, addr = two_hosts
    port = 20000 + os.getpid() % 20000
    server = subprocess.Popen(["ip", "netns", "exec", a, sys.executable, BW, "--serve", "--listen-host", addr,
                               "--port", str(port), "--total", "4M", "--seed", "5", "--serve-seconds", "90"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        # the server says where it is once it listens; its stderr is read only once it is stopped
        ready, _, _ = select.select([server.stdout], [], [], 60)
        first = server.stdout.readline() if ready else ""
        if not first.startswith("transfer_bw: serving 4194304 bytes (seed 5)"):
            stop_child(server, 20, sig=signal.SIGTERM)
            pytest.fail(f"no serving line within 60 s: {first!r}; stderr: {server.stderr.read()}")
        out = tmp_path / "two_hosts.json"
        reader = subprocess.run(["ip", "netns", "exec", b, sys.executable, BW, "--connect", f"{addr}:{port}",
                                 "--sizes", "16K,1M", "--iters", "2", "--warmup", "0", "--json", str(out)],
                                capture_output=True, text=True, timeout=120, env=ENV)
        assert reader.returncode == 0, reader.stdout + reader.stderr  # 1: a byte differed
        assert "Verified         : yes" in reader.stdout and f"{addr}:{port}" in reader.stdout
        recs = json.loads(out.read_text())
        assert [(r["system"], r["block_bytes"]) for r in recs] == [("tcp", 16384), ("tcp", 1 << 20)]
        # shm cannot cross hosts: refused before anything runs
        shm = subprocess.run(["ip", "netns", "exec", b, sys.executable, BW, "--connect", f"{addr}:{port}",
                              "--transports", "shm"], capture_output=True, text=True, timeout=60, env=ENV)
        assert shm.returncode == 2 and "shm reads another process's memory on the same host" in shm.stderr
    finally:
        stop_child(server, 20, sig=signal.SIGTERM)
