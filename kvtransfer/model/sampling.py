"""Choosing the next token from logits: greedy, or temperature + nucleus (top-p) sampling."""

from __future__ import annotations

import math

import torch

from ..errors import InvalidArgumentError


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids from ``logits`` ``[vocab]`` or ``[B, vocab]`` -> int64 ``[]`` or ``[B]``.

    ``temperature == 0``: greedy (argmax; the lowest id wins a tie, as in Transformers).
    Otherwise softmax(logits / temperature), cut to the smallest set of most likely tokens
    whose probability reaches ``top_p`` (the most likely token is always kept), drawn with
    ``generator`` — pass a seeded ``torch.Generator`` (on the logits' device) for
    reproducible draws; None uses torch's global generator.
    """
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise InvalidArgumentError(f"temperature must be a finite number >= 0, got {temperature!r}", op="sample")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise InvalidArgumentError(f"top_p must be in (0, 1], got {top_p!r}", op="sample")
    if logits.dim() not in (1, 2):
        raise InvalidArgumentError(f"logits must be [vocab] or [B, vocab], got shape {list(logits.shape)}",
                                   op="sample")
    if temperature == 0:
        return logits.argmax(dim=-1)
    rows = logits.float().reshape(-1, logits.shape[-1])
    probs = torch.softmax(rows / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens before it already reach top_p.
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    ids = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return ids.reshape(logits.shape[:-1])
