"""KVLayout: validation, the TP split, sizes, views of real memory, the wire form, CompatInfo."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
import torch

from kvtransfer.errors import InvalidArgumentError
from kvtransfer.kv import DTYPES, KINDS, KV_COMPAT_VERSION, CompatInfo, KVLayout, compat_problems

BASE = dict(kind="flash", num_layers=3, num_blocks=5, block_size=4, num_kv_heads=2, head_dim=8, dtype="bfloat16")


def layout(**over) -> KVLayout:
    return KVLayout(**{**BASE, **over})


# -- validation ----------------------------------------------------------------------------

@pytest.mark.parametrize("over, words", [
    (dict(kind="paged"), "kind"),
    (dict(dtype="float64"), "dtype"),
    (dict(num_layers=0), "num_layers"),
    (dict(num_blocks=-1), "num_blocks"),
    (dict(block_size=0), "block_size"),
    (dict(num_kv_heads=0), "num_kv_heads"),
    (dict(head_dim=0), "head_dim"),
    (dict(head_dim=8.0), "head_dim"),
    (dict(num_layers=True), "num_layers"),
    (dict(total_kv_heads=-1), "total_kv_heads"),
    (dict(first_head=1), "total_kv_heads=2"),                     # no split: heads [1, 3) of 2
    (dict(total_kv_heads=4, first_head=3), "total_kv_heads=4"),   # [3, 5) of 4
    (dict(total_kv_heads=1), "total_kv_heads=1"),                 # 2 heads of a 1-head model
    (dict(kind="mla", num_kv_heads=2), "mla"),
    (dict(kind="mla", num_kv_heads=1, total_kv_heads=8), "mla"),
    (dict(layer_offsets=(0, 1024)), "layer_offsets has 2 entries"),
    (dict(layer_regions=(0, 0, 0, 0)), "layer_regions has 4 entries"),
    (dict(layer_offsets=(0, -2, 4096)), "layer_offsets must be >= 0"),
    (dict(layer_offsets=(0, 641, 4096)), "multiples"),
    (dict(layer_offsets=(0, 640, 1280)), "overlap"),              # layer_bytes is 640 * 2 = 1280
    (dict(layer_regions=(0, 2, 2)), "0..n-1"),
    (dict(layer_regions=(0, 1, 1), layer_offsets=(0, 0, 0)), "layers 1 and 2 overlap in region 1"),
    (dict(layer_offsets="abc"), "tuple of ints"),
])
def test_validation_names_the_field(over, words):
    with pytest.raises(InvalidArgumentError, match=words) as e:
        layout(**over)
    assert e.value.op == "layout"


def test_numpy_ints_and_lists_are_normalised():
    a = layout(num_blocks=np.int64(5), layer_offsets=[0, 1280, 2560])
    assert type(a.num_blocks) is int and a.layer_offsets == (0, 1280, 2560)
    assert a == layout(layer_offsets=(0, 1280, 2560)) and hash(a) == hash(layout(layer_offsets=(0, 1280, 2560)))
    assert KVLayout.from_bytes(a.to_bytes()) == a


# -- sizes ---------------------------------------------------------------------------------

def test_sizes_and_strides():
    a = layout()
    assert (a.itemsize, a.num_kv, a.heads_total, a.head_range) == (2, 2, 2, (0, 2))
    assert a.block_bytes == 2 * 4 * 2 * 8 * 2 and a.layer_bytes == 5 * a.block_bytes
    assert a.num_regions == 1 and a.region_nbytes() == 3 * a.layer_bytes
    assert [a.layer_offset(layer) for layer in range(3)] == [(0, 0), (0, 1280), (0, 2560)]
    assert a.element_strides() == (5 * 4 * 2 * 8, 4 * 2 * 8, 2 * 8, 8, 1)
    assert layout(kind="heads_major").element_strides() == (8, 2 * 4 * 16, 16, 4 * 16, 1)
    m = layout(kind="mla", num_kv_heads=1, head_dim=16)
    assert (m.num_kv, m.block_bytes) == (1, 4 * 16 * 2)
    assert [a.blocks_for(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    with pytest.raises(InvalidArgumentError, match="num_tokens"):
        a.blocks_for(-1)
    with pytest.raises(InvalidArgumentError, match="layer 3 out of range"):
        a.layer_offset(3)
    with pytest.raises(InvalidArgumentError, match="region 1 out of range"):
        a.region_nbytes(1)


def test_regions_pack_their_layers_in_order_by_default():
    a = layout(layer_regions=(1, 0, 1))
    assert a.num_regions == 2
    assert [a.layer_offset(layer) for layer in range(3)] == [(1, 0), (0, 0), (1, a.layer_bytes)]
    assert (a.region_nbytes(0), a.region_nbytes(1)) == (a.layer_bytes, 2 * a.layer_bytes)
    b = layout(layer_regions=(0, 1, 0), layer_offsets=(4096, 64, 0))
    assert [b.layer_offset(layer) for layer in range(3)] == [(0, 4096), (1, 64), (0, 0)]
    assert (b.region_nbytes(0), b.region_nbytes(1)) == (4096 + b.layer_bytes, 64 + b.layer_bytes)


# -- the TP split --------------------------------------------------------------------------

def tp(size: int, rank: int, total: int, **over) -> KVLayout:
    fields = {k: v for k, v in {**BASE, **over}.items() if k != "num_kv_heads"}
    return KVLayout.for_tp(tp_size=size, tp_rank=rank, total_kv_heads=total, **fields)


def test_for_tp_splits_heads_like_vllm():
    assert [tp(4, r, 8).head_range for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert tp(1, 0, 8).head_range == (0, 8) and tp(1, 0, 8).heads_total == 8
    # More ranks than heads: one head each, replicated (ranks 0,1 hold head 0, ...).
    assert [tp(8, r, 4).head_range for r in range(8)] == [(h, h + 1) for h in (0, 0, 1, 1, 2, 2, 3, 3)]
    assert all(tp(8, r, 4).heads_total == 4 for r in range(8))
    m = tp(4, 3, 1, kind="mla")
    assert (m.num_kv_heads, m.first_head, m.heads_total) == (1, 0, 1)


@pytest.mark.parametrize("args, words", [
    ((3, 0, 8), "split evenly"),
    ((2, 2, 8), "tp_rank"),
    ((0, 0, 8), "tp_rank"),
    ((2, 0, 0), "total_kv_heads"),
])
def test_for_tp_refusals(args, words):
    with pytest.raises(InvalidArgumentError, match=words):
        tp(*args)
    with pytest.raises(InvalidArgumentError, match="first_head"):
        KVLayout.for_tp(tp_size=2, tp_rank=0, total_kv_heads=8, first_head=0,
                        **{k: v for k, v in BASE.items() if k != "num_kv_heads"})


# -- views ---------------------------------------------------------------------------------

def test_flash_view_matches_vllm_tensor():
    kv = torch.randn(3, 2, 5, 4, 2, 8).to(torch.bfloat16)  # [layers, 2, blocks, block_size, heads, d]
    a = layout()
    for layer in range(3):
        v = a.view(kv, layer)
        assert v.dtype == torch.bfloat16 and v.shape == (2, 5, 4, 2, 8)
        assert torch.equal(v, kv[layer])
    a.view(kv, 1)[1, 2, 3, 1, 5] = 7.0  # writes through
    assert kv[1, 1, 2, 3, 1, 5].item() == 7.0


def test_heads_major_view_matches_its_tensor():
    buf = torch.randn(3, 5, 2, 4, 16)  # [layers, blocks, heads, block_size, 2*d], float32
    a = layout(kind="heads_major", dtype="float32")
    for layer in range(3):
        v = a.view(buf, layer)
        assert torch.equal(v[0], buf[layer][..., :8].transpose(1, 2))
        assert torch.equal(v[1], buf[layer][..., 8:].transpose(1, 2))


def test_mla_view_matches_its_tensor():
    buf = torch.randn(3, 5, 4, 16).to(torch.float16)
    a = layout(kind="mla", num_kv_heads=1, head_dim=16, dtype="float16")
    for layer in range(3):
        assert torch.equal(a.view(buf, layer), buf[layer][None, :, :, None, :])


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("kind", KINDS)
def test_torch_and_numpy_views_see_the_same_bytes(kind, dtype):
    a = layout(kind=kind, dtype=dtype, layer_regions=(0, 1, 0), layer_offsets=(0, 64, 4096),
               **({"num_kv_heads": 1} if kind == "mla" else {}))
    bufs = [np.zeros(a.region_nbytes(r) + 3, np.uint8) for r in range(a.num_regions)]
    rng = np.random.default_rng(1)
    for layer in range(3):
        region = a.layer_offset(layer)[0]
        nv = a.view(bufs[region], layer)
        assert nv.itemsize == a.itemsize and nv.shape == (a.num_kv, 5, 4, a.num_kv_heads, 8)
        bits = nv.view(f"u{a.itemsize}")
        bits[...] = rng.integers(0, 2 ** (8 * a.itemsize), bits.shape, dtype=f"u{a.itemsize}")
        tv = a.view(torch.from_numpy(bufs[region]), layer)
        assert tv.dtype == getattr(torch, dtype)
        tbits = tv.view({1: torch.uint8, 2: torch.uint16, 4: torch.uint32}[a.itemsize])
        assert np.array_equal(tbits.numpy(), bits)
    # Each layer's bytes are exactly its span: layer 1 sits at 64 in region 1.
    region1 = bufs[1]
    assert not region1[:64].any() and not region1[64 + a.layer_bytes:].any()


def test_view_of_a_typed_torch_buffer_and_of_a_bytearray():
    a = layout()
    t = torch.zeros(a.region_nbytes() // 2, dtype=torch.bfloat16)
    a.view(t, 2)[0, 4, 3, 1, 7] = 1.5
    assert t[2 * a.layer_bytes // 2 + ((4 * 4 + 3) * 2 + 1) * 8 + 7].item() == 1.5
    # A buffer that starts inside its storage (at an element boundary) works as well.
    base = torch.zeros(a.region_nbytes() + 6, dtype=torch.uint8)
    a.view(base[6:], 1)[1, 2, 1, 1, 3] = 1.0
    at = 6 + a.layer_bytes + 2 * sum(i * s for i, s in zip((1, 2, 1, 1, 3), a.element_strides()))
    assert base[at:at + 2].tolist() == [0x80, 0x3F]  # bfloat16 1.0, little-endian
    raw = bytearray(a.region_nbytes())
    a.view(raw, 0)[1, 0, 0, 0, 0] = 0x3FC0  # bfloat16 1.5, as bits
    assert raw[a.element_strides()[0] * 2:][:2] == b"\xc0\x3f"


def test_view_refusals():
    a = layout()
    with pytest.raises(InvalidArgumentError, match="needs 3840"):
        a.view(np.zeros(3839, np.uint8), 0)
    with pytest.raises(InvalidArgumentError, match="needs 3840"):
        a.view(torch.zeros(3839, dtype=torch.uint8), 0)
    with pytest.raises(InvalidArgumentError, match="contiguous"):
        a.view(np.zeros((3840, 2), np.uint8)[:, 0], 0)
    with pytest.raises(InvalidArgumentError, match="contiguous"):
        a.view(torch.zeros(3840, 2, dtype=torch.uint8)[:, 0], 0)
    with pytest.raises(InvalidArgumentError, match="cannot view"):
        a.view(torch.zeros(3841, dtype=torch.uint8)[1:], 0)  # starts between bfloat16 elements
    with pytest.raises(InvalidArgumentError, match="buffer"):
        a.view(12, 0)
    with pytest.raises(InvalidArgumentError, match="layer 3"):
        a.view(np.zeros(3840, np.uint8), 3)


# -- wire ----------------------------------------------------------------------------------

def test_wire_round_trip_and_refusals():
    a = layout(kind="heads_major", total_kv_heads=8, first_head=4, layer_regions=(0, 1, 0))
    assert KVLayout.from_bytes(a.to_bytes()) == a
    for bad in (b"", b"\x01\x02", msgspec.msgpack.encode({"kind": "flash"}),
                msgspec.msgpack.encode({**BASE, "num_blocks": 0}),
                msgspec.msgpack.encode({**BASE, "num_blocks": "5"}),
                msgspec.msgpack.encode({**BASE, "first_head": 1})):
        with pytest.raises(InvalidArgumentError, match="malformed KVLayout"):
            KVLayout.from_bytes(bad)


# -- CompatInfo ----------------------------------------------------------------------------

def test_compat_info():
    a = tp(2, 1, 8, num_blocks=100)
    info = CompatInfo.of(a, "llama-3-8b")
    assert (info.total_kv_heads, info.block_size, info.kind, info.version) == (8, 4, "flash", KV_COMPAT_VERSION)
    # Same model, other TP rank and pool size: identical.
    assert CompatInfo.of(tp(4, 0, 8, num_blocks=7), "llama-3-8b").hash() == info.hash()
    assert len(info.hash()) == 32 and int(info.hash(), 16) >= 0
    other = CompatInfo.of(tp(1, 0, 8, block_size=16, dtype="float16"), "llama-3-8b")
    assert other.hash() != info.hash()
    assert info.differences(other) == [("dtype", "bfloat16", "float16"), ("block_size", 4, 16)]
    assert compat_problems(info, other) == [("dtype", "bfloat16", "float16")]
    just_blocks = CompatInfo.of(tp(1, 0, 8, block_size=16), "llama-3-8b")
    assert compat_problems(info, just_blocks) == [] and info.hash() != just_blocks.hash()
    assert [f for f, _, _ in compat_problems(info, CompatInfo.of(tp(1, 0, 4, kind="heads_major", head_dim=4,
                                                                    num_layers=2), "qwen"))] == \
        ["model", "num_layers", "total_kv_heads", "head_dim", "kind"]
    old = msgspec.structs.replace(info, version=0)
    assert compat_problems(info, old) == [("version", KV_COMPAT_VERSION, 0)]

