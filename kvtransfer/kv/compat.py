"""The compatibility fingerprint two workers compare in their handshake.

:class:`CompatInfo` is the part of a KV layout (plus the model's name) that both sides
of a transfer must agree on. Its :meth:`~CompatInfo.hash` covers every field, so equal
hashes mean identical settings; when hashes differ, :func:`compat_problems` says whether
the difference is one :func:`~kvtransfer.kv.plan_reads` maps (block size) or one that
refuses the handshake (anything else). The TP split is deliberately not part of it:
pools of different TP ranks and sizes are mapped head by head.
"""

from __future__ import annotations

import hashlib

import msgspec

from .layout import KVLayout

#: Bumped when the meaning of a layout changes, so old and new workers refuse each other.
KV_COMPAT_VERSION = 1

# Fields whose difference plan_reads maps: they do not refuse a handshake.
_MAPPABLE = ("block_size",)


class CompatInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What two KV pools must share to exchange blocks (``total_kv_heads``: the model's
    KV heads, not one rank's share; ``block_size`` in tokens)."""

    model: str
    dtype: str
    num_layers: int
    total_kv_heads: int
    head_dim: int
    block_size: int
    kind: str
    version: int = KV_COMPAT_VERSION

    @classmethod
    def of(cls, layout: KVLayout, model: str) -> "CompatInfo":
        return cls(model=model, dtype=layout.dtype, num_layers=layout.num_layers,
                   total_kv_heads=layout.heads_total, head_dim=layout.head_dim,
                   block_size=layout.block_size, kind=layout.kind)

    def hash(self) -> str:
        """32 hex digits: blake2b (16 bytes) of the msgpack encoding, which is canonical
        (a struct encodes its fields in declaration order)."""
        return hashlib.blake2b(msgspec.msgpack.encode(self), digest_size=16).hexdigest()

    def differences(self, other: "CompatInfo") -> list[tuple[str, object, object]]:
        """Every differing field as ``(field, ours, theirs)``, in declaration order."""
        return [(name, getattr(self, name), getattr(other, name)) for name in self.__struct_fields__
                if getattr(self, name) != getattr(other, name)]


def compat_problems(ours: CompatInfo, theirs: CompatInfo) -> list[tuple[str, object, object]]:
    """The differences that refuse a handshake, as ``(field, ours, theirs)``: everything
    but block_size (plan_reads maps that). Empty list = compatible."""
    return [d for d in ours.differences(theirs) if d[0] not in _MAPPABLE]
