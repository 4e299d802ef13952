"""GGUF files: llama.cpp's names, row order, quantized types and tokenizer read back into
a Hugging Face-style folder; damaged files refused by name.

A random model is written as llama.cpp writes one (its names, q/k rows permuted, each
tensor in one of the supported types) with a byte-level BPE tokenizer trained here, then
converted back and compared with the original. The real default model (SmolLM2) is
checked against Transformers' own GGUF loader in test_model_gguf_smollm2.py.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kvtransfer.errors import InvalidArgumentError
from kvtransfer.model import convert_gguf, load_model, load_tokenizer
from kvtransfer.model.chat import render_chat
from kvtransfer.model.config import ModelConfig
from kvtransfer.model.gguf_file import SUPPORTED_TYPES, permute, unpermute
from kvtransfer.model.weights import load_weights
from model_support import random_folder

gguf = pytest.importorskip("gguf", reason="GGUF files are read with the gguf package")
tokenizers = pytest.importorskip("tokenizers")

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}" \
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
TEXTS = ["the quick brown fox", "2024 foxes jumped 3 times!", " lazy  dogs\n\nsleep", "<|im_start|>user\nhi"]
LLAMA_CPP_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
                   "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                   "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _train_tokenizer() -> "tokenizers.Tokenizer":
    """A byte-level BPE split as SmolLM's is (digits alone, then GPT-2's regex)."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog 1234567890"] * 30, trainer=trainer)
    return tok


def _llama_cpp_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    _, _, i, rest = name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{LLAMA_CPP_NAMES[module]}.{kind}"


def write_gguf(folder: Path, path: Path, tok: "tokenizers.Tokenizer",
               override: dict[str, str] | None = None) -> dict[str, str]:
    """Writes the model of ``folder`` as llama.cpp would (q/k permuted; layer 0's q and k
    and 1-D tensors F32, other 2-D tensors in turn of each supported type, ``override``:
    HF name -> type name) with ``tok``; returns HF name -> type name."""
    cfg = ModelConfig.from_folder(folder)
    weights = load_weights(folder, cfg, torch.float32)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope.theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t.startswith("<|") else 1 for t, _ in vocab])
    w.add_token_merges([" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_chat_template(TEMPLATE)
    types: dict[str, str] = {}
    n = 0
    for name, t in weights.items():
        if ".q_proj." in name:
            t = permute(t, cfg.num_heads)
        elif ".k_proj." in name:
            t = permute(t, cfg.num_kv_heads)
        kind = "F32"
        if t.dim() == 2 and not name.startswith("model.layers.0.self_attn.") or "v_proj" in name:
            kind, n = SUPPORTED_TYPES[n % len(SUPPORTED_TYPES)], n + 1
        qtype = gguf.GGMLQuantizationType[(override or {}).get(name, kind)]
        data = gguf.quants.quantize(t.numpy(), qtype)
        w.add_tensor(_llama_cpp_name(name), data, raw_dtype=qtype)
        types[name] = qtype.name
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return types


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, Path, dict[str, str], "tokenizers.Tokenizer"]:
    """(the random model's folder, its GGUF file, the tensor types, the tokenizer)."""
    folder = random_folder("llama", vocab_size=384, num_hidden_layers=3)
    path = tmp_path_factory.mktemp("gguf") / "random.gguf"
    tok = _train_tokenizer()
    return folder, path, write_gguf(folder, path, tok), tok


def test_permute_round_trip() -> None:
    w = torch.arange(8 * 6 * 3, dtype=torch.float32).reshape(48, 3)
    assert torch.equal(unpermute(permute(w, 8), 8), w)
    # llama.cpp pairs adjacent rows: head 0's rows (0, 3) of 6 become rows 0 and 1.
    assert permute(w, 8)[1].tolist() == w[3].tolist()


def test_weights_come_back(written, tmp_path: Path) -> None:
    folder, path, types, _ = written
    out = convert_gguf(path, tmp_path / "conv")
    cfg, original = ModelConfig.from_folder(out), ModelConfig.from_folder(folder)
    assert cfg.rms_norm_eps == pytest.approx(original.rms_norm_eps)    # GGUF stores it as float32
    assert cfg == dataclasses.replace(original, bos_token_id=1, eos_token_ids=(2,), rms_norm_eps=cfg.rms_norm_eps)
    ours, theirs = load_weights(out, cfg, torch.float32), load_weights(folder, cfg, torch.float32)
    assert set(types.values()) == set(SUPPORTED_TYPES)
    for name, want in theirs.items():
        if types[name] == "F32":
            assert torch.equal(ours[name], want), name   # exact: names and row order are right
        else:   # quantized: what gguf's own round trip gives, in our row order
            heads = cfg.num_heads if ".q_proj." in name else cfg.num_kv_heads
            p = permute(want, heads) if (".q_proj." in name or ".k_proj." in name) else want
            q = gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), gguf.GGMLQuantizationType[types[name]]),
                                       gguf.GGMLQuantizationType[types[name]])
            back = torch.from_numpy(np.asarray(q, dtype=np.float32))
            back = unpermute(back, heads) if p is not want else back
            assert torch.equal(ours[name], back), name


def test_tokenizer_comes_back(written, tmp_path: Path) -> None:
    _, path, _, original = written
    out = convert_gguf(path, tmp_path / "conv")
    tok = load_tokenizer(out)
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == [1] + original.encode(text).ids, text       # add_bos_token: BOS first
        assert tok.decode(ids) == text.replace("<|im_start|>", "")
    assert tok.encode("12", add_special_tokens=False) == original.encode("12").ids   # digits split alone
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == TEMPLATE and config["bos_token"] == "<|im_start|>"
    assert render_chat(out, [{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_other_tools_load_the_folder(written, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    folder, path, _, original = written
    out = convert_gguf(path, tmp_path / "conv")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == load_tokenizer(out).encode(text), text
    assert hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                      add_generation_prompt=True) == render_chat(out, [{"role": "user", "content": "hi"}])
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 9, 200]])).logits[0, -1]
    ours = load_model(out).prefill([1, 5, 9, 200], *_pool(load_model(out)))
    torch.testing.assert_close(ours, logits, rtol=1e-4, atol=1e-4)


def _pool(model) -> tuple:
    layout = model.kv_layout(4, 16)
    return torch.zeros(layout.region_nbytes(), dtype=torch.uint8), layout, [0, 1, 2, 3]


def _tensor_offset(path: Path, name: str) -> int:
    reader = gguf.GGUFReader(str(path))
    t = next(t for t in reader.tensors if t.name == name)
    return int(t.data_offset)


def test_damaged_files_are_refused_by_name(written, tmp_path: Path) -> None:
    folder, path, _, tok = written
    data = path.read_bytes()
    corrupt = tmp_path / "corrupt.gguf"       # NaN bytes over the start of an F32 tensor
    at = _tensor_offset(path, "blk.1.attn_norm.weight")
    corrupt.write_bytes(data[:at] + b"\xff" * 16 + data[at + 16:])
    with pytest.raises(InvalidArgumentError, match=r"tensor 'blk.1.attn_norm.weight' \(F32\) holds 4 NaN/Inf"):
        convert_gguf(corrupt, tmp_path / "a")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[:-100])
    with pytest.raises(InvalidArgumentError, match=r"truncated.gguf.*truncated"):
        convert_gguf(truncated, tmp_path / "b")
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(data[:64])
    with pytest.raises(InvalidArgumentError, match=r"header.gguf' \(64 bytes\) is not a readable GGUF file"):
        convert_gguf(header_only, tmp_path / "c")
    odd = tmp_path / "q5.gguf"
    write_gguf(folder, odd, tok, override={"model.layers.0.mlp.up_proj.weight": "Q5_0"})
    with pytest.raises(InvalidArgumentError, match=r"tensor 'blk.0.ffn_up.weight' is Q5_0; supported types"):
        convert_gguf(odd, tmp_path / "d")
    assert not any((tmp_path / d).exists() and any((tmp_path / d).iterdir()) for d in "abcd")  # nothing half-written
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(InvalidArgumentError, match="not an empty folder"):
        convert_gguf(path, tmp_path / "full")
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        convert_gguf(tmp_path / "nowhere.gguf", tmp_path / "e")


def test_convert_command(written, tmp_path: Path) -> None:
    _, path, _, _ = written
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[:-100])
    cmd = [sys.executable, "-m", "kvtransfer.model", "convert"]
    bad = subprocess.run([*cmd, str(truncated), str(tmp_path / "bad")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "truncated" in bad.stderr, bad.stderr
    good = subprocess.run([*cmd, str(path), str(tmp_path / "good")], capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stderr
    assert sorted(p.name for p in (tmp_path / "good").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def test_a_worker_refuses_a_damaged_gguf(written, tmp_path: Path) -> None:
    """--model FILE.gguf: a truncated file stops the worker with one line naming it."""
    from worker_support import run_refused

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(written[1].read_bytes()[:-100])
    status, stderr = run_refused("prefill_worker", "--model", str(truncated), "--control", "tcp://127.0.0.1:0")
    last = stderr.strip().splitlines()[-1]
    assert status == 2 and "Traceback" not in stderr, stderr
    assert last.startswith("prefill_worker: error: ") and "truncated.gguf" in last, stderr
