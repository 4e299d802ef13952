"""KV layouts: from block ids to byte ranges, across kinds, block sizes and TP splits.

A paged KV pool is described, not owned, by a :class:`KVLayout`: per layer the logical
view is ``[num_kv, num_blocks, block_size, num_kv_heads, head_dim]``, and the kind fixes
the strides:

- ``flash`` (vLLM FlashAttention): per layer ``[2, num_blocks, block_size, heads, head_dim]``;
  one block's K (or V) for all of the pool's heads is one contiguous range.
- ``heads_major``: per layer ``[num_blocks, heads, block_size, 2*head_dim]``, K and V side by
  side in each row; a whole block (K and V) is one contiguous range.
- ``tokens_major`` (vLLM's LBNHC): per layer ``[num_blocks, block_size, heads, 2*head_dim]``;
  a whole block is one contiguous range.
- ``mla``: per layer ``[num_blocks, block_size, latent]``, one latent, no separate K and V.

Layers live in one or more registered regions (``layer_regions``, ``layer_offsets``).

:func:`plan_reads` turns a request (its block ids on both sides, its token count) into
one array of ``(src_region, dst_region, src_off, dst_off, len)`` per layer, ready to be a
``Peer.read`` batch; layers come out separately so that decode can stream them.

Mappings a plan makes:

- **Block size.** The two pools may use different block sizes: with equal ones whole
  blocks are copied; otherwise the tokens are copied in runs that stay inside one block on
  both sides (16 -> 48: each source block lands in a third of a destination block).
- **Tensor parallelism.** Heads are global: a pool of TP rank r holds heads
  ``head_range = [first_head, first_head + num_kv_heads)`` of the model's ``heads_total``
  (:meth:`KVLayout.for_tp` computes vLLM's split, replicating heads when ranks outnumber
  them). A decode rank calls :func:`assign_heads` with the prefill ranks' layouts to learn
  which heads to read from which rank, then :func:`plan_reads` once per source with
  ``heads=``. Prefill TP 2 -> decode TP 1 reads half the heads from each rank; TP 1 -> 2
  reads each decode rank's half from the single prefill pool.
- **Coalescing.** Ranges contiguous on both sides merge: consecutive block ids with the
  full head set become one range per layer (per K/V for flash).

Refused (:class:`~kvtransfer.errors.LayoutMismatchError`, see :func:`check_compatible`):
different dtype, head_dim, model head count, layer count or kind. :class:`CompatInfo`
is the handshake's fingerprint of the same facts; :class:`BlockPool` hands out block ids.
"""

from .compat import KV_COMPAT_VERSION, CompatInfo, compat_problems
from .layout import DTYPES, KINDS, KVLayout
from .plan import PLAN_DTYPE, assign_heads, check_compatible, plan_reads
from .pool import BlockPool

__all__ = ["KVLayout", "KINDS", "DTYPES", "PLAN_DTYPE", "plan_reads", "check_compatible", "assign_heads",
           "CompatInfo", "compat_problems", "KV_COMPAT_VERSION", "BlockPool"]
