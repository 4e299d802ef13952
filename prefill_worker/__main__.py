"""python -m prefill_worker --model DIR --control tcp://HOST:PORT  (see --help)"""

from __future__ import annotations

import argparse
import sys

from kvtransfer.control import CurveServerKeys, Limits
from kvtransfer.worker_cli import (add_common_args, model_folder, print_ready, require_together, setup_logging,
                                   start_or_fail, wait_for_signal)

from .worker import PrefillWorker

NAME = "prefill_worker"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="prefill_worker", description="Serves prefill requests over the kvtransfer "
                                 "control plane: computes prompts' KV into a registered pool, layer by layer.")
    add_common_args(ap, kv_blocks=1024)
    ap.add_argument("--control", default="tcp://127.0.0.1:5557",
                    help="control plane endpoint to bind (port 0: any free port) [%(default)s]")
    ap.add_argument("--listen-host", default="127.0.0.1", help="the transfer engine's tcp address [%(default)s]")
    ap.add_argument("--lease", type=float, default=10.0, help="seconds blocks stay pinned without renewal")
    ap.add_argument("--name", default="prefill", help="this worker's name in logs and results")
    ap.add_argument("--curve-secret", help="CurveZMQ secret key file (enables authentication and encryption)")
    ap.add_argument("--curve-clients", help="folder of the decode workers' public keys")
    ap.add_argument("--session-blocks", type=int, help="pinned blocks one decode session may hold [the whole pool]")
    ap.add_argument("--max-lease", type=float, default=600.0,
                    help="seconds a request's blocks stay pinned at most, renewed or not [%(default)s]")
    args = ap.parse_args(argv)
    setup_logging(NAME, args.log_level)
    require_together(NAME, args, "--curve-secret", "--curve-clients")
    curve = CurveServerKeys(args.curve_secret, args.curve_clients) if args.curve_secret else None
    worker = start_or_fail(NAME, lambda: PrefillWorker(
        model_folder(args.model), args.control, kv_blocks=args.kv_blocks, block_size=args.block_size,
        lease_s=args.lease, listen_host=args.listen_host, device=args.device, curve=curve, name=args.name,
        limits=Limits(session_blocks=args.session_blocks, max_lease_s=args.max_lease)))
    with worker:
        print_ready(control=worker.endpoint, model=worker.model_name, model_id=worker.model_id)
        wait_for_signal(NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
