"""The decode worker: a model, its own registered KV pool, the prefill workers, and the
continuous-batching scheduler. :meth:`DecodeWorker.start` takes a validated completion
request to the point where tokens flow: blocks allocated, the prompt's KV pulled from a
prefill worker (or, with ``local_prefill``, computed here: one-process serving, the
reference the disaggregated pair is compared with), the first token in hand, the
sequence in the running batch.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from prometheus_client import Counter, Gauge, Histogram

from kvtransfer import Engine
from kvtransfer.engine_metrics import watch_engine
from kvtransfer.control import ControlClient, CurveClientKeys, new_request_id
from kvtransfer.errors import InvalidArgumentError, PoolExhaustedError
from kvtransfer.kv import BlockPool, CompatInfo
from kvtransfer.model import load_model, load_tokenizer
from kvtransfer.model.chat import ChatTemplate
from kvtransfer.model.generate import pick_token
from kvtransfer.model.identity import model_identity
from kvtransfer.workers_protocol import PrefillPayload

from .openai_api import BadRequest, CompletionRequest
from .router import PrefillRouter, PullNotStopped
from .scheduler import EventSink, Scheduler, Sequence

log = logging.getLogger("decode_worker")

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
REQUESTS = Counter("kvtransfer_completions", "Completion requests by HTTP status", ["status"])
TTFT = Histogram("kvtransfer_ttft_seconds", "Request arrival to the first token", buckets=_BUCKETS)
ITL = Histogram("kvtransfer_inter_token_seconds", "Between consecutive tokens of a request", buckets=_BUCKETS)
RUNNING = Gauge("kvtransfer_running_sequences", "Sequences in the decode batch")


def _chat_template(folder: str | Path) -> ChatTemplate | InvalidArgumentError:
    """The folder's chat template, or the error that says why it has none (a chat
    request is then refused with it)."""
    try:
        return ChatTemplate.from_folder(folder)
    except InvalidArgumentError as e:
        return e


@dataclass
class Generation:
    request_id: str
    seq: Sequence
    prompt_tokens: int
    kv: dict          # the response's kv_transfer field
    arrived: float    # time.monotonic()


class DecodeWorker:
    def __init__(self, model_dir: str | Path, *, prefill: list[str], local_prefill: bool = False,
                 kv_blocks: int = 2048, block_size: int = 16, max_batch: int = 32, served_name: str | None = None,
                 device: str = "cpu", transport: str | None = None, curve: CurveClientKeys | None = None,
                 connect_timeout: float = 60.0, pull_timeout: float = 60.0, control_timeout: float = 5.0):
        if bool(prefill) == local_prefill:
            raise InvalidArgumentError("give --prefill endpoints or --local-prefill, not both and not neither",
                                       op="decode_worker")
        self.model = load_model(model_dir, device=device)
        self.tokenizer = load_tokenizer(model_dir)
        self.chat_template = _chat_template(model_dir)
        self.model_id = model_identity(model_dir)
        self.served_name = served_name or Path(model_dir).name
        self.max_context = self.model.config.max_position_embeddings
        self.vocab_size = self.model.config.vocab_size
        self.layout = self.model.kv_layout(kv_blocks, block_size)
        self.kv = torch.zeros(self.layout.region_nbytes(), dtype=torch.uint8, device=self.model.device)
        self.pool = BlockPool(kv_blocks)
        self.pull_timeout = pull_timeout
        self._model_lock = threading.Lock()  # local prefill and decode steps take turns on the model
        self._freed = threading.Condition()
        self.engine = Engine()
        watch_engine(self.engine)
        self.router: PrefillRouter | None = None
        try:
            self.region, _ = self.engine.register(self.kv)
            if prefill:
                compat = CompatInfo.of(self.layout, self.model_id)

                def connect(endpoint: str) -> ControlClient:
                    return ControlClient(endpoint, engine=self.engine, regions=[self.region], layout=self.layout,
                                         compat=compat, timeout=control_timeout, transport=transport, curve=curve,
                                         name="decode")

                self.router = PrefillRouter(prefill, connect, connect_timeout)
            self.scheduler = Scheduler(self.model, self.kv, self.layout, self.pool, max_batch, self._model_lock,
                                       on_free=self._blocks_freed)
        except BaseException:
            self.close()
            raise
        log.info("decode: model %s as %r, pool %d blocks x %d tokens, %s", self.model_id, self.served_name,
                 kv_blocks, block_size,
                 "local prefill" if local_prefill else f"prefill workers {self.router.sessions()}")

    def new_request_id(self) -> str:
        return new_request_id("cmpl")

    def start(self, req: CompletionRequest, request_id: str, events: EventSink | None = None) -> Generation:
        """Prompt KV in place and first token known; the sequence runs from here. Its
        events go to ``events`` (default: a new queue.Queue), from the scheduler's thread."""
        arrived = time.monotonic()
        blocks = self._alloc(self.layout.blocks_for(len(req.prompt_ids) + req.max_tokens), request_id)
        try:
            if self.router is None:
                first, kv = self._prefill_here(req, blocks)
            else:
                first, kv = self._prefill_remote(req, request_id, blocks)
        except PullNotStopped as e:
            # a read may still write into the blocks: leaking them beats handing them to
            # the next request
            log.error("request %s: leaking %d KV blocks: %s", request_id, len(blocks), e)
            raise
        except BaseException:
            self._free(blocks)
            raise
        stop = frozenset() if req.ignore_eos else self.tokenizer.eos_token_ids
        seq = Sequence(request_id, len(req.prompt_ids), blocks, req.max_tokens, req.temperature, req.top_p,
                       req.seed, stop, events=events if events is not None else queue.Queue())
        kv["ttft_s"] = time.monotonic() - arrived
        TTFT.observe(kv["ttft_s"])
        self.scheduler.add(seq, first)
        RUNNING.set(self.scheduler.running)
        return Generation(request_id, seq, len(req.prompt_ids), kv, arrived)

    def _prefill_here(self, req: CompletionRequest, blocks: list[int]) -> tuple[int, dict]:
        t0 = time.monotonic()
        with self._model_lock:
            logits = self.model.prefill(req.prompt_ids, self.kv, self.layout, blocks)
        first = pick_token(logits, req.temperature, req.top_p, req.seed, 0)
        return first, {"prefill_worker": "local", "transport": "local", "bytes": 0, "transfer_s": 0.0,
                       "gb_per_s": None, "prefill_s": time.monotonic() - t0, "prompt_tokens": len(req.prompt_ids)}

    def _prefill_remote(self, req: CompletionRequest, request_id: str, blocks: list[int]) -> tuple[int, dict]:
        payload = PrefillPayload(prompt=req.prompt_ids, temperature=req.temperature, top_p=req.top_p, seed=req.seed)
        result, pull, endpoint = self.router.pull(request_id, blocks, payload, self.pull_timeout)
        t = pull.timings
        log.info("request %s: %d prompt tokens, %d KV bytes from %s over %s in %.2f ms", request_id,
                 result.prompt_tokens, t.bytes, endpoint, t.transport, t.transfer_s * 1e3)
        return result.first_token, {
            "prefill_worker": endpoint, "transport": t.transport, "bytes": t.bytes, "transfer_s": t.transfer_s,
            "gb_per_s": t.gb_per_s, "prefill_s": result.prefill_s,
            "prompt_tokens": result.prompt_tokens}

    def _alloc(self, n: int, request_id: str, timeout: float = 30.0) -> list[int]:
        """Blocks for the prompt and every token to come; waits (bounded) for running
        requests to finish when the pool is full."""
        if n > self.pool.num_blocks:
            raise BadRequest(f"the request needs {n} KV blocks, the pool has {self.pool.num_blocks}", "max_tokens")
        deadline = time.monotonic() + timeout
        with self._freed:
            while True:
                try:
                    blocks = self.pool.alloc(n)
                    break
                except PoolExhaustedError:
                    if not self._freed.wait(max(0.0, deadline - time.monotonic())):
                        raise BadRequest(f"no room in the KV pool for {n} blocks within {timeout} s; try again later",
                                         status=503, code="overloaded") from None
        return blocks

    def _free(self, blocks: list[int]) -> None:
        self.pool.free(blocks)
        self._blocks_freed()

    def _blocks_freed(self) -> None:
        with self._freed:
            self._freed.notify_all()
        RUNNING.set(self.scheduler.running if hasattr(self, "scheduler") else 0)

    def health(self) -> dict:
        return {"status": "ok", "model": self.served_name, "running": self.scheduler.running,
                "free_blocks": self.pool.num_free,
                "prefill_workers": self.router.sessions() if self.router else "local"}

    def close(self) -> None:
        if getattr(self, "scheduler", None) is not None:
            self.scheduler.close()
        if self.router is not None:
            self.router.close()
        self.engine.close()
