"""plan_reads, check_compatible, assign_heads - on real bytes.

Every transfer test fills source pools with a pattern that depends only on (layer, kv,
token index in the request, GLOBAL head, d), written through KVLayout.view into blocks
picked in random order; applies the plan with a plain byte copy per entry; then checks
that the destination's view holds the pattern for the copied tokens and heads and that
every other byte of every destination region (and a few bytes past its end) is as it was.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from kvtransfer.errors import InvalidArgumentError, LayoutMismatchError
from kvtransfer.kv import DTYPES, KINDS, PLAN_DTYPE, KVLayout, assign_heads, check_compatible, plan_reads

SLACK = 8  # bytes past each region's end that must stay untouched


def make(kind="flash", *, tp=(1, 0), heads=4, **over) -> KVLayout:
    fields = {**dict(kind=kind, num_layers=2, num_blocks=12, block_size=4, head_dim=8, dtype="bfloat16"), **over}
    if kind == "mla":
        heads = 1
    return KVLayout.for_tp(tp_size=tp[0], tp_rank=tp[1], total_kv_heads=heads, **fields)


def pattern(layer, kv, tok, head, d, itemsize: int) -> np.ndarray:
    """A well-mixed hash of the element's identity, as unsigned ints of ``itemsize`` bytes."""
    layer, kv, tok, head, d = (np.asarray(v, dtype=np.uint64) for v in (layer, kv, tok, head, d))
    x = (((layer * 3 + kv) * 1_000_003 + tok) * 1009 + head) * 4099 + d
    x = x * np.uint64(0x9E3779B97F4A7C15)  # wraps modulo 2**64, as wanted
    x ^= x >> np.uint64(29)
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(32)
    return x.astype(f"u{itemsize}")


class Pool:
    """A layout's regions as numpy byte buffers, full of random bytes."""

    def __init__(self, layout: KVLayout, rng: np.random.Generator):
        self.layout = layout
        self.bufs = [rng.integers(0, 256, layout.region_nbytes(r) + SLACK, dtype=np.uint8)
                     for r in range(layout.num_regions)]

    def bits(self, bufs, layer: int) -> np.ndarray:
        """The layer's logical view as unsigned ints (bfloat16 and float8 are not numpy types)."""
        region = self.layout.layer_offset(layer)[0]
        return self.layout.view(bufs[region], layer).view(f"u{self.layout.itemsize}")

    def write_request(self, bufs, blocks, num_tokens: int, layers=None, heads=None) -> None:
        """Writes the pattern of the request's tokens and the given global heads into ``bufs``."""
        a = self.layout
        lo, hi = heads or a.head_range
        tok = np.arange(num_tokens)
        blk = np.asarray(blocks, dtype=np.int64)[tok // a.block_size]
        kv = np.arange(a.num_kv)[:, None, None, None]
        h = np.arange(lo, hi)[None, None, :, None]
        d = np.arange(a.head_dim)[None, None, None, :]
        for layer in range(a.num_layers) if layers is None else layers:
            v = self.bits(bufs, layer)
            v[:, blk, tok % a.block_size, lo - a.first_head:hi - a.first_head] = \
                pattern(layer, kv, tok[None, :, None, None], h, d, a.itemsize)

    def fill(self, blocks, num_tokens: int) -> None:
        self.write_request(self.bufs, blocks, num_tokens)


def apply(plans: list[np.ndarray], src: Pool, dst: Pool) -> None:
    """Checks the plan's shape, then copies every entry byte for byte."""
    for plan in plans:
        assert plan.dtype == PLAN_DTYPE
        assert (plan["len"] > 0).all()
        assert (np.diff(plan["src_off"].astype(np.int64)) >= 0).all(), "sorted by source offset"
        ends_s, ends_d = plan["src_off"] + plan["len"], plan["dst_off"] + plan["len"]
        # Merged as far as it goes: no neighbours contiguous on both sides are left apart.
        assert not ((ends_s[:-1] == plan["src_off"][1:]) & (ends_d[:-1] == plan["dst_off"][1:])).any()
        for region in np.unique(plan["dst_region"]):  # destination ranges never overlap
            mine = plan[plan["dst_region"] == region]
            order = np.argsort(mine["dst_off"])
            assert (mine["dst_off"][order][1:] >= (mine["dst_off"] + mine["len"])[order][:-1]).all()
        for sr, dr, so, do, n in plan.tolist():
            assert so + n <= src.layout.region_nbytes(sr) and do + n <= dst.layout.region_nbytes(dr)
            dst.bufs[dr][do:do + n] = src.bufs[sr][so:so + n]


def expect(dst: Pool, before, dst_blocks, num_tokens: int, *, layers=None, heads=None,
           whole_blocks=()) -> None:
    """dst holds the pattern for the copied tokens and heads and, elsewhere, what it held
    ``before`` - except, for the head ranges in ``whole_blocks`` (copied as whole blocks),
    the tail of the last block, garbage on both sides."""
    a = dst.layout
    want = [b.copy() for b in before]
    dst.write_request(want, dst_blocks, num_tokens, layers, heads)
    care = [np.ones_like(b) for b in before]
    for lo, hi in whole_blocks if num_tokens % a.block_size else ():
        last = dst_blocks[a.blocks_for(num_tokens) - 1]
        for layer in range(a.num_layers) if layers is None else layers:
            dst.bits(care, layer)[:, last, num_tokens % a.block_size:, lo - a.first_head:hi - a.first_head] = 0
    for got, w, c in zip(dst.bufs, want, care):
        mask = c.astype(bool)
        bad = np.flatnonzero(got[mask] != w[mask])
        assert bad.size == 0, f"{bad.size} bytes differ, first at {np.flatnonzero(mask)[bad[0]]}"


def transfer(src: KVLayout, dst: KVLayout, num_tokens: int, *, seed=0, src_blocks=None, dst_blocks=None,
             **kw) -> list[np.ndarray]:
    """Fills a src pool, plans, copies and checks; returns the plans."""
    rng = np.random.default_rng(seed)
    sp, dp = Pool(src, rng), Pool(dst, rng)
    if src_blocks is None:
        src_blocks = rng.permutation(src.num_blocks)[:src.blocks_for(num_tokens)].tolist()
    if dst_blocks is None:
        dst_blocks = rng.permutation(dst.num_blocks)[:dst.blocks_for(num_tokens)].tolist()
    sp.fill(src_blocks, num_tokens)
    before = [b.copy() for b in dp.bufs]
    plans = plan_reads(src, dst, src_blocks, dst_blocks, num_tokens, **kw)
    assert len(plans) == (src.num_layers if kw.get("layers") is None else len(kw["layers"]))
    apply(plans, sp, dp)
    expect(dp, before, dst_blocks, num_tokens, layers=kw.get("layers"), heads=kw.get("heads"),
           whole_blocks=[kw.get("heads") or dst.head_range] if src.block_size == dst.block_size else [])
    return plans


# -- equal layouts ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind, per_layer", [("flash", 2), ("heads_major", 1), ("mla", 1)])
def test_consecutive_blocks_coalesce(kind, per_layer):
    a = make(kind)
    plans = transfer(a, a, 16, src_blocks=[3, 4, 5, 6], dst_blocks=[7, 8, 9, 10])
    for layer, plan in enumerate(plans):
        assert len(plan) == per_layer
        assert plan["len"].sum() == 4 * a.block_bytes
        assert plan["src_off"][0] == a.layer_offset(layer)[1] + 3 * a.element_strides()[1] * a.itemsize


def test_llama_block_is_one_32k_entry_per_kv():
    a = make("flash", heads=8, head_dim=128, block_size=16, num_blocks=6)
    plans = transfer(a, a, 4 * 16 - 5, src_blocks=[5, 1, 3, 0], dst_blocks=[2, 4, 0, 5])
    for plan in plans:
        assert len(plan) == 8 and (plan["len"] == 32 * 1024).all()


@pytest.mark.parametrize("num_tokens", [0, 1, 7, 8, 37])
@pytest.mark.parametrize("kind", KINDS)
def test_scattered_blocks(kind, num_tokens):
    a = make(kind)
    plans = transfer(a, a, num_tokens, seed=num_tokens)
    if num_tokens == 0:
        assert all(p.size == 0 for p in plans)


def test_a_subset_of_layers_and_heads():
    a = make("flash", heads=4, num_layers=4)
    plans = transfer(a, a, 10, layers=[3, 1], heads=(1, 3))
    assert [int(p["src_off"].min()) // a.layer_bytes for p in plans] == [3, 1]
    assert all((p["len"] == 2 * 8 * 2).all() for p in plans)  # two heads of one token


def test_extra_block_ids_are_ignored():
    a = make()
    transfer(a, a, 5, src_blocks=[1, 2, 3, 3, 3], dst_blocks=[4, 5, 6, 6])


# -- block size mapping ----------------------------------------------------------------------

@pytest.mark.parametrize("bs_src, bs_dst", [(16, 32), (32, 16), (16, 48), (48, 16), (3, 5)])
@pytest.mark.parametrize("kind", KINDS)
def test_block_size_mapping(kind, bs_src, bs_dst):
    src = make(kind, block_size=bs_src, num_blocks=100 // bs_src + 2)
    dst = make(kind, block_size=bs_dst, num_blocks=100 // bs_dst + 2)
    for n in (1, bs_src, 100):
        transfer(src, dst, n, seed=n)


def test_block_size_mapping_coalesces_runs():
    src, dst = make(block_size=16, num_blocks=9), make(block_size=32, num_blocks=9)
    # src blocks 2, 3 are adjacent, and land in dst block 5: one range per kv.
    plans = transfer(src, dst, 32, src_blocks=[2, 3], dst_blocks=[5])
    assert all(len(p) == 2 and (p["len"] == 32 * 4 * 8 * 2).all() for p in plans)


# -- tensor parallelism ----------------------------------------------------------------------

def transfer_tp(srcs: list[KVLayout], dst: KVLayout, num_tokens: int, seed=0) -> list[tuple[int, int] | None]:
    """Every source holds the request (a TP group's ranks); dst reads its heads from them."""
    rng = np.random.default_rng(seed)
    dp = Pool(dst, rng)
    before = [b.copy() for b in dp.bufs]
    dst_blocks = rng.permutation(dst.num_blocks)[:dst.blocks_for(num_tokens)]
    shares = assign_heads(dst, srcs)
    whole_blocks = []
    for src, share in zip(srcs, shares):
        if share is None:
            continue
        if src.block_size == dst.block_size:
            whole_blocks.append(share)
        sp = Pool(src, rng)
        src_blocks = rng.permutation(src.num_blocks)[:src.blocks_for(num_tokens)]
        sp.fill(src_blocks, num_tokens)
        apply(plan_reads(src, dst, src_blocks, dst_blocks, num_tokens, heads=share), sp, dp)
    expect(dp, before, dst_blocks, num_tokens, whole_blocks=whole_blocks)
    return shares


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_tp2_to_decode_tp1(kind):
    srcs = [make(kind, tp=(2, r)) for r in range(2)]
    shares = transfer_tp(srcs, make(kind), 21)
    assert shares == ([(0, 1), None] if kind == "mla" else [(0, 2), (2, 4)])


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_tp1_to_decode_tp2(kind):
    for r in range(2):
        dst = make(kind, tp=(2, r), block_size=8)
        assert transfer_tp([make(kind)], dst, 21, seed=r) == [dst.head_range]


def test_four_heads_over_tp8():
    # Decode TP 8 holds one head per rank (replicated); each reads it from prefill TP 2.
    srcs = [make(tp=(2, r)) for r in range(2)]
    for r in range(8):
        assert transfer_tp(srcs, make(tp=(8, r)), 13, seed=r) == \
            ([(r // 2, r // 2 + 1), None] if r < 4 else [None, (r // 2, r // 2 + 1)])
    # Prefill TP 8 -> decode TP 1: the first replica of each head serves it.
    assert transfer_tp([make(tp=(8, r)) for r in range(8)], make(), 13) == \
        [(0, 1), None, (1, 2), None, (2, 3), None, (3, 4), None]


# -- regions and torch -----------------------------------------------------------------------

def test_multi_region_layouts():
    # src: one region per layer (vLLM's per-layer tensors); dst: one region, layers in
    # reverse order with gaps.
    src = make(num_layers=3, layer_regions=(0, 1, 2))
    lb = make(block_size=8).layer_bytes
    dst = make(num_layers=3, block_size=8, layer_offsets=(2 * lb + 64, lb + 32, 0))
    plans = transfer(src, dst, 19)
    assert [(int(p["src_region"][0]), int(p["dst_region"][0])) for p in plans] == [(0, 0), (1, 0), (2, 0)]
    assert plans[0]["dst_off"].min() >= 2 * lb + 64
    src2 = make(num_layers=3, layer_regions=(1, 0, 1), layer_offsets=(0, 128, 8192))
    dst2 = make(num_layers=3, layer_regions=(0, 0, 1))
    assert [int(p["src_region"][0]) for p in transfer(src2, dst2, 9)] == [1, 0, 1]


def test_torch_views_on_both_sides():
    # Prefill: vLLM-style flash caches, one tensor per layer, TP 1, block 16.
    # Decode: TP 2 rank 1, block 32, one bf16 buffer for all layers.
    src = make(num_layers=2, layer_regions=(0, 1), block_size=16, num_blocks=6, heads=4)
    dst = make(num_layers=2, tp=(2, 1), block_size=32, num_blocks=4, heads=4)
    caches = [torch.randn(2, 6, 16, 4, 8).to(torch.bfloat16) for _ in range(2)]
    dst_buf = torch.zeros(dst.region_nbytes() // 2, dtype=torch.bfloat16)
    src_blocks, dst_blocks, n = [4, 0, 2, 5], [3, 1], 55
    plans = plan_reads(src, dst, src_blocks, dst_blocks, n)
    src_bytes = [c.view(-1).view(torch.uint8).numpy() for c in caches]
    dst_bytes = dst_buf.view(torch.uint8).numpy()
    for plan in plans:
        for sr, _, so, do, length in plan.tolist():
            dst_bytes[do:do + length] = src_bytes[sr][so:so + length]
    tok = torch.arange(n)
    for layer in range(2):
        got = dst.view(dst_buf, layer)[:, torch.tensor(dst_blocks)[tok // 32], tok % 32]
        want = src.view(caches[layer], layer)[:, torch.tensor(src_blocks)[tok // 16], tok % 16, 2:4]
        assert torch.equal(got, want)


# -- refusals --------------------------------------------------------------------------------

def test_check_compatible_names_every_field():
    a = make("flash", num_layers=2, heads=4, head_dim=8, dtype="bfloat16")
    b = make("heads_major", num_layers=3, heads=8, head_dim=16, dtype="float16", block_size=16, num_blocks=2)
    with pytest.raises(LayoutMismatchError) as e:
        check_compatible(a, b)
    assert e.value.fields == [("kind", "flash", "heads_major"), ("dtype", "bfloat16", "float16"),
                              ("head_dim", 8, 16), ("heads_total", 4, 8), ("num_layers", 2, 3)]
    assert "transpose" in str(e.value) and "head_dim 8 (src) vs 16 (dst)" in str(e.value)
    with pytest.raises(LayoutMismatchError, match="dtype"):
        plan_reads(a, make(dtype="float32"), [0], [0], 1)
    check_compatible(a, make(block_size=16, tp=(2, 1)))  # mapped, not refused


@pytest.mark.parametrize("src_blocks, dst_blocks, words", [
    ([0, 1], [2], "dst_blocks has 1 block ids, the tokens need 2"),
    ([0], [2, 3], "src_blocks has 1 block ids"),
    ([0, 12], [2, 3], r"src_blocks\[1\]=12"),
    ([0, 1], [-1, 3], r"dst_blocks\[0\]=-1"),
    ([0, 1], [3, 3], r"repeats block ids \[3\]"),
    ([0.0, 1.0], [2, 3], "int block ids"),
    ([[0, 1]], [2, 3], "1-D"),
])
def test_bad_block_ids(src_blocks, dst_blocks, words):
    a = make()
    with pytest.raises(InvalidArgumentError, match=words) as e:
        plan_reads(a, a, src_blocks, dst_blocks, 5)
    assert e.value.op == "plan_reads"


def test_other_refusals():
    a, half = make(), make(tp=(2, 1))
    with pytest.raises(LayoutMismatchError, match=r"not all held by src, which holds \[2, 4\)"):
        plan_reads(half, a, [0], [0], 1)  # default heads: all of dst's
    with pytest.raises(LayoutMismatchError, match="not all held by dst"):
        plan_reads(a, half, [0], [0], 1, heads=(0, 4))
    with pytest.raises(InvalidArgumentError, match="empty"):
        plan_reads(a, a, [0], [0], 1, heads=(2, 2))
    with pytest.raises(InvalidArgumentError, match=r"layers \[2\]"):
        plan_reads(a, a, [0], [0], 1, layers=[0, 2])
    with pytest.raises(InvalidArgumentError, match="num_tokens"):
        plan_reads(a, a, [0], [0], -1)
    with pytest.raises(LayoutMismatchError, match=r"no source holds heads \[2, 3\]") as e:
        assign_heads(a, [make(tp=(2, 0))])
    assert e.value.fields == [("heads", [(0, 2)], (0, 4))]
    with pytest.raises(LayoutMismatchError):
        assign_heads(make("mla"), [])
    with pytest.raises(LayoutMismatchError, match="head_dim"):
        assign_heads(a, [make(head_dim=4)])
    with pytest.raises(InvalidArgumentError, match="not one range"):
        assign_heads(a, [make(tp=(4, 1)), a])  # source 1 would serve heads 0 and 2-3


def test_assign_heads_mla_reads_everything_from_the_first():
    assert assign_heads(make("mla", tp=(4, 2)), [make("mla", tp=(4, r)) for r in range(4)]) == \
        [(0, 1), None, None, None]


# -- properties ------------------------------------------------------------------------------

def tp_sizes(heads: int) -> list[int]:
    return [t for t in range(1, 9) if heads % t == 0 or t > heads]


@st.composite
def cases(draw):
    kind = draw(st.sampled_from(KINDS))
    heads = 1 if kind == "mla" else draw(st.integers(1, 6))
    common = dict(kind=kind, num_layers=draw(st.integers(1, 3)), head_dim=draw(st.integers(1, 5)),
                  dtype=draw(st.sampled_from(sorted(DTYPES))))
    num_tokens = draw(st.integers(0, 40))

    def side(tp_size: int, rank: int):
        bs = draw(st.integers(1, 6))
        fields = dict(common, block_size=bs, num_blocks=-(-num_tokens // bs) + draw(st.integers(1, 3)))
        if draw(st.booleans()):  # several regions, layers in any order with gaps
            regions = draw(st.lists(st.integers(0, 2), min_size=fields["num_layers"],
                                    max_size=fields["num_layers"]))
            relabel = {r: i for i, r in enumerate(sorted(set(regions)))}
            fields["layer_regions"] = tuple(relabel[r] for r in regions)
            probe = KVLayout.for_tp(tp_size=tp_size, tp_rank=rank, total_kv_heads=heads, **fields)
            order = draw(st.permutations(range(fields["num_layers"])))
            offsets, end = [0] * fields["num_layers"], [0] * len(relabel)
            for layer in order:
                region = fields["layer_regions"][layer]
                offsets[layer] = end[region] + draw(st.integers(0, 3)) * 4
                end[region] = offsets[layer] + probe.layer_bytes
            fields["layer_offsets"] = tuple(offsets)
        return fields

    src_tp, dst_tp = draw(st.sampled_from(tp_sizes(heads))), draw(st.sampled_from(tp_sizes(heads)))
    dst_rank = draw(st.integers(0, dst_tp - 1))
    srcs = [KVLayout.for_tp(tp_size=src_tp, tp_rank=r, total_kv_heads=heads, **side(src_tp, r))
            for r in range(src_tp)]
    dst = KVLayout.for_tp(tp_size=dst_tp, tp_rank=dst_rank, total_kv_heads=heads, **side(dst_tp, dst_rank))
    return srcs, dst, num_tokens, draw(st.integers(0, 2**32 - 1))


@settings(max_examples=100, deadline=None)
@given(cases())
def test_any_shapes_block_sizes_and_tp_splits(case):
    srcs, dst, num_tokens, seed = case
    shares = transfer_tp(srcs, dst, num_tokens, seed=seed)
    held = sorted(h for share in shares if share for h in range(*share))
    assert held == list(range(*dst.head_range))


# -- a model-sized plan -------------------------------------------------------------------

def test_llama_3_8b_plan_has_an_entry_per_layer_block_and_k_v():
    """A Llama-3-8B-shaped plan (32 layers, 256 blocks, K and V): one entry each. Its
    speed is bench material, not asserted here."""
    a = make("flash", heads=8, head_dim=128, block_size=16, num_blocks=1024, num_layers=32)
    rng = np.random.default_rng(0)
    sb, db = rng.permutation(1024)[:256], rng.permutation(1024)[:256]
    plans = plan_reads(a, a, sb, db, 4096)
    assert sum(len(p) for p in plans) == 32 * 256 * 2
