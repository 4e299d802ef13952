"""The paged KV cache on its own (no Transformers needed): continuous batching, layer
streaming, what prefill writes and leaves alone, moving blocks between pools, other
layouts, and the refusals of bad block tables, tokens and layouts."""

from __future__ import annotations

import pytest
import torch

from kvtransfer.errors import InvalidArgumentError, LayoutMismatchError
from kvtransfer.kv import KVLayout
from model_support import nan_pool, paged_greedy, prompt, random_model, scattered

BS = 16


def test_batched_decode_equals_each_sequence_alone() -> None:
    """8 sequences of different lengths decoded together give, step by step, the logits
    (and so the tokens) each gives decoded on its own."""
    model = random_model("mistral", sliding_window=40)  # a window: masks differ per row too
    lengths = [1, 5, 16, 17, 31, 40, 64, 100]
    steps = 5
    layout = model.kv_layout(128, BS)
    counts = [layout.blocks_for(n + steps) for n in lengths]
    blocks = scattered(sum(counts), 128, seed=3)  # the eight tables share one pool
    tables = [blocks[sum(counts[:i]):sum(counts[:i + 1])] for i in range(8)]
    prompts = [prompt(n, seed=i) for i, n in enumerate(lengths)]

    batch_pool, alone_pool = nan_pool(layout), nan_pool(layout)
    nxt_b, nxt_a = [], []
    for p, t in zip(prompts, tables):
        nxt_b.append(int(model.prefill(p, batch_pool, layout, t).argmax()))
        nxt_a.append(int(model.prefill(p, alone_pool, layout, t).argmax()))
    assert nxt_b == nxt_a
    for step in range(steps):
        positions = [n + step for n in lengths]
        batched = model.decode(nxt_b, positions, tables, batch_pool, layout)
        assert batched.shape == (8, model.config.vocab_size) and batched.dtype == torch.float32
        alone = torch.stack([model.decode([nxt_a[i]], [positions[i]], [tables[i]], alone_pool, layout)[0]
                             for i in range(8)])
        torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
        nxt_b = batched.argmax(-1).tolist()
        nxt_a = alone.argmax(-1).tolist()
        assert nxt_b == nxt_a


def test_decode_continues_prefill_exactly() -> None:
    """Decoding token t at position n gives what prefilling prompt + [t] gives."""
    model = random_model()
    tokens = prompt(33)
    layout = model.kv_layout(32, BS)
    pool = nan_pool(layout)
    table = scattered(3, 32, seed=1)
    first = int(model.prefill(tokens, pool, layout, table).argmax())
    stepped = model.decode([first], [33], [table], pool, layout)[0]
    whole = model.prefill(tokens + [first], nan_pool(layout), layout, table)
    torch.testing.assert_close(stepped, whole, atol=1e-5, rtol=1e-5)


def test_prefill_streams_layers_and_writes_only_its_rows() -> None:
    model = random_model()
    layout = model.kv_layout(16, BS)
    pool = nan_pool(layout)
    table = [9, 2, 14]  # 40 tokens: two full blocks and 8 rows of the third
    seen: list[int] = []

    def on_layer(i: int) -> None:
        # Layer i is complete, layer i + 1 untouched, when layer i is announced.
        view = layout.view(pool, i)
        assert not view[:, [9, 2]].isnan().any() and not view[:, 14, :8].isnan().any()
        if i + 1 < layout.num_layers:
            assert layout.view(pool, i + 1).isnan().all()
        seen.append(i)

    model.prefill(prompt(40), pool, layout, table, on_layer=on_layer)
    assert seen == list(range(model.config.num_layers))
    for layer in range(layout.num_layers):
        view = layout.view(pool, layer)
        assert not view[:, [9, 2]].isnan().any()
        assert not view[:, 14, :8].isnan().any()
        assert view[:, 14, 8:].isnan().all()                        # rows past the prompt
        others = [b for b in range(16) if b not in table]
        assert view[:, others].isnan().all()                        # blocks not given


def test_blocks_moved_to_another_pool_decode_the_same() -> None:
    """What the workers do: prefill in one pool, copy the blocks into other block ids of
    another pool (the RDMA read), decode there: same tokens as decoding in place."""
    model = random_model("qwen2", tie_word_embeddings=True)
    tokens = prompt(50, seed=7)
    src_layout, dst_layout = model.kv_layout(24, BS), model.kv_layout(40, BS)
    src, dst = nan_pool(src_layout), nan_pool(dst_layout)
    src_table, dst_table = [3, 17, 0, 11], [39, 5, 22, 30, 8]
    logits = model.prefill(tokens, src, src_layout, src_table)
    for layer in range(src_layout.num_layers):
        dst_layout.view(dst, layer)[:, dst_table[:4]] = src_layout.view(src, layer)[:, src_table]
    want, _ = paged_greedy(model, tokens, 8)
    got = [int(logits.argmax())]
    for step in range(7):
        got.append(int(model.decode([got[-1]], [50 + step], [dst_table], dst, dst_layout)[0].argmax()))
    assert got == want


def test_heads_major_and_multi_region_layouts_give_the_same_tokens() -> None:
    model = random_model()
    tokens = prompt(20, seed=5)
    want, _ = paged_greedy(model, tokens, 6)
    c = model.config
    layouts = [
        model.kv_layout(8, BS, kind="heads_major"),
        KVLayout(kind="flash", num_layers=c.num_layers, num_blocks=8, block_size=BS, num_kv_heads=c.num_kv_heads,
                 head_dim=c.head_dim, dtype="float32", layer_regions=(1, 0)),
    ]
    for layout in layouts:
        pools = [nan_pool(layout, r) for r in range(layout.num_regions)]
        pool = pools[0] if len(pools) == 1 else pools
        table = [6, 1]
        got = [int(model.prefill(tokens, pool, layout, table).argmax())]
        for step in range(5):
            got.append(int(model.decode([got[-1]], [20 + step], [table], pool, layout)[0].argmax()))
        assert got == want, layout


def test_block_size_does_not_change_the_result() -> None:
    model = random_model()
    tokens = prompt(45, seed=2)
    want, want_logits = paged_greedy(model, tokens, 5, block_size=16)
    for block_size in (1, 7, 64):
        got, got_logits = paged_greedy(model, tokens, 5, block_size=block_size, num_blocks=64)
        assert got == want
        torch.testing.assert_close(got_logits[-1], want_logits[-1], atol=1e-5, rtol=1e-5)


def test_bfloat16_kv_and_weights_track_float32() -> None:
    """A bfloat16 pool (and a bfloat16 model) runs and stays close to float32."""
    model32 = random_model()
    tokens = prompt(30, seed=4)
    ref = model32.prefill(tokens, nan_pool(model32.kv_layout(4, BS)), model32.kv_layout(4, BS), [0, 1])
    for model, kv_dtype in ((model32, "bfloat16"), (random_model(dtype="bfloat16"), None)):
        layout = model.kv_layout(4, BS, dtype=kv_dtype)
        assert layout.dtype == "bfloat16"
        pool = nan_pool(layout)
        logits = model.prefill(tokens, pool, layout, [2, 0])
        step = model.decode([int(logits.argmax())], [30], [[2, 0]], pool, layout)
        assert logits.dtype == step.dtype == torch.float32
        assert torch.cosine_similarity(logits, ref, dim=0) > 0.99


def test_prefill_refusals() -> None:
    model = random_model()
    layout = model.kv_layout(8, BS)
    pool = nan_pool(layout)
    cases = [
        (prompt(17), [0], "2 are needed"),
        (prompt(17), [0, 8], "outside the pool"),
        (prompt(17), [3, 3], "twice"),
        ([], [0], "at least one token"),
        ([0, 384], [0], "outside the vocabulary"),
        (prompt(2049), list(range(8)), "max_position_embeddings"),
    ]
    for tokens, table, text in cases:
        with pytest.raises(InvalidArgumentError, match=text):
            model.prefill(tokens, pool, layout, table)
    with pytest.raises(InvalidArgumentError, match="needs"):
        model.prefill([1, 2], pool[:-1], layout, [0])        # buffer smaller than the layout


def test_layout_mismatch_is_refused_with_fields() -> None:
    model = random_model()
    c = model.config
    wrong = KVLayout(kind="flash", num_layers=c.num_layers + 1, num_blocks=4, block_size=BS,
                     num_kv_heads=c.num_kv_heads, head_dim=c.head_dim * 2, dtype="float32")
    with pytest.raises(LayoutMismatchError, match="head_dim") as e:
        model.prefill([1], nan_pool(wrong), wrong, [0])
    assert {f[0] for f in e.value.fields} == {"num_layers", "head_dim"}
    split = KVLayout.for_tp(tp_size=2, tp_rank=1, total_kv_heads=c.num_kv_heads, kind="flash",
                            num_layers=c.num_layers, num_blocks=4, block_size=BS, head_dim=c.head_dim,
                            dtype="float32")
    with pytest.raises(LayoutMismatchError, match="first_head"):
        model.prefill([1], nan_pool(split), split, [0])
    with pytest.raises(InvalidArgumentError, match="torch tensor"):
        model.prefill([1], bytearray(model.kv_layout(4, BS).region_nbytes()), model.kv_layout(4, BS), [0])


def test_decode_refusals() -> None:
    model = random_model()
    layout = model.kv_layout(8, BS)
    pool = nan_pool(layout)
    cases = [
        (dict(tokens=[1, 2], positions=[0], block_tables=[[0]]), "alike"),
        (dict(tokens=[1], positions=[16], block_tables=[[0]]), "2 are needed"),
        (dict(tokens=[1], positions=[-1], block_tables=[[0]]), "non-negative"),
        (dict(tokens=[1, 2], positions=[3, 3], block_tables=[[0], [0]]), "same \\(block, row\\)"),
        (dict(tokens=[1], positions=[2048], block_tables=[list(range(8))]), "max_position_embeddings"),
    ]
    for kwargs, text in cases:
        with pytest.raises(InvalidArgumentError, match=text):
            model.decode(kv_buffer=pool, layout=layout, **kwargs)
    # Sharing a prefix block is fine as long as the written rows differ.
    out = model.decode([1, 2], [3, 17], [[0], [0, 1]], pool, layout)
    assert out.shape == (2, model.config.vocab_size)
