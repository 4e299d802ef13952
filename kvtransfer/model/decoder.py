"""The decoder: Llama, Qwen2 and Mistral checkpoints in plain torch, over a paged KV pool.

One forward pass per call, over every token of the call at once (a prompt for
:meth:`Model.prefill`, one token of each of B sequences for :meth:`Model.decode`); each
layer writes its keys and values straight into pool blocks through
``layout.view(kv_buffer, layer)`` — the pool the transfer engine registers — so nothing is
copied between "the model's cache" and "the transferred blocks": they are the same bytes.

Numerics follow Transformers' eager/SDPA path: RMSNorm in float32, RoPE cos/sin in
float32 cast to the compute dtype, softmax in float32, logits returned as float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError, LayoutMismatchError
from ..kv import KVLayout
from . import paged, rope
from .config import ModelConfig
from .weights import load_weights

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Layout kinds whose per-layer view is [2, blocks, block_size, kv_heads, head_dim] (mla is not).
_KV_KINDS = ("flash", "heads_major")

#: The pool: one tensor (a one-region layout), or one per region of the layout.
KVBuffer = Union[torch.Tensor, Sequence[torch.Tensor]]


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"float16"``/``"bfloat16"`` (or the torch dtype itself) -> torch dtype."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise InvalidArgumentError(f"dtype {dtype!r} is not supported (one of {', '.join(_DTYPES)})", op="load_model")


def dtype_name(dtype: torch.dtype) -> str:
    """torch dtype -> the name KV layouts and config.json use (``"bfloat16"``, ...)."""
    return str(dtype).removeprefix("torch.")


@dataclass
class _Layer:
    """One decoder layer's weights, q/k/v and gate/up fused so each is one matmul."""

    attn_norm: torch.Tensor      # [hidden]
    mlp_norm: torch.Tensor       # [hidden]
    qkv: torch.Tensor            # [(heads + 2 * kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor | None
    o: torch.Tensor              # [hidden, heads * head_dim]
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor        # [2 * intermediate, hidden]
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor           # [hidden, intermediate]
    down_bias: torch.Tensor | None


def load_model(path: str | Path, dtype: str | torch.dtype | None = None,
               device: str | torch.device = "cpu") -> "Model":
    """Loads a Hugging Face-style folder (``config.json`` + ``*.safetensors``) strictly.

    ``dtype``: compute and weight dtype (None: the checkpoint's ``torch_dtype``, float32 if
    it names none). Raises :class:`InvalidArgumentError` for a missing folder, a missing or
    malformed config, an unsupported architecture or setting, and missing, misshaped or
    unexpected tensors (named, with both shapes).
    """
    cfg = ModelConfig.from_folder(path)
    dt = torch_dtype(dtype if dtype is not None else cfg.dtype)
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        # "cuda" means the current device; pools are on a numbered one (cuda:0), and the
        # device check compares the two.
        dev = torch.device("cuda", torch.cuda.current_device())
    weights = load_weights(path, cfg, dt, dev)
    return Model(cfg, weights, dt, dev)


class Model:
    """A loaded decoder. Build it with :func:`load_model` (the constructor takes the
    weights dict of :func:`~kvtransfer.model.weights.load_weights` and consumes it).

    Attributes: ``config`` (:class:`ModelConfig`), ``dtype`` (compute dtype), ``device``.
    Not thread-safe: one caller at a time (a worker's step loop).
    """

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device) -> None:
        self.config = config
        self.dtype = dtype
        self.device = device
        self._embed = weights["model.embed_tokens.weight"]
        self._norm = weights["model.norm.weight"]
        self._lm_head = weights["model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"]
        self._layers = [self._layer(weights, i) for i in range(config.num_layers)]
        freq, self._rope_scaling = rope.inv_freq(config.rope, config.head_dim)
        self._inv_freq = freq.to(device)

    def _layer(self, w: dict[str, torch.Tensor], i: int) -> _Layer:
        p = f"model.layers.{i}."

        def cat(*names: str) -> torch.Tensor | None:
            if p + names[0] not in w:
                return None
            # Popped, so that each unfused tensor is freed as soon as its fused copy exists:
            # loading then needs one layer's worth of extra memory, not the whole model's.
            return torch.cat([w.pop(p + n) for n in names], dim=0)

        return _Layer(
            attn_norm=w[p + "input_layernorm.weight"], mlp_norm=w[p + "post_attention_layernorm.weight"],
            qkv=cat("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
            qkv_bias=cat("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
            o=w[p + "self_attn.o_proj.weight"], o_bias=w.get(p + "self_attn.o_proj.bias"),
            gate_up=cat("mlp.gate_proj.weight", "mlp.up_proj.weight"),
            gate_up_bias=cat("mlp.gate_proj.bias", "mlp.up_proj.bias"),
            down=w[p + "mlp.down_proj.weight"], down_bias=w.get(p + "mlp.down_proj.bias"),
        )  # type: ignore[arg-type]

    # ---------------------------------------------------------------- KV layout

    def kv_layout(self, num_blocks: int, block_size: int, dtype: str | torch.dtype | None = None,
                  kind: str = "flash") -> KVLayout:
        """The :class:`kvtransfer.kv.KVLayout` of a one-region pool for this model:
        ``num_blocks`` blocks of ``block_size`` tokens, every layer and KV head, elements of
        ``dtype`` (default: the model's dtype); ``kind`` "flash" or "heads_major"."""
        dt = dtype_name(torch_dtype(dtype)) if dtype is not None else dtype_name(self.dtype)
        c = self.config
        return KVLayout(kind=kind, num_layers=c.num_layers, num_blocks=num_blocks, block_size=block_size,
                        num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=dt)

    def _views(self, kv_buffer: KVBuffer, layout: KVLayout, op: str) -> list[torch.Tensor]:
        """Each layer's ``[2, num_blocks, block_size, kv_heads, head_dim]`` view of the pool,
        after checking that ``layout`` describes this model (all its KV heads: this decoder
        does not run tensor-parallel) and that the buffers are on the model's device."""
        c = self.config
        fields = [("num_layers", c.num_layers, layout.num_layers),
                  ("num_kv_heads", c.num_kv_heads, layout.num_kv_heads),
                  ("total_kv_heads", c.num_kv_heads, layout.heads_total),
                  ("first_head", 0, layout.first_head),
                  ("head_dim", c.head_dim, layout.head_dim)]
        bad = [(name, a, b) for name, a, b in fields if a != b]
        if layout.kind not in _KV_KINDS:
            bad.append(("kind", "flash", layout.kind))
        if layout.dtype not in _DTYPES:
            bad.append(("dtype", dtype_name(self.dtype), layout.dtype))
        if bad:
            text = ", ".join(f"{n}: model {a!r}, layout {b!r}" for n, a, b in bad)
            raise LayoutMismatchError(f"KV layout does not fit this {c.architecture} ({text})", fields=bad, op=op)
        if isinstance(kv_buffer, torch.Tensor):
            buffers = [kv_buffer]
        else:
            buffers = list(kv_buffer) if isinstance(kv_buffer, (list, tuple)) else []
        if len(buffers) != layout.num_regions or not all(isinstance(b, torch.Tensor) for b in buffers):
            raise InvalidArgumentError(
                f"kv_buffer must be a torch tensor (one region) or a list of {layout.num_regions} "
                f"(one per region of the layout), got {type(kv_buffer).__name__}", op=op)
        for b in buffers:
            if b.device != self.device:
                raise InvalidArgumentError(f"kv_buffer is on {b.device}, the model on {self.device}", op=op)
        return [layout.view(buffers[layout.layer_offset(i)[0]], i) for i in range(c.num_layers)]

    # ---------------------------------------------------------------- forward

    def _check_tokens(self, tokens: Sequence[int], op: str) -> torch.Tensor:
        v = self.config.vocab_size
        bad = [t for t in tokens if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < v]
        if bad:
            raise InvalidArgumentError(f"token ids {bad[:4]} are outside the vocabulary [0, {v})", op=op)
        return torch.tensor(list(tokens), dtype=torch.int64, device=self.device)

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)
        return weight * xf.to(x.dtype)

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor,
                 views: list[torch.Tensor], decode: bool, on_layer: Callable[[int], None] | None) -> torch.Tensor:
        """Hidden states ``[N, hidden]`` after the final norm, for tokens ``[N]`` at ``positions``
        ``[N]``; ``tables`` ``[N, max_blocks]`` gives each token's sequence's block table.
        Prefill (``decode`` False): the N tokens are one prompt at positions 0..N-1.
        Decode: N sequences, one token each, attending to their cached positions."""
        c = self.config
        heads, kv_heads, hd = c.num_heads, c.num_kv_heads, c.head_dim
        block_size = views[0].shape[2]
        blocks, rows = paged.slots(tables, positions, block_size)
        cos, sin = rope.cos_sin(self._inv_freq, self._rope_scaling, positions, self.dtype)
        x = F.embedding(tokens, self._embed)
        for i, layer in enumerate(self._layers):
            h = self._rms(x, layer.attn_norm)
            qkv = F.linear(h, layer.qkv, layer.qkv_bias)
            q, k, v = qkv.split([heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
            q = rope.apply(q.reshape(-1, heads, hd), cos, sin)
            k = rope.apply(k.reshape(-1, kv_heads, hd), cos, sin)
            v = v.reshape(-1, kv_heads, hd)
            k_cache, v_cache = views[i][0], views[i][1]
            paged.write(k_cache, blocks, rows, k)
            paged.write(v_cache, blocks, rows, v)
            window = c.sliding_windows[i]
            if decode:
                attn = paged.paged_attention(q, k_cache, v_cache, tables, positions, window)
            else:
                if on_layer is not None:
                    if views[i].is_cuda:
                        # The layer's K/V must be in memory before anyone is told to read them
                        # (RDMA reads bypass the CUDA stream).
                        torch.cuda.current_stream(views[i].device).synchronize()
                    on_layer(i)
                attn = paged.prefill_attention(q, k, v, window)
            x = x + F.linear(attn, layer.o, layer.o_bias)
            h = self._rms(x, layer.mlp_norm)
            gate, up = F.linear(h, layer.gate_up, layer.gate_up_bias).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer.down, layer.down_bias)
        return x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._rms(x, self._norm), self._lm_head).float()

    def _check_positions(self, last: int, op: str) -> None:
        limit = self.config.max_position_embeddings
        if last >= limit:
            raise InvalidArgumentError(
                f"position {last} is past the model's max_position_embeddings {limit}", op=op)

    @torch.inference_mode()
    def prefill(self, tokens: Sequence[int], kv_buffer: KVBuffer, layout: KVLayout, block_ids: Sequence[int],
                on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """Runs a prompt and stores its KV cache in the pool.

        ``tokens``: the prompt's ids (positions 0..len-1). ``kv_buffer``: the pool (any
        dtype, e.g. uint8 bytes) that ``layout`` describes. ``block_ids``: the prompt's
        blocks in order, at least ``layout.blocks_for(len(tokens))`` of them (extra blocks
        are left untouched, e.g. for the tokens decode will add). ``on_layer(i)`` is called
        as soon as layer ``i``'s K and V of every prompt token are in the pool (before
        layer i + 1 runs), for layer-wise streaming.

        Returns float32 ``[vocab]``: the logits of the last position (the first generated
        token's distribution).
        """
        op = "prefill"
        if len(tokens) == 0:
            raise InvalidArgumentError("prefill needs at least one token", op=op)
        ids = self._check_tokens(tokens, op)
        self._check_positions(len(tokens) - 1, op)
        views = self._views(kv_buffer, layout, op)
        block_size = views[0].shape[2]
        needed = -(-len(tokens) // block_size)
        paged.check_table(list(block_ids), needed, views[0].shape[1], "block_ids", op)
        table = torch.tensor(list(block_ids[:needed]), dtype=torch.int64, device=self.device)
        n = len(tokens)
        positions = torch.arange(n, device=self.device)
        x = self._forward(ids, positions, table.expand(n, needed), views, decode=False, on_layer=on_layer)
        return self._logits(x[-1:])[0]

    @torch.inference_mode()
    def decode(self, tokens: Sequence[int], positions: Sequence[int], block_tables: Sequence[Sequence[int]],
               kv_buffer: KVBuffer, layout: KVLayout) -> torch.Tensor:
        """One step of B sequences at once (continuous batching).

        Sequence ``i`` feeds ``tokens[i]`` at position ``positions[i]`` (its length so far:
        positions 0..positions[i]-1 are already in its blocks ``block_tables[i]``, which must
        hold at least ``positions[i] // block_size + 1`` blocks). The token's K/V are written
        at that position, then it attends over positions 0..positions[i]. Sequences may have
        any lengths and may share blocks (a common prefix), but no two may write the same
        (block, row).

        Returns float32 ``[B, vocab]`` logits, row i for sequence i.
        """
        op = "decode"
        batch = len(tokens)
        if batch == 0 or len(positions) != batch or len(block_tables) != batch:
            raise InvalidArgumentError(
                f"decode needs B >= 1 tokens, positions and block tables alike, got {batch}, "
                f"{len(positions)}, {len(block_tables)}", op=op)
        ids = self._check_tokens(tokens, op)
        bad = [p for p in positions if isinstance(p, bool) or not isinstance(p, int) or p < 0]
        if bad:
            raise InvalidArgumentError(f"positions {bad[:4]} are not non-negative integers", op=op)
        self._check_positions(max(positions), op)
        views = self._views(kv_buffer, layout, op)
        block_size, num_blocks = views[0].shape[2], views[0].shape[1]
        needed = [p // block_size + 1 for p in positions]
        for i, table in enumerate(block_tables):
            paged.check_table(list(table), needed[i], num_blocks, f"block_tables[{i}]", op)
        written = [(block_tables[i][p // block_size], p % block_size) for i, p in enumerate(positions)]
        if len(set(written)) != batch:
            raise InvalidArgumentError("two sequences of the batch write the same (block, row)", op=op)
        width = max(needed)
        # Padding repeats a sequence's first block: a valid id, masked out by position.
        rows = [list(t[:n]) + [t[0]] * (width - n) for t, n in zip(block_tables, needed)]
        tables = torch.tensor(rows, dtype=torch.int64, device=self.device)
        pos = torch.tensor(list(positions), dtype=torch.int64, device=self.device)
        x = self._forward(ids, pos, tables, views, decode=True, on_layer=None)
        return self._logits(x)
