"""Continuous batching: one thread steps every running sequence by one token at a time.

A sequence joins after its prompt's KV is in the decode worker's pool (pulled from a
prefill worker, or computed here) with its first token; each step feeds every running
sequence's last token through :meth:`Model.decode` at once, picks the next tokens, and
hands them to the sequences' event queues. New sequences join the next step; finished
or cancelled ones leave it and their blocks go back to the pool at once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from kvtransfer.kv import BlockPool, KVLayout
from kvtransfer.model import Model
from kvtransfer.model.generate import pick_token

log = logging.getLogger("decode_worker")


class EventSink(Protocol):
    """Where a sequence's events go (a queue.Queue, or the HTTP server's loop)."""

    def put(self, event: tuple) -> None: ...


@dataclass
class Sequence:
    """One request being generated. ``events`` receives ``("token", id, t)``, then one
    ``("done", finish_reason, t)`` or ``("error", message, t)``; ``t`` is time.monotonic()."""
    request_id: str
    prompt_len: int
    blocks: list[int]          # prompt and room for max_tokens, in token order
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop_ids: frozenset[int]
    tokens: list[int] = field(default_factory=list)
    events: EventSink = field(default_factory=queue.Queue)
    cancelled: bool = False

    def cancel(self) -> None:
        """Stops generating (the client went away or a stop string matched); the
        scheduler frees the blocks at its next step."""
        self.cancelled = True

    def _finish_reason(self) -> str | None:
        if self.tokens and self.tokens[-1] in self.stop_ids:
            return "stop"
        if len(self.tokens) >= self.max_tokens:
            return "length"
        return None


class Scheduler:
    def __init__(self, model: Model, kv: torch.Tensor, layout: KVLayout, pool: BlockPool, max_batch: int = 32,
                 model_lock: threading.Lock | None = None, on_free: Callable[[], None] = lambda: None):
        """``model_lock``: held around each step (shared with whoever else runs the
        model); ``on_free``: called after a sequence's blocks went back to the pool."""
        self.model, self.kv, self.layout, self.pool = model, kv, layout, pool
        self.max_batch = max_batch
        self._model_lock = model_lock or threading.Lock()
        self._on_free = on_free
        self._new: "queue.Queue[Sequence | None]" = queue.Queue()
        self._running: list[Sequence] = []
        self._waiting: list[Sequence] = []
        self._stop = False
        self.steps = 0
        self._thread = threading.Thread(target=self._run, name="decode-scheduler", daemon=True)
        self._thread.start()

    @property
    def running(self) -> int:
        return len(self._running)

    def add(self, seq: Sequence, first_token: int) -> None:
        """Starts generating after ``first_token`` (step 0, from the prefill)."""
        now = time.monotonic()
        seq.tokens.append(first_token)
        seq.events.put(("token", first_token, now))
        reason = seq._finish_reason()
        if reason is not None:
            self._end(seq, ("done", reason, now))
            return
        self._new.put(seq)

    def close(self) -> None:
        self._stop = True
        self._new.put(None)
        self._thread.join(30)
        for seq in self._running + self._waiting:
            self._end(seq, ("error", "the decode worker is shutting down", time.monotonic()))
        self._running, self._waiting = [], []

    def _end(self, seq: Sequence, event: tuple) -> None:
        self.pool.free(seq.blocks)
        seq.blocks = []
        seq.events.put(event)
        self._on_free()

    def _admit(self) -> None:
        block = not self._running and not self._waiting
        try:
            while True:
                seq = self._new.get(timeout=0.5) if block else self._new.get_nowait()
                block = False
                if seq is not None:
                    self._waiting.append(seq)
        except queue.Empty:
            pass
        room = self.max_batch - len(self._running)
        self._running += self._waiting[:room]
        self._waiting = self._waiting[room:]

    def _run(self) -> None:
        while not self._stop:
            self._admit()
            for seq in [s for s in self._running if s.cancelled]:
                self._running.remove(seq)
                self._end(seq, ("done", "cancelled", time.monotonic()))
            if not self._running:
                continue
            batch = list(self._running)
            try:
                with self._model_lock:
                    logits = self.model.decode([s.tokens[-1] for s in batch],
                                               [s.prompt_len + len(s.tokens) - 1 for s in batch],
                                               [s.blocks for s in batch], self.kv, self.layout)
            except Exception as e:  # fail this batch's requests, keep serving the next ones
                log.exception("decode step of %d sequences failed", len(batch))
                for seq in batch:
                    self._running.remove(seq)
                    self._end(seq, ("error", f"decode failed: {e}", time.monotonic()))
                continue
            self.steps += 1
            now = time.monotonic()
            for i, seq in enumerate(batch):
                tok = pick_token(logits[i], seq.temperature, seq.top_p, seq.seed, len(seq.tokens))
                seq.tokens.append(tok)
                seq.events.put(("token", tok, now))
                reason = seq._finish_reason()
                if reason is not None:
                    self._running.remove(seq)
                    self._end(seq, ("done", reason, now))
