"""Attention over a paged KV cache: block tables, slot writes and masked gathers.

A sequence's token at position ``p`` lives in block ``table[p // block_size]`` at row
``p % block_size`` of each layer's K and V (the ``flash`` view of :class:`kvtransfer.kv.KVLayout`:
``[2, num_blocks, block_size, num_kv_heads, head_dim]``, K = 0, V = 1). Blocks of a table
need not be consecutive or ordered. Rows past a sequence's length may hold anything
(NaN included: a pool is often uninitialized memory, or blocks last used by another
request); they are zeroed before they reach a matmul, so they never leak into a result.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import InvalidArgumentError


def check_table(table: Sequence[int], needed: int, num_blocks: int, what: str, op: str) -> None:
    """Refuses a block table that has fewer than ``needed`` blocks, ids outside
    ``[0, num_blocks)`` or the same block twice among its first ``needed``."""
    if len(table) < needed:
        raise InvalidArgumentError(f"{what} has {len(table)} blocks, {needed} are needed", op=op)
    used = table[:needed]
    bad = [b for b in used if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < num_blocks]
    if bad:
        raise InvalidArgumentError(f"{what} holds block ids {bad[:4]} outside the pool's [0, {num_blocks})", op=op)
    if len(set(used)) != len(used):
        raise InvalidArgumentError(f"{what} names a block twice: {list(used)}", op=op)


def slots(table: torch.Tensor, positions: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(block id, row) int64 ``[N]`` of each position ``[N]`` under ``table`` ``[N, max_blocks]``
    (one table row per position)."""
    blocks = torch.gather(table, 1, (positions // block_size)[:, None])[:, 0]
    return blocks, positions % block_size


def write(cache: torch.Tensor, blocks: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """Stores ``values`` ``[N, kv_heads, head_dim]`` at (block, row) of ``cache``
    ``[num_blocks, block_size, kv_heads, head_dim]`` (a view into the pool: writes through)."""
    cache[blocks, rows] = values.to(cache.dtype)


def _repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    # [.., kv_heads, L, D] -> [.., kv_heads * groups, L, D]; query head h uses kv head h // groups.
    if groups == 1:
        return x
    *lead, kv, length, dim = x.shape
    return x[..., :, None, :, :].expand(*lead, kv, groups, length, dim).reshape(*lead, kv * groups, length, dim)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal self-attention of a prompt: q ``[N, heads, D]``, k/v ``[N, kv_heads, D]`` (positions
    0..N-1) -> ``[N, heads * D]``. ``window``: each query sees only the last ``window`` keys."""
    n, heads, dim = q.shape
    groups = heads // k.shape[1]
    qt = q.transpose(0, 1)[None]
    kt = _repeat_heads(k.transpose(0, 1)[None], groups)
    vt = _repeat_heads(v.transpose(0, 1)[None], groups)
    if window is None or window >= n:
        out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=dim ** -0.5)
    else:
        i = torch.arange(n, device=q.device)
        mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
        out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=dim ** -0.5)
    return out[0].transpose(0, 1).reshape(n, heads * dim)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                    positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """One query per sequence against its cached keys: q ``[B, heads, D]``; caches
    ``[num_blocks, block_size, kv_heads, D]``; ``tables`` int64 ``[B, max_blocks]`` (padding
    entries may be any valid block id); sequence ``i`` sees positions ``0..positions[i]``
    (only the last ``window`` of them when a window is set). Returns ``[B, heads * D]`` in
    q's dtype."""
    batch, heads, dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    groups = heads // kv_heads
    length = tables.shape[1] * block_size
    # [B, max_blocks, block_size, kv, D] -> [B, kv, L, D]
    k = k_cache[tables].reshape(batch, length, kv_heads, dim).transpose(1, 2)
    v = v_cache[tables].reshape(batch, length, kv_heads, dim).transpose(1, 2)
    at = torch.arange(length, device=q.device)
    valid = at[None, :] <= positions[:, None]
    if window is not None:
        valid &= at[None, :] > positions[:, None] - window
    keep = valid[:, None, :, None]
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    k = torch.where(keep, k.to(q.dtype), zero)
    v = torch.where(keep, v.to(q.dtype), zero)
    # Query heads grouped under their kv head: no copy of K/V per query head.
    qg = q.reshape(batch, kv_heads, groups, dim)
    scores = torch.matmul(qg, k.transpose(2, 3)) * dim ** -0.5          # [B, kv, groups, L]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v)                                         # [B, kv, groups, D]
    return out.reshape(batch, heads * dim)
