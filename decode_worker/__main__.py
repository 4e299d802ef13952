"""python -m decode_worker --model DIR --prefill tcp://HOST:PORT --host HOST --port PORT  (see --help)"""

from __future__ import annotations

import argparse
import sys

from kvtransfer.control import CurveClientKeys
from kvtransfer.worker_cli import (add_common_args, fail, model_folder, print_ready, require_together,
                                   setup_logging, start_or_fail, wait_for_signal)

from .http import make_app
from .server import Server, ServerLimits
from .worker import DecodeWorker

NAME = "decode_worker"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="decode_worker", description="An OpenAI-compatible completions server "
                                 "that pulls prompts' KV from prefill workers and decodes with continuous batching.")
    add_common_args(ap, kv_blocks=2048)
    ap.add_argument("--prefill", action="append", default=[], metavar="ENDPOINT",
                    help="a prefill worker's control endpoint (repeat for several)")
    ap.add_argument("--local-prefill", action="store_true",
                    help="compute prompts here instead (one-process serving, no KV transfer)")
    ap.add_argument("--host", default="127.0.0.1", help="HTTP address [%(default)s]")
    ap.add_argument("--port", type=int, default=8000, help="HTTP port (0: any free port) [%(default)s]")
    ap.add_argument("--served-model-name", help="the model name clients use (default: the folder's name)")
    ap.add_argument("--max-batch", type=int, default=32, help="sequences decoded together [%(default)s]")
    ap.add_argument("--transport", choices=("verbs", "shm", "tcp"), help="force the KV transport")
    ap.add_argument("--connect-timeout", type=float, default=60.0, help="seconds to wait for prefill workers")
    ap.add_argument("--prefill-timeout", type=float, default=5.0,
                    help="a prefill worker silent this long is lost: its requests go to another [%(default)s]")
    ap.add_argument("--max-connections", type=int, default=ServerLimits.max_connections,
                    help="open HTTP connections; requests beyond get 503 [%(default)s]")
    ap.add_argument("--header-timeout", type=float, default=ServerLimits.header_timeout,
                    help="seconds a client has to send a request's headers [%(default)s]")
    ap.add_argument("--body-timeout", type=float, default=ServerLimits.body_timeout,
                    help="seconds a client has to send a request's body after its headers [%(default)s]")
    ap.add_argument("--keep-alive", type=float, default=ServerLimits.keep_alive,
                    help="seconds an idle connection stays open between requests [%(default)s]")
    ap.add_argument("--curve-secret", help="CurveZMQ secret key file of this worker")
    ap.add_argument("--curve-server", help="the prefill workers' CurveZMQ public key file")
    args = ap.parse_args(argv)
    setup_logging(NAME, args.log_level)
    require_together(NAME, args, "--curve-secret", "--curve-server")
    curve = CurveClientKeys(args.curve_secret, args.curve_server) if args.curve_secret else None
    worker = start_or_fail(NAME, lambda: DecodeWorker(
        model_folder(args.model), prefill=args.prefill, local_prefill=args.local_prefill, kv_blocks=args.kv_blocks,
        block_size=args.block_size, max_batch=args.max_batch, served_name=args.served_model_name,
        device=args.device, transport=args.transport, curve=curve, connect_timeout=args.connect_timeout,
        control_timeout=args.prefill_timeout))
    limits = ServerLimits(header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                          keep_alive=args.keep_alive, max_connections=args.max_connections)
    try:
        server = Server(make_app(worker), args.host, args.port, limits)
    except OSError as e:
        worker.close()
        fail(NAME, f"cannot listen on {args.host}:{args.port}: {e}")
    host, port = server.address
    print_ready(url=f"http://{host}:{port}", model=worker.served_name, model_id=worker.model_id)
    wait_for_signal(NAME)
    server.close()
    worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
