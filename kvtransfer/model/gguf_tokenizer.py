"""A GGUF file's tokenizer, rebuilt as a ``tokenizers.Tokenizer`` (``tokenizer.json``).

Byte-level BPE files (``tokenizer.ggml.model = "gpt2"``: GPT-2, SmolLM, Llama 3, Qwen2)
carry the vocabulary, the merges, each token's type (3: control, a special token; 4:
user-defined, matched whole) and the name of llama.cpp's pre-tokenizer
(``tokenizer.ggml.pre``), which is mapped to the split the vocabulary was trained with
(:data:`PRE_TOKENIZERS`, the regexes of llama.cpp's ``llama-vocab.cpp``). BOS is
prepended when ``tokenizer.ggml.add_bos_token`` says so. SentencePiece files
(``"llama"``) and unknown pre-tokenizers are refused, by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError
from .gguf_file import metadata

_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")

#: ``tokenizer.ggml.pre`` -> how text is split before BPE: "gpt2" (GPT-2's regex),
#: "digits" (each digit alone, then GPT-2's regex), or a regex used in place of GPT-2's.
PRE_TOKENIZERS: dict[str, str] = {
    "default": "gpt2", "gpt2": "gpt2", "gpt-2": "gpt2", "olmo": "gpt2", "jais": "gpt2",
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"), "digits"),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2),
}

_CONTROL, _USER_DEFINED = 3, 4


def _pre_tokenizer(pre: str, file: str | Path) -> Any:
    from tokenizers import Regex, pre_tokenizers

    split = PRE_TOKENIZERS.get(pre)
    if split is None:
        raise InvalidArgumentError(f"{str(file)!r}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not known here "
                                   f"(known: {', '.join(sorted(PRE_TOKENIZERS))})", op="read_gguf")
    if split == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split == "digits":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _token(reader: Any, key: str, tokens: list[str]) -> str | None:
    i = metadata(reader, f"tokenizer.ggml.{key}")
    return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None


def gguf_tokenizer(reader: Any, file: str | Path = "") -> tuple[Any, dict[str, Any]]:
    """(``tokenizers.Tokenizer``, ``tokenizer_config.json`` contents with the special
    tokens, the BOS/EOS flags, the chat template and ``model_max_length``)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = metadata(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise InvalidArgumentError(f"{str(file)!r}: tokenizer model {kind!r} (tokenizer.ggml.model) is not "
                                   "supported: only byte-level BPE ('gpt2')", op="read_gguf")
    tokens: list[str] = metadata(reader, "tokenizer.ggml.tokens") or []
    merges: list[str] = metadata(reader, "tokenizer.ggml.merges") or []
    types: list[int] = metadata(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if not tokens or not merges or len(types) != len(tokens):
        raise InvalidArgumentError(f"{str(file)!r}: the BPE vocabulary is incomplete ({len(tokens)} tokens, "
                                   f"{len(merges)} merges, {len(types)} token types)", op="read_gguf")
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise InvalidArgumentError(f"{str(file)!r}: a merge is not two tokens separated by a space", op="read_gguf")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=pairs, fuse_unk=False,
                               byte_fallback=False, ignore_merges=False))
    tok.pre_tokenizer = _pre_tokenizer(str(metadata(reader, "tokenizer.ggml.pre", "default")), file)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED])

    bos, eos = _token(reader, "bos_token_id", tokens), _token(reader, "eos_token_id", tokens)
    add_bos = bool(metadata(reader, "tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(metadata(reader, "tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        ids = {t: tokens.index(t) for t in (bos, eos) if t is not None}
        single = " ".join([bos] * add_bos + ["$A"] + [eos] * add_eos)    # type: ignore[list-item]
        pair = " ".join([bos] * add_bos + ["$A"] + [eos] * add_eos + [bos] * add_bos + ["$B:1"] + [eos] * add_eos)
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                           special_tokens=list(ids.items()))
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos,
                              "add_eos_token": add_eos, "clean_up_tokenization_spaces": False}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        text = _token(reader, key, tokens)
        if text is not None:
            config[name] = text
    arch = metadata(reader, "general.architecture")
    context = metadata(reader, f"{arch}.context_length")
    if context:
        config["model_max_length"] = int(context)
    template = metadata(reader, "tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return tok, config
