"""Other libraries in bench/transfer_bw.py's run: the parent's side of bench/peer_*.py.

``--peers nixl,mooncake`` adds the systems of :data:`PEER_SYSTEMS`. Each runs as a reader
process in the peers' environment (``.venv-peers``, made by ``make bench-peers``) that
starts its own target and answers the commands of bench/peer_common.py. A peer that
cannot start (environment missing, import or initialization failed) is reported as a row
that says why, not as a failed run.
"""

from __future__ import annotations

import json
import queue
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

from peer_common import perm_digest

BENCH = Path(__file__).resolve().parent
PEERS_PYTHON = BENCH.parent / ".venv-peers" / "bin" / "python"
# system -> (driver file, its arguments); nixl-cuda is the GPU script's (scripts/gpu_nixl.sh)
PEER_SYSTEMS = {
    "nixl-sm": ("peer_nixl.py", ["--backend", "sm"]),
    "nixl-tcp": ("peer_nixl.py", ["--backend", "tcp"]),
    "mooncake-tcp": ("peer_mooncake.py", []),
    "nixl-cuda": ("peer_nixl.py", ["--backend", "cuda"]),
}
PEERS = {"nixl": ("nixl-sm", "nixl-tcp"), "mooncake": ("mooncake-tcp",)}
# (ours, theirs): the pairs whose ratio is computed within each repetition
PEER_RATIOS = (("shm", "nixl-sm"), ("tcp", "nixl-tcp"), ("tcp", "mooncake-tcp"), ("shm", "nixl-cuda"))
STARTUP_TIMEOUT_S = 120.0  # the reader starts its target and both import their library
COMMAND_TIMEOUT_S = 300.0  # one command: a verifying pass, or all the passes of one repetition


class PeerUnavailable(Exception):
    """The peer could not start; the message says why (it becomes the system's row)."""


class PeerError(Exception):
    """A started peer failed a command (a wrong byte, a failed transfer, a timeout)."""


def expand(names: list[str]) -> list[str]:
    """``["nixl", "mooncake"]`` -> their systems; a system name stands for itself."""
    out: list[str] = []
    for n in names:
        if n in PEERS:
            out += PEERS[n]
        elif n in PEER_SYSTEMS:
            out.append(n)
        else:
            raise ValueError(f"unknown peer {n!r}; choose from {', '.join([*PEERS, *PEER_SYSTEMS])}")
    return list(dict.fromkeys(out))


class PeerRunner:
    """One peer system's reader process, driven over its stdin/stdout."""

    def __init__(self, system: str, total: int, seed: int, python: Path = PEERS_PYTHON):
        if not Path(python).exists():
            raise PeerUnavailable(f"no peers' environment ({python}); run `make bench-peers`")
        script, extra = PEER_SYSTEMS[system]
        self.system = system
        self.log = tempfile.TemporaryFile("w+")  # the libraries' chatter; its last line says why on a failure
        self.proc = subprocess.Popen([str(python), str(BENCH / script), *extra, "--bytes", str(total),
                                      "--seed", str(seed)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)
        self.lines: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        hello = self._answer(STARTUP_TIMEOUT_S, "start")
        if "error" in hello:
            self.close()
            raise PeerUnavailable(hello["error"])
        self.config: dict = hello["config"]
        self.pass_ns: list[int] = []

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def _answer(self, timeout: float, what: str) -> dict:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            self.close()
            raise PeerError(f"{self.system}: no answer to {what!r} in {timeout} s") from None
        if not line:
            code = self.proc.wait(timeout=10)
            self.log.seek(0)
            last = (self.log.read().strip().splitlines() or ["no output"])[-1]
            raise (PeerUnavailable if what == "start" else PeerError)(
                f"{self.system}: reader exited (status {code}) during {what!r}: {last}")
        return json.loads(line)

    def command(self, line: str) -> dict:
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except OSError as e:
            raise PeerError(f"{self.system}: reader gone ({e})") from None
        got = self._answer(COMMAND_TIMEOUT_S, line.split()[0])
        if "error" in got:
            raise PeerError(f"{self.system}: {got['error']}")
        return got

    # transfer_bw's Runner, for a peer: it checks its own bytes and times its own passes
    def prepare_verified(self, perm: np.ndarray, block_bytes: int) -> None:
        got = self.command(f"prepare {block_bytes}")["perm_sha"]
        if got != perm_digest(perm):
            raise PeerError(f"{self.system}: read another permutation than ours ({got})")

    def passes(self, n: int) -> list[int]:
        return [int(x) for x in self.command(f"passes {n}")["pass_ns"]]

    def prepare_ranges(self, path: Path) -> None:
        self.command(f"ranges {path}")

    def layer_times(self, n: int) -> list[list[int]]:
        return self.command(f"layers {n}")["layer_ns"]

    def close(self) -> None:
        self.log.close()
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=10)
