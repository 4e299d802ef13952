"""The prefill worker: a model, a registered KV pool and the control plane's server.

Requests arrive as control-plane Submits (payload: :class:`PrefillPayload`); one compute
thread takes them in order, allocates the prompt's blocks, pins them, runs the prompt
through the model writing K/V straight into those blocks, and announces each layer as
soon as it is written (the decode side reads layer i while layer i+1 is computed). The
first token goes back in Finished. Blocks return to the pool when the decode side
releases them or its lease expires (the control server does that).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path

import msgspec
import torch

from kvtransfer import Engine
from kvtransfer import workers_protocol as protocol
from kvtransfer.engine_metrics import watch_engine
from kvtransfer.control import ControlServer, CurveServerKeys, Limits, PrefillRequest
from kvtransfer.errors import KVTransferError, PoolExhaustedError
from kvtransfer.kv import BlockPool, CompatInfo
from kvtransfer.model import load_model
from kvtransfer.model.generate import pick_token
from kvtransfer.model.identity import model_identity

log = logging.getLogger("prefill_worker")


class _Cancelled(Exception):
    pass


class PrefillWorker:
    """``model_dir``: a Hugging Face-style folder. ``control``: where the control plane
    binds. ``kv_blocks``/``block_size``: the pool (tokens per block). ``listen_host``:
    the transfer engine's tcp address (what decode workers on other hosts reach).
    ``limits``: what one decode session may hold (:class:`kvtransfer.control.Limits`)."""

    def __init__(self, model_dir: str | Path, control: str, *, kv_blocks: int = 1024, block_size: int = 16,
                 lease_s: float = 10.0, listen_host: str = "127.0.0.1", device: str = "cpu",
                 curve: CurveServerKeys | None = None, name: str = "prefill", limits: Limits | None = None):
        self.name = name
        self.model = load_model(model_dir, device=device)
        self.model_id = model_identity(model_dir)
        self.model_name = Path(model_dir).name
        self.layout = self.model.kv_layout(kv_blocks, block_size)
        self.kv = torch.zeros(self.layout.region_nbytes(), dtype=torch.uint8, device=self.model.device)
        self.engine = Engine(listen_host=listen_host)
        watch_engine(self.engine)  # its tcp server's connections and refusals, in Prometheus
        try:
            self.region, _ = self.engine.register(self.kv)
            self.pool = BlockPool(kv_blocks)
            self._work: "queue.Queue[PrefillRequest | None]" = queue.Queue()
            self.server = ControlServer(control, engine=self.engine, regions=[self.region], layout=self.layout,
                                        compat=CompatInfo.of(self.layout, self.model_id), pool=self.pool,
                                        on_submit=self._work.put, lease_s=lease_s, curve=curve, name=name,
                                        limits=limits)
        except BaseException:
            self.engine.close()
            raise
        self._thread = threading.Thread(target=self._compute, name=f"{name}-compute", daemon=True)
        self._thread.start()
        log.info("%s: model %s (%d layers, %d KV heads x %d, %s), pool %d blocks x %d tokens (%.1f MiB), "
                 "control %s", name, self.model_id, self.layout.num_layers, self.layout.num_kv_heads,
                 self.layout.head_dim, self.layout.dtype, kv_blocks, block_size, self.kv.numel() / 2**20,
                 self.server.endpoint)

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def _compute(self) -> None:
        while (req := self._work.get()) is not None:
            try:
                self._prefill(req)
            except _Cancelled:
                req.fail("cancelled: no reader wants it anymore", code="cancelled")
            except msgspec.DecodeError as e:  # malformed or invalid (ValidationError is a DecodeError)
                log.warning("%s: request %r: bad payload: %s", self.name, req.request_id, e)
                req.fail(f"bad prefill payload: {e}", code="bad_request")
            except KVTransferError as e:
                log.warning("%s: request %r failed: %s", self.name, req.request_id, e)
                code = "pool_exhausted" if isinstance(e, PoolExhaustedError) else "prefill_failed"
                req.fail(str(e), code=code)
            except Exception as e:  # a bug must not strand the request's blocks
                log.exception("%s: request %r", self.name, req.request_id)
                req.fail(f"{type(e).__name__}: {e}", code="prefill_failed")

    def _prefill(self, req: PrefillRequest) -> None:
        p = protocol.decode_payload(req.payload)
        blocks = self.pool.alloc(self.layout.blocks_for(len(p.prompt)))
        req.pin(blocks, len(p.prompt))  # the server owns the blocks from here on

        def layer_done(layer: int) -> None:
            if req.cancelled:
                raise _Cancelled()
            req.layer_ready(layer)

        t0 = time.perf_counter()
        logits = self.model.prefill(p.prompt, self.kv, self.layout, blocks, on_layer=layer_done)
        first = pick_token(logits, p.temperature, p.top_p, p.seed, 0)
        took = time.perf_counter() - t0
        req.finish(protocol.encode(protocol.PrefillResult(first_token=first, prompt_tokens=len(p.prompt),
                                                          prefill_s=took, worker=self.name)))
        log.info("%s: request %r: %d tokens prefilled in %.1f ms", self.name, req.request_id, len(p.prompt),
                 took * 1e3)

    def close(self) -> None:
        self._work.put(None)
        self._thread.join(30)
        self.server.close()
        self.engine.close()

    def __enter__(self) -> "PrefillWorker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
