"""KV pool layouts: where each (layer, K/V, block, token, head, d) element lives in memory.

A :class:`KVLayout` describes a paged KV pool as it sits in registered memory, without
owning any memory. It is what a prefill worker sends in its handshake, and what
:func:`kvtransfer.kv.plan_reads` turns into byte ranges. Whatever the kind, one layer has
the logical view ``[num_kv, num_blocks, block_size, num_kv_heads, head_dim]`` (``num_kv``
is 2, K then V; 1 for mla); kinds differ only in the strides of that view.
"""

from __future__ import annotations

import sys
from typing import Any

import msgspec
import numpy as np

from ..errors import InvalidArgumentError

KINDS = ("flash", "heads_major", "tokens_major", "mla")
#: Element sizes in bytes, by dtype name (torch's names).
DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "int8": 1, "uint8": 1}
# numpy has no bfloat16 or float8: views of those hold the raw bits.
_NUMPY_DTYPES = {"float32": np.float32, "bfloat16": np.uint16, "float16": np.float16,
                 "float8_e4m3fn": np.uint8, "int8": np.int8, "uint8": np.uint8}
_INT_FIELDS = ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_dim", "total_kv_heads",
               "first_head")


def _bad(message: str) -> InvalidArgumentError:
    return InvalidArgumentError(message, op="layout")


def _as_int(name: str, value: Any) -> int:
    # numpy integers are accepted (shapes are often computed with numpy) but stored as
    # int, so that the struct encodes and hashes like one built from plain ints.
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise _bad(f"KVLayout.{name} must be an int, got {value!r}")
    return int(value)


class KVLayout(msgspec.Struct, frozen=True, kw_only=True):
    """A paged KV pool as laid out in memory. Per layer, the logical view is
    ``[num_kv, num_blocks, block_size, num_kv_heads, head_dim]`` (num_kv = 2 for K,V; 1 for mla).

    - kind ``"flash"``: per layer a ``[2, num_blocks, block_size, num_kv_heads, head_dim]``
      tensor (vLLM FlashAttention).
    - kind ``"heads_major"``: per layer ``[num_blocks, num_kv_heads, block_size, 2*head_dim]``
      (K in the first half of the last dim, V in the second) - layers are views into one buffer.
    - kind ``"tokens_major"``: per layer ``[num_blocks, block_size, num_kv_heads, 2*head_dim]``
      (vLLM's LBNHC, its default on GPUs), K and V side by side in each head's row.
    - kind ``"mla"``: per layer ``[num_blocks, block_size, head_dim]``, one latent
      (num_kv_heads must be 1; head_dim = latent width).

    Layers live in regions (the registered buffers): layer ``l`` is in region
    ``layer_regions[l]`` at byte ``layer_offsets[l]``. With ``layer_regions == ()`` every
    layer is in region 0; with ``layer_offsets == ()`` each region holds its layers back to
    back, in layer order (so with one region, layer ``l`` is at ``l * layer_bytes``). Region
    numbers must be ``0..n-1`` with no region left empty; layer offsets must be multiples
    of the element size (a typed view cannot start between elements).

    Construction validates everything and raises
    :class:`~kvtransfer.errors.InvalidArgumentError` (``op="layout"``) naming the field.
    """

    kind: str
    num_layers: int
    num_blocks: int
    block_size: int            # tokens per block
    num_kv_heads: int          # KV heads held in THIS pool (this TP rank's share)
    head_dim: int
    dtype: str                 # a key of DTYPES
    total_kv_heads: int = 0    # the model's KV heads; 0 means equal to num_kv_heads (no split)
    first_head: int = 0        # global index of this pool's first head
    layer_offsets: tuple[int, ...] = ()  # byte offset of each layer's tensor inside its region
    layer_regions: tuple[int, ...] = ()  # region index holding each layer; () = all in region 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise _bad(f"KVLayout.kind must be one of {KINDS}, got {self.kind!r}")
        if self.dtype not in DTYPES:
            raise _bad(f"KVLayout.dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        for name in _INT_FIELDS:
            value = _as_int(name, getattr(self, name))
            msgspec.structs.force_setattr(self, name, value)
            if value < (0 if name in ("total_kv_heads", "first_head") else 1):
                raise _bad(f"KVLayout.{name} must be {'>= 0' if name in ('total_kv_heads', 'first_head') else '> 0'}"
                           f", got {value}")
        if self.num_kv_heads + self.first_head > self.heads_total:
            raise _bad(f"KVLayout heads [{self.first_head}, {self.first_head + self.num_kv_heads}) are not inside "
                       f"the model's total_kv_heads={self.heads_total}")
        if self.kind == "mla" and (self.num_kv_heads, self.heads_total, self.first_head) != (1, 1, 0):
            raise _bad(f"KVLayout kind mla holds one latent, replicated on every TP rank: num_kv_heads must be 1, "
                       f"total_kv_heads 0 or 1, first_head 0; got num_kv_heads={self.num_kv_heads}, "
                       f"total_kv_heads={self.total_kv_heads}, first_head={self.first_head}")
        for name in ("layer_offsets", "layer_regions"):
            values = getattr(self, name)
            if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
                raise _bad(f"KVLayout.{name} must be a tuple of ints, got {values!r}")
            values = tuple(_as_int(name, v) for v in values)
            msgspec.structs.force_setattr(self, name, values)
            if values and len(values) != self.num_layers:
                raise _bad(f"KVLayout.{name} has {len(values)} entries for num_layers={self.num_layers}")
            if any(v < 0 for v in values):
                raise _bad(f"KVLayout.{name} must be >= 0, got {values}")
        if any(o % self.itemsize for o in self.layer_offsets):
            raise _bad(f"KVLayout.layer_offsets must be multiples of the {self.dtype} element size "
                       f"({self.itemsize} bytes), got {self.layer_offsets}")
        if self.layer_regions and sorted(set(self.layer_regions)) != list(range(max(self.layer_regions) + 1)):
            raise _bad(f"KVLayout.layer_regions must number regions 0..n-1, none empty; got {self.layer_regions}")
        self._check_overlaps()

    def _check_overlaps(self) -> None:
        table = self._table()
        for region in range(self.num_regions):
            spans = sorted((off, layer) for layer, (r, off) in enumerate(table) if r == region)
            for (off_a, la), (off_b, lb) in zip(spans, spans[1:]):
                if off_a + self.layer_bytes > off_b:
                    raise _bad(f"KVLayout.layer_offsets: layers {la} and {lb} overlap in region {region} "
                               f"(offsets {off_a} and {off_b}, layer_bytes {self.layer_bytes})")

    @classmethod
    def for_tp(cls, *, tp_size: int, tp_rank: int, total_kv_heads: int, **fields: Any) -> "KVLayout":
        """The layout of TP rank ``tp_rank``'s pool when a model with ``total_kv_heads``
        KV heads is split over ``tp_size`` ranks, as vLLM splits it: with T ranks and H
        heads, rank r holds heads ``[r*H//T, (r+1)*H//T)`` when T <= H (H % T must be 0),
        one head ``r*H//T`` when T > H (heads are replicated), and the whole latent for mla
        (whatever ``total_kv_heads`` says: an mla pool is one latent "head", on every rank).
        ``fields`` are the other KVLayout fields (not num_kv_heads or first_head)."""
        tp_size, tp_rank = _as_int("tp_size", tp_size), _as_int("tp_rank", tp_rank)
        total = _as_int("total_kv_heads", total_kv_heads)
        if tp_size < 1 or not 0 <= tp_rank < tp_size:
            raise _bad(f"KVLayout.for_tp: tp_rank must be in [0, tp_size), got tp_rank={tp_rank} tp_size={tp_size}")
        if total < 1:
            raise _bad(f"KVLayout.for_tp: total_kv_heads must be > 0, got {total}")
        taken = {"num_kv_heads", "first_head"} & set(fields)
        if taken:
            raise _bad(f"KVLayout.for_tp computes {sorted(taken)} from the TP split; do not pass them")
        if fields.get("kind") == "mla":
            return cls(num_kv_heads=1, total_kv_heads=1, first_head=0, **fields)
        if tp_size <= total:
            if total % tp_size:
                raise _bad(f"KVLayout.for_tp: {total} KV heads cannot be split evenly over tp_size={tp_size}")
            per_rank = total // tp_size
            return cls(num_kv_heads=per_rank, total_kv_heads=total, first_head=tp_rank * per_rank, **fields)
        return cls(num_kv_heads=1, total_kv_heads=total, first_head=tp_rank * total // tp_size, **fields)

    # -- sizes ---------------------------------------------------------------------------

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return DTYPES[self.dtype]

    @property
    def num_kv(self) -> int:
        """2 (K and V), or 1 for mla's single latent."""
        return 1 if self.kind == "mla" else 2

    @property
    def heads_total(self) -> int:
        """The model's KV heads (total_kv_heads, or num_kv_heads when that is 0)."""
        return self.total_kv_heads or self.num_kv_heads

    @property
    def head_range(self) -> tuple[int, int]:
        """Global indices ``[lo, hi)`` of the heads this pool holds."""
        return self.first_head, self.first_head + self.num_kv_heads

    @property
    def block_bytes(self) -> int:
        """Bytes one block occupies in one layer, K and V together."""
        return self.num_kv * self.block_size * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def layer_bytes(self) -> int:
        """Bytes of one layer's tensor."""
        return self.num_blocks * self.block_bytes

    @property
    def num_regions(self) -> int:
        return max(self.layer_regions) + 1 if self.layer_regions else 1

    def _table(self) -> list[tuple[int, int]]:
        """``(region, byte offset)`` of every layer, in one pass."""
        regions = self.layer_regions or (0,) * self.num_layers
        if self.layer_offsets:
            return list(zip(regions, self.layer_offsets))
        seen = [0] * (max(regions) + 1)  # layers already placed in each region
        table = []
        for region in regions:
            table.append((region, seen[region] * self.layer_bytes))
            seen[region] += 1
        return table

    def layer_offset(self, layer: int) -> tuple[int, int]:
        """``(region index, byte offset)`` of layer ``layer``'s tensor."""
        layer = _as_int("layer", layer)
        if not 0 <= layer < self.num_layers:
            raise _bad(f"layer {layer} out of range [0, {self.num_layers})")
        return self._table()[layer]

    def region_nbytes(self, region: int = 0) -> int:
        """Bytes region ``region`` must hold: the end of its last layer."""
        region = _as_int("region", region)
        if not 0 <= region < self.num_regions:
            raise _bad(f"region {region} out of range [0, {self.num_regions})")
        return max(off for r, off in self._table() if r == region) + self.layer_bytes

    def element_strides(self) -> tuple[int, int, int, int, int]:
        """Strides in elements of the logical view ``[kv, block, token, head, d]``."""
        nb, bs, h, d = self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim
        if self.kind == "flash":
            return nb * bs * h * d, bs * h * d, h * d, d, 1
        if self.kind == "heads_major":
            return d, h * bs * 2 * d, 2 * d, bs * 2 * d, 1
        if self.kind == "tokens_major":
            return d, bs * h * 2 * d, h * 2 * d, 2 * d, 1
        return nb * bs * d, bs * d, d, d, 1  # mla: kv and head have size 1

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` tokens: ``ceil(num_tokens / block_size)``."""
        num_tokens = _as_int("num_tokens", num_tokens)
        if num_tokens < 0:
            raise _bad(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self.block_size)

    # -- views ---------------------------------------------------------------------------

    def view(self, buffer: Any, layer: int) -> Any:
        """Logical ``[num_kv, num_blocks, block_size, num_kv_heads, head_dim]`` strided view
        of layer ``layer`` in ``buffer`` (the memory of the layer's region, C-contiguous, of
        any dtype, e.g. uint8). A torch tensor in gives a torch view of dtype ``self.dtype``;
        a numpy array (or any writable buffer) gives a numpy view, bfloat16 as uint16 and
        float8 as uint8. Writes through. Refuses a buffer smaller than the region."""
        region, offset = self.layer_offset(layer)
        shape = (self.num_kv, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        strides = self.element_strides()
        need = self.region_nbytes(region)
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(buffer, torch.Tensor):
            if not buffer.is_contiguous():
                raise _bad("KVLayout.view: the torch buffer must be contiguous")
            flat = buffer.reshape(-1).view(torch.uint8)
            if flat.numel() < need:
                raise _bad(f"KVLayout.view: buffer of {flat.numel()} bytes, region {region} needs {need}")
            try:
                typed = flat[offset:offset + self.layer_bytes].view(getattr(torch, self.dtype))
            except RuntimeError as e:  # the buffer itself starts between elements
                raise _bad(f"KVLayout.view: cannot view the buffer as {self.dtype}: {e}") from None
            return typed.as_strided(shape, strides, typed.storage_offset())
        if isinstance(buffer, np.ndarray):
            if not buffer.flags.c_contiguous:
                raise _bad("KVLayout.view: the numpy buffer must be C-contiguous")
            flat = buffer.reshape(-1).view(np.uint8)
        else:
            try:
                flat = np.frombuffer(buffer, dtype=np.uint8)
            except (TypeError, ValueError):
                raise _bad(f"KVLayout.view: need a torch tensor, a numpy array or a buffer, got "
                           f"{type(buffer).__name__}") from None
        if flat.size < need:
            raise _bad(f"KVLayout.view: buffer of {flat.size} bytes, region {region} needs {need}")
        typed = flat[offset:offset + self.layer_bytes].view(_NUMPY_DTYPES[self.dtype])
        return np.lib.stride_tricks.as_strided(typed, shape, tuple(s * self.itemsize for s in strides),
                                               writeable=typed.flags.writeable)

    # -- wire ----------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        return msgspec.msgpack.encode(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> "KVLayout":
        """Decodes and validates; anything malformed raises InvalidArgumentError."""
        try:
            return msgspec.msgpack.decode(data, type=cls)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            raise InvalidArgumentError(f"malformed KVLayout: {e}", op="decode") from None
