"""NIXL (UCX backend) as a peer of bench/transfer_bw.py: systems nixl-sm, nixl-tcp, nixl-cuda.

    .venv-peers/bin/python bench/peer_nixl.py --backend sm --bytes 256M --seed 0   # the reader

The reader starts its target (``--role target``), loads the target's agent metadata and
answers bench/peer_common.py's commands; each batch is one ``initialize_xfer("READ", ...)``
request, reposted for every pass (``transfer`` then ``check_xfer_state`` until DONE).

Configuration (printed in the hello, so transfer_bw.py's header shows it):

* ``UCX_TLS``: ``sm,self`` (shared memory: cma/posix, whatever UCX finds), ``tcp``, or
  ``cuda_ipc,cuda_copy,sm,self`` for VRAM; ``--ucx-tls`` overrides.
* UCX backend ``ucx_error_handling_mode=none``: with the default (peer) mode UCX refuses
  the shared-memory transports, and the READ goes over tcp.
* Progress threads: the initiator polls itself (no thread; a spinning thread competes for
  the reader's core). The target needs none for shared memory (one-sided copies); over
  tcp, UCX emulates READ with messages the target must progress, so its target runs
  NIXL's progress thread (``--target-thread`` overrides).
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peer_common import Driver, parse_size, protect_stdout, reader_main, seeded_bytes, serve_target, start_target, stop_target  # noqa: E402

UCX_TLS = {"sm": "sm,self", "tcp": "tcp", "cuda": "cuda_ipc,cuda_copy,sm,self"}
TARGET_THREAD = {"sm": False, "tcp": True, "cuda": False}


def backend_params(args: argparse.Namespace) -> dict[str, str]:
    return {"ucx_error_handling_mode": args.error_mode}


def make_agent(name: str, args: argparse.Namespace, prog_thread: bool):
    os.environ["UCX_TLS"] = args.ucx_tls  # read when the UCX context is created, in the agent
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError:  # the GPU machine gets only NIXL's CUDA 13 wheel (scripts/gpu_nixl.sh)
        from nixl_cu13._api import nixl_agent, nixl_agent_config

    agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=prog_thread, backends=[]))
    agent.create_backend("UCX", backend_params(args))
    return agent


def buffer(nbytes: int, args: argparse.Namespace, seed: int | None):
    """(array or tensor, address, mem_type, device id): host memory, or a CUDA tensor for cuda."""
    data = seeded_bytes(nbytes, seed) if seed is not None else np.zeros(nbytes, np.uint8)
    if args.backend != "cuda":
        return data, data.ctypes.data, "DRAM", 0
    import torch

    t = torch.from_numpy(data).to("cuda:0")
    torch.cuda.synchronize()
    return t, t.data_ptr(), "VRAM", 0


def target(args: argparse.Namespace) -> int:
    agent = make_agent("target", args, args.target_thread)
    src, addr, mem, dev = buffer(args.bytes, args, args.seed)
    agent.register_memory([(addr, args.bytes, dev, "")], mem)
    serve_target({"md": base64.b64encode(agent.get_agent_metadata()).decode(), "addr": addr, "pid": os.getpid()})
    return 0


class NixlDriver(Driver):
    def __init__(self, args: argparse.Namespace, cmd: list[str]):
        self.args = args
        self.proc, hello = start_target(cmd)
        self.agent = make_agent("reader", args, False)
        self.remote = self.agent.add_remote_agent(base64.b64decode(hello["md"]))
        self.remote_addr = int(hello["addr"])
        self.buf, self.addr, self.mem, self.dev = buffer(args.bytes, args, None)
        self.reg = self.agent.register_memory([(self.addr, args.bytes, self.dev, "")], self.mem)
        self.dst = self.buf if args.backend != "cuda" else _CudaView(self.buf)
        self.handles: list[int] = []

    def _descs(self, base: int, off: np.ndarray, length: np.ndarray):
        d = np.stack([base + off, length, np.full(len(off), self.dev, np.int64)], axis=1)
        try:
            return self.agent.get_xfer_descs(d, self.mem)  # numpy (N, 3): NIXL >= 0.6
        except Exception:
            return self.agent.get_xfer_descs([tuple(map(int, r)) for r in d], self.mem)

    def batch(self, remote_off, local_off, length):
        h = self.agent.initialize_xfer("READ", self._descs(self.addr, local_off, length),
                                       self._descs(self.remote_addr, remote_off, length), self.remote)
        self.handles.append(h)
        return h

    def start(self, h) -> None:
        if self.agent.transfer(h) == "ERR":
            raise RuntimeError("nixl transfer() posted ERR")

    def wait(self, h, deadline: float) -> None:
        while True:
            state = self.agent.check_xfer_state(h)
            if state == "DONE":
                return
            if state == "ERR":
                raise RuntimeError("nixl transfer state ERR")
            if time.perf_counter() > deadline:
                raise RuntimeError("nixl transfer did not finish in time")

    def release(self, h) -> None:
        self.handles.remove(h)
        self.agent.release_xfer_handle(h)

    def close(self) -> None:
        for h in list(self.handles):
            self.release(h)
        self.agent.remove_remote_agent(self.remote)
        self.agent.deregister_memory(self.reg)
        stop_target(self.proc)


class _CudaView:
    """peer_common checks bytes on numpy arrays: the CUDA destination, seen through copies."""

    def __init__(self, t):
        self.t = t

    def __setitem__(self, key, value) -> None:
        self.t[key] = value
        import torch

        torch.cuda.synchronize()  # before NIXL's copies, on streams of its own

    def __getitem__(self, key):
        return self.t[key].cpu().numpy()

    def __len__(self) -> int:
        return self.t.numel()


def _version(version) -> str:
    for dist in ("nixl", "nixl-cu13", "nixl-cu12"):
        try:
            return f"{dist} {version(dist)}"
        except Exception:
            continue
    return "?"


def reader(args: argparse.Namespace) -> int:
    cmd = [sys.executable, os.path.abspath(__file__), "--role", "target", "--backend", args.backend,
           "--bytes", str(args.bytes), "--seed", str(args.seed), "--ucx-tls", args.ucx_tls,
           "--error-mode", args.error_mode, "--target-thread", str(int(args.target_thread))]

    def make():
        from importlib.metadata import version

        driver = NixlDriver(args, cmd)
        config = {"library": _version(version), "UCX_TLS": args.ucx_tls,
                  **{f"UCX.{k}": v for k, v in backend_params(args).items()},
                  "initiator progress thread": "no (polls check_xfer_state)",
                  "target progress thread": "yes" if args.target_thread else "no",
                  "memory": driver.mem, "request": "initialize_xfer READ per batch, reposted"}
        return driver, config, seeded_bytes(args.bytes, args.seed)

    return reader_main(make, args.bytes, args.seed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role", choices=("reader", "target"), default="reader")
    ap.add_argument("--backend", choices=tuple(UCX_TLS), default="sm")
    ap.add_argument("--bytes", type=parse_size, default=256 << 20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ucx-tls", default=None, help="UCX_TLS (default by backend: " + str(UCX_TLS) + ")")
    ap.add_argument("--error-mode", default="none", help="UCX backend ucx_error_handling_mode (default none)")
    ap.add_argument("--target-thread", type=int, choices=(0, 1), default=None,
                    help="NIXL progress thread in the target (default: only over tcp)")
    args = ap.parse_args(argv)
    protect_stdout()
    args.ucx_tls = args.ucx_tls or UCX_TLS[args.backend]
    args.target_thread = TARGET_THREAD[args.backend] if args.target_thread is None else bool(args.target_thread)
    return target(args) if args.role == "target" else reader(args)


if __name__ == "__main__":
    sys.exit(main())
