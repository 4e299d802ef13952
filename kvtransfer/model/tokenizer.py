"""Text <-> token ids for a model folder.

A folder with ``tokenizer.json`` is read with the ``tokenizers`` package (the fast
tokenizer format every recent Hugging Face checkpoint ships). Without one, a byte-level
tokenizer: ids 0..255 are the bytes of the UTF-8 text, 256 is BOS and 257 EOS (the
random models of :mod:`kvtransfer.model.random_model` use it; their vocabularies are
larger, and ids past 257 decode to nothing).

BOS/EOS ids come from ``generation_config.json``, then ``config.json``, then the token
strings of ``tokenizer_config.json``, whichever names them first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, Sequence

from ..errors import InvalidArgumentError

BYTE_BOS = 256
BYTE_EOS = 257
BYTE_VOCAB = 258


class Tokenizer(Protocol):
    """What a worker needs of a tokenizer."""

    bos_token_id: int | None
    eos_token_id: int | None           # the first of eos_token_ids, None if there is none
    eos_token_ids: frozenset[int]      # every id that ends generation (Llama 3 has several)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus BOS (256) and EOS (257)."""

    def __init__(self) -> None:
        self.bos_token_id: int | None = BYTE_BOS
        self.eos_token_id: int | None = BYTE_EOS
        self.eos_token_ids = frozenset({BYTE_EOS})

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``text`` -> its UTF-8 bytes, after BOS when ``add_special_tokens``."""
        ids = list(text.encode("utf-8"))
        return [BYTE_BOS, *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Bytes back to text; invalid UTF-8 becomes U+FFFD; ids >= 256 are dropped."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizer.json`` read with the ``tokenizers`` package; BOS/EOS ids given."""

    def __init__(self, tokenizer: Any, bos: int | None, eos: Sequence[int]) -> None:
        self._tok = tokenizer
        self.bos_token_id = bos
        self.eos_token_ids = frozenset(eos)
        self.eos_token_id = eos[0] if eos else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``text`` -> ids, with the tokenizer's own special tokens (e.g. BOS) when asked."""
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """ids -> text (the tokenizer's decoder replaces invalid UTF-8 with U+FFFD)."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def read_json(file: Path, op: str = "load_tokenizer") -> dict[str, Any]:
    """A JSON object file of a model folder; {} when missing or not an object;
    :class:`InvalidArgumentError` (``op``) when it is not JSON."""
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidArgumentError(f"{str(file)!r} is not valid JSON: {e}", op=op) from None
    return data if isinstance(data, dict) else {}


def _ids(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer of a model folder: ``tokenizer.json`` if present, else byte-level."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidArgumentError(f"model folder {str(folder)!r} does not exist", op="load_tokenizer")
    file = folder / "tokenizer.json"
    if not file.is_file():
        return ByteTokenizer()
    try:
        from tokenizers import Tokenizer as _Tokenizer  # needed only for folders with tokenizer.json
    except ImportError:
        raise ImportError(f"{str(file)!r} is read with the 'tokenizers' package: pip install tokenizers") from None

    try:
        tok = _Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise InvalidArgumentError(f"cannot read {str(file)!r}: {e}", op="load_tokenizer") from None
    sources = [read_json(folder / "generation_config.json"), read_json(folder / "config.json")]
    special = read_json(folder / "tokenizer_config.json")

    def first(key: str, token_key: str) -> list[int]:
        for source in sources:
            if _ids(source.get(key)):
                return _ids(source.get(key))
        value = special.get(token_key)
        text = value.get("content") if isinstance(value, dict) else value
        found = tok.token_to_id(text) if isinstance(text, str) else None
        return [] if found is None else [found]

    bos = first("bos_token_id", "bos_token")
    return HFTokenizer(tok, bos[0] if bos else None, first("eos_token_id", "eos_token"))
