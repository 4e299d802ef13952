"""python -m decode_worker --model DIR --prefill tcp://HOST:PORT --host HOST --port PORT  (see --help)"""

from __future__ import annotations

import argparse
import logging
import sys
import threading

from kvtransfer.control import CurveClientKeys
from kvtransfer.worker_cli import fail, model_folder, print_ready, setup_logging, startup_error, wait_for_signal

from .http import make_server
from .openai_api import BadRequest
from .worker import DecodeWorker

NAME = "decode_worker"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="decode_worker", description="An OpenAI-compatible completions server "
                                 "that pulls prompts' KV from prefill workers and decodes with continuous batching.")
    ap.add_argument("--model", help="Hugging Face-style folder (config.json + *.safetensors); default: a small "
                                    "seeded random Llama, generated on first use")
    ap.add_argument("--prefill", action="append", default=[], metavar="ENDPOINT",
                    help="a prefill worker's control endpoint (repeat for several)")
    ap.add_argument("--local-prefill", action="store_true",
                    help="compute prompts here instead (one-process serving, no KV transfer)")
    ap.add_argument("--host", default="127.0.0.1", help="HTTP address [%(default)s]")
    ap.add_argument("--port", type=int, default=8000, help="HTTP port (0: any free port) [%(default)s]")
    ap.add_argument("--served-model-name", help="the model name clients use (default: the folder's name)")
    ap.add_argument("--kv-blocks", type=int, default=2048, help="blocks in the KV pool [%(default)s]")
    ap.add_argument("--block-size", type=int, default=16, help="tokens per block [%(default)s]")
    ap.add_argument("--max-batch", type=int, default=32, help="sequences decoded together [%(default)s]")
    ap.add_argument("--device", default="cpu", help="torch device for the model and pool [%(default)s]")
    ap.add_argument("--transport", choices=("verbs", "shm", "tcp"), help="force the KV transport")
    ap.add_argument("--connect-timeout", type=float, default=60.0, help="seconds to wait for prefill workers")
    ap.add_argument("--prefill-timeout", type=float, default=5.0,
                    help="a prefill worker silent this long is lost: its requests go to another [%(default)s]")
    ap.add_argument("--curve-secret", help="CurveZMQ secret key file of this worker")
    ap.add_argument("--curve-server", help="the prefill workers' CurveZMQ public key file")
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    setup_logging(NAME, args.log_level)
    if bool(args.curve_secret) != bool(args.curve_server):
        fail(NAME, "--curve-secret and --curve-server go together")
    curve = CurveClientKeys(args.curve_secret, args.curve_server) if args.curve_secret else None
    folder = model_folder(args.model)
    try:
        worker = DecodeWorker(folder, prefill=args.prefill, local_prefill=args.local_prefill,
                              kv_blocks=args.kv_blocks, block_size=args.block_size, max_batch=args.max_batch,
                              served_name=args.served_model_name, device=args.device, transport=args.transport,
                              curve=curve, connect_timeout=args.connect_timeout,
                              control_timeout=args.prefill_timeout)
    except BadRequest as e:
        fail(NAME, str(e))
    except Exception as e:
        if (msg := startup_error(e)) is None:
            raise
        fail(NAME, msg)
    try:
        server = make_server(worker, args.host, args.port)
    except OSError as e:
        worker.close()
        fail(NAME, f"cannot listen on {args.host}:{args.port}: {e}")
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    print_ready(url=f"http://{host}:{port}", model=worker.served_name, model_id=worker.model_id)
    sig = wait_for_signal()
    logging.getLogger(NAME).info("signal %d: shutting down", sig)
    server.shutdown()
    server.server_close()
    worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
