"""Helpers of the model tests: random model folders (written once per test session),
KV pools full of NaN bytes, scattered block tables, and greedy loops for our paged decoder
and for Hugging Face Transformers (the one-process, unpaged reference)."""

from __future__ import annotations

import atexit
import functools
import inspect
import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from kvtransfer.kv import KVLayout
from kvtransfer.model import Model, load_model, make_random_model

_ROOT = Path(tempfile.mkdtemp(prefix="kvtransfer-model-tests-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)

#: Small models: 2 layers keep the suite fast; the other shapes are the defaults.
SMALL = {"num_hidden_layers": 2}

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256}

#: name -> (arch, config overrides): the configurations checked against Transformers.
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-rope-llama3": ("llama", {"rope_scaling": LLAMA3_ROPE}),
    "qwen2-bias-tied": ("qwen2", {"tie_word_embeddings": True}),
    "mistral-window64": ("mistral", {"sliding_window": 64}),
}


def _key(overrides: dict[str, Any]) -> str:
    return json.dumps(overrides, sort_keys=True)


@functools.lru_cache(maxsize=None)
def _folder(arch: str, seed: int, num_shards: int, key: str) -> Path:
    overrides = {**SMALL, **json.loads(key)}
    folder = Path(tempfile.mkdtemp(prefix=f"{arch}-", dir=_ROOT))
    return make_random_model(folder, seed=seed, arch=arch, num_shards=num_shards, **overrides)


def random_folder(arch: str = "llama", seed: int = 0, num_shards: int = 1, **overrides: Any) -> Path:
    """A random model folder (2 layers unless overridden), written once per session."""
    return _folder(arch, seed, num_shards, _key(overrides))


def fresh_folder(tmp_path: Path, arch: str = "llama", **overrides: Any) -> Path:
    """A random model folder of the test's own, free to be damaged."""
    return make_random_model(tmp_path / "model", arch=arch, **{**SMALL, **overrides})


@functools.lru_cache(maxsize=None)
def _model(folder: Path, dtype: str | None) -> Model:
    return load_model(folder, dtype=dtype)


def random_model(arch: str = "llama", dtype: str | None = None, **overrides: Any) -> Model:
    """The loaded model of :func:`random_folder` (cached: tests must not change it)."""
    return _model(random_folder(arch, **overrides), dtype)


def nan_pool(layout: KVLayout, region: int = 0) -> torch.Tensor:
    """A uint8 pool of ``layout.region_nbytes(region)`` bytes, every byte 0xFF: NaN as
    float32 or bfloat16, so any read of a row that was never written poisons the result."""
    return torch.full((layout.region_nbytes(region),), 0xFF, dtype=torch.uint8)


def scattered(n: int, num_blocks: int, seed: int) -> list[int]:
    """``n`` distinct block ids of ``[0, num_blocks)`` in a shuffled, non-consecutive order."""
    ids = random.Random(seed).sample(range(num_blocks), n)
    for a, b in zip(ids, ids[1:]):
        if b == a + 1:  # make sure the table is not trivially sequential anywhere
            return scattered(n, num_blocks, seed + 1000)
    return ids


def prompt(n: int, seed: int = 0, vocab: int = 258) -> list[int]:
    """``n`` seeded token ids below ``vocab``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def paged_greedy(model: Model, tokens: list[int], steps: int, block_size: int = 16,
                 num_blocks: int = 64, seed: int = 0) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy generation with our decoder (prefill, then ``steps - 1`` decode steps) over
    scattered blocks of a NaN-filled pool -> (``steps`` new tokens, logits of each step)."""
    layout = model.kv_layout(num_blocks, block_size)
    pool = nan_pool(layout)
    table = scattered(layout.blocks_for(len(tokens) + steps), num_blocks, seed)
    logits = model.prefill(tokens, pool, layout, table)
    out, all_logits = [], [logits]
    for step in range(steps):
        out.append(int(logits.argmax()))
        if step == steps - 1:
            break
        logits = model.decode([out[-1]], [len(tokens) + step], [table], pool, layout)[0]
        all_logits.append(logits)
    return out, all_logits


def hf_model(folder: Path) -> Any:
    """Transformers' model of ``folder`` in float32, eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def hf_greedy(model: Any, tokens: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Transformers' greedy argmax loop with its own (unpaged) KV cache -> (``steps`` new
    tokens, float32 logits of each step). No EOS stop: random models may well emit it."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    # Transformers 5 renamed past_key_values to cache (the old name warns, then goes).
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids = torch.tensor([tokens])
    out, all_logits = [], []
    for step in range(steps):
        logits = model(input_ids=ids, use_cache=True, **{cache_arg: cache}).logits[0, -1].float()
        all_logits.append(logits)
        out.append(int(logits.argmax()))
        ids = torch.tensor([[out[-1]]])
    return out, all_logits
