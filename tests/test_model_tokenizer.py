"""Tokenizers (byte-level and tokenizer.json) and sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvtransfer.errors import InvalidArgumentError
from kvtransfer.model import ByteTokenizer, load_tokenizer, sample


def test_byte_tokenizer_round_trip(tmp_path: Path) -> None:
    tok = load_tokenizer(tmp_path)  # no tokenizer.json: byte-level
    assert isinstance(tok, ByteTokenizer)
    assert (tok.bos_token_id, tok.eos_token_id, tok.eos_token_ids) == (256, 257, frozenset({257}))
    text = "héllo, wörld ✓"
    ids = tok.encode(text)
    assert ids[0] == 256 and ids[1:] == list(text.encode("utf-8"))
    assert tok.encode(text, add_special_tokens=False) == ids[1:]
    assert tok.decode(ids + [257, 300]) == text
    assert tok.decode([0xE2, 0x9C, 104]) == "\ufffdh"   # a cut multi-byte character is replaced
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")


def _write_tokenizer_json(folder: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizer.json is read with the tokenizers package")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(folder / "tokenizer.json"))


def test_tokenizer_json(tmp_path: Path) -> None:
    _write_tokenizer_json(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>",
                                                                "eos_token": {"content": "</s>"}}))
    tok = load_tokenizer(tmp_path)
    assert not isinstance(tok, ByteTokenizer)
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)     # from tokenizer_config.json's strings
    ids = tok.encode("the lazy fox")
    assert ids[0] == 0 and len(ids) < len("the lazy fox")    # BOS, then merged tokens
    assert tok.decode(ids) == "the lazy fox"
    assert tok.encode("the lazy fox", add_special_tokens=False) == ids[1:]
    # config.json wins over tokenizer_config.json, generation_config.json over both.
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [5, 6], "bos_token_id": 0}))
    assert load_tokenizer(tmp_path).eos_token_ids == frozenset({5, 6})
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert load_tokenizer(tmp_path).eos_token_id == 7
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(InvalidArgumentError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_sample_greedy_and_seeded() -> None:
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    assert sample(logits).tolist() == [1, 0]                    # ties: the lowest id
    assert sample(logits[0]).item() == 1 and sample(logits[0]).dim() == 0
    wide = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    draw = [sample(wide, 1.0, 0.9, torch.Generator().manual_seed(s)).tolist() for s in (5, 5, 6)]
    assert draw[0] == draw[1] != draw[2]
    # top_p this small keeps only the most likely token, whatever the temperature.
    assert sample(wide, 5.0, 1e-6, torch.Generator().manual_seed(1)).tolist() == wide.argmax(-1).tolist()


def test_sample_top_p_keeps_the_nucleus() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    seen = {int(sample(logits, 1.0, 0.8, g)) for _ in range(300)}
    assert seen == {0, 1}                                       # 0.5 + 0.3 reaches 0.8
    seen = {int(sample(logits, 1.0, 1.0, g)) for _ in range(300)}
    assert seen == {0, 1, 2, 3}


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_sample_refusals(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        sample(torch.zeros(4), **kwargs)
