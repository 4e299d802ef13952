"""KV-shaped workloads for bench/transfer_bw.py --model-shape: one request's paged KV.

A model shape is a :class:`kvtransfer.kv.KVLayout` as vLLM lays the pool out (block size
16, bf16), one per side. Each side keeps its layers at their own offsets of one buffer,
a page apart, as per-layer tensors would sit (the layout's ``layer_offsets``). The request's
block table is fragmented the way a busy pool's is: runs of 1-8 consecutive block ids at
random places of a pool a third larger than the request, different on the two sides.
:func:`kvtransfer.kv.plan_reads` turns that into one batch of byte ranges per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvtransfer.kv import KVLayout, plan_reads

BLOCK_SIZE = 16
PAGE = 4096
# name -> (kind, layers, KV heads in this pool, head_dim, model's KV heads)
MODEL_SHAPES = {
    "llama3-8b": ("flash", 32, 8, 128, 8),
    "llama3-70b-tp8": ("flash", 80, 1, 128, 8),  # 8 KV heads over 8 ranks: one per rank
    "qwen2.5-7b": ("flash", 28, 4, 128, 4),
    "deepseek-v3-mla": ("mla", 61, 1, 576, 1),  # one latent: kv_lora_rank 512 + rope 64
}


@dataclass(frozen=True)
class KVWorkload:
    shape: str
    tokens: int
    layout: KVLayout            # both sides' (same shape and pool size, own block tables)
    plans: list[np.ndarray]     # per layer: PLAN_DTYPE ranges (src_off: target's buffer, dst_off: ours)
    nbytes: int                 # each side's buffer

    @property
    def kv_bytes(self) -> int:
        """Bytes moved for the request (whole blocks: the last block's tail too)."""
        return int(sum(int(p["len"].sum()) for p in self.plans))

    @property
    def entries(self) -> int:
        return int(sum(len(p) for p in self.plans))

    def expected(self, src: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``out`` zeroed, then every planned range copied from ``src``: what a read leaves."""
        out[:] = 0
        for p in self.plans:
            for so, do, n in zip(p["src_off"].tolist(), p["dst_off"].tolist(), p["len"].tolist()):
                out[do:do + n] = src[so:so + n]
        return out

    def ranges(self) -> list[list[list[int]]]:
        """Per layer ``[remote_off, local_off, len]`` rows (bench/peer_common.py's ``ranges``)."""
        return [np.stack([p["src_off"], p["dst_off"], p["len"]], axis=1).astype(np.int64).tolist()
                for p in self.plans]


def fragmented_table(rng: np.random.Generator, need: int, pool: int) -> np.ndarray:
    """``need`` distinct block ids of ``pool``, in runs of 1-8 consecutive ids at random places."""
    free = np.ones(pool, bool)
    out: list[int] = []
    while len(out) < need:
        run = int(rng.integers(1, 9))
        start = int(rng.integers(0, pool))
        ids = [i for i in range(start, min(start + run, pool)) if free[i]][:need - len(out)]
        free[ids] = False
        out += ids
    return np.asarray(out, np.int64)


def build(shape: str, tokens: int, seed: int) -> KVWorkload:
    kind, layers, heads, head_dim, total_heads = MODEL_SHAPES[shape]
    need = -(-tokens // BLOCK_SIZE)
    pool = need + max(need // 3, 8)
    probe = KVLayout(kind=kind, num_layers=layers, num_blocks=pool, block_size=BLOCK_SIZE, num_kv_heads=heads,
                     head_dim=head_dim, dtype="bfloat16", total_kv_heads=total_heads)
    stride = -(-probe.layer_bytes // PAGE) * PAGE + PAGE  # a page between layers: separate tensors
    layout = KVLayout(kind=kind, num_layers=layers, num_blocks=pool, block_size=BLOCK_SIZE, num_kv_heads=heads,
                      head_dim=head_dim, dtype="bfloat16", total_kv_heads=total_heads,
                      layer_offsets=tuple(i * stride for i in range(layers)))
    rng = np.random.default_rng([seed, tokens, layers])
    src_blocks, dst_blocks = fragmented_table(rng, need, pool), fragmented_table(rng, need, pool)
    plans = plan_reads(layout, layout, src_blocks, dst_blocks, tokens)
    return KVWorkload(shape, tokens, layout, plans, stride * layers)
