"""Token choice shared by every place that generates, and the one-process reference.

Sampling is reproducible across processes: the token at step ``i`` of a request (step 0
is the first generated token, which a prefill worker picks) is drawn with a generator
seeded from ``(seed, i)``, so the disaggregated pair — prefill picks step 0, decode the
rest — draws exactly what one process would. Greedy (temperature 0) needs no seed.
"""

from __future__ import annotations

from typing import Collection, Sequence

import torch

from .decoder import Model
from .sampling import sample


def step_generator(seed: int | None, step: int, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The generator of step ``step`` of a request seeded ``seed`` (None: unseeded draws)."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + step) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def pick_token(logits: torch.Tensor, temperature: float, top_p: float, seed: int | None, step: int) -> int:
    """One token id from ``logits`` ``[vocab]`` for step ``step`` of a request."""
    return int(sample(logits, temperature, top_p, step_generator(seed, step, logits.device)))


def reference_generate(model: Model, prompt: Sequence[int], max_tokens: int, *, temperature: float = 0.0,
                       top_p: float = 1.0, seed: int | None = None, stop_ids: Collection[int] = (),
                       block_size: int = 16) -> list[int]:
    """The same model in one process, nothing disaggregated: prefill into a private pool,
    then one decode step per token. Stops after ``max_tokens`` or at a token of
    ``stop_ids`` (which is included, as the workers include it)."""
    layout = model.kv_layout(-(-(len(prompt) + max_tokens) // block_size), block_size)
    pool = torch.zeros(layout.region_nbytes(), dtype=torch.uint8, device=model.device)
    blocks = list(range(layout.num_blocks))
    out = [pick_token(model.prefill(list(prompt), pool, layout, blocks), temperature, top_p, seed, 0)]
    while len(out) < max_tokens and out[-1] not in stop_ids:
        logits = model.decode([out[-1]], [len(prompt) + len(out) - 1], [blocks], pool, layout)[0]
        out.append(pick_token(logits, temperature, top_p, seed, len(out)))
    return out
