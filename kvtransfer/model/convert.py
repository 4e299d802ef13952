"""GGUF file -> Hugging Face-style folder, once: what the workers (and Transformers,
vLLM) load.

:func:`convert_gguf` writes ``config.json``, ``model.safetensors`` (float32, dequantized),
``tokenizer.json``, ``tokenizer_config.json`` (with the chat template) and
``generation_config.json``. :func:`gguf_model_dir` keeps one conversion per file content
under the cache (:func:`~kvtransfer.model.random_model.cache_root`), written to a private
folder and renamed into place (:func:`~kvtransfer.model.random_model.build_once`), so that
workers starting together never read a half-written folder.

    python -m kvtransfer.model convert FILE.gguf DIR
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import InvalidArgumentError
from .gguf_file import gguf_config, gguf_tensors, open_gguf
from .gguf_tokenizer import gguf_tokenizer
from .random_model import build_once, cache_root

#: Bumped whenever a conversion's output changes, so cached folders are rebuilt.
CONVERTER_VERSION = 1

_HEAD_BYTES = 16 << 20   # the header: metadata (vocabulary, merges) and tensor records


def convert_gguf(file: str | Path, folder: str | Path) -> Path:
    """Writes the folder equivalent of GGUF ``file`` to ``folder`` (created; it must be
    empty if it exists) and returns it. Raises :class:`InvalidArgumentError` for an
    unreadable, truncated or corrupted file (naming the tensor), or a model or tokenizer
    this package does not run."""
    from safetensors.torch import save_file

    out = Path(folder)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidArgumentError(f"{str(out)!r} exists and is not an empty folder", op="convert_gguf")
    reader = open_gguf(file)
    cfg = gguf_config(reader, file)
    tensors = gguf_tensors(reader, cfg, file)
    tokenizer, tok_config = gguf_tokenizer(reader, file)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    generation = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt", "converted_from": Path(file).name})
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n", encoding="utf-8")
    return out


def _digest(file: Path) -> str:
    # Content, not path or mtime: the header plus the size and the last MiB tell files apart
    # without hashing hundreds of MB at every start.
    size = file.stat().st_size
    h = hashlib.blake2b(f"{size}:{CONVERTER_VERSION}".encode(), digest_size=8)
    with open(file, "rb") as f:
        h.update(f.read(_HEAD_BYTES))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read())
    return h.hexdigest()


def gguf_model_dir(file: str | Path) -> Path:
    """The cached conversion of GGUF ``file`` (see :func:`convert_gguf`), made on first use."""
    src = Path(file)
    if not src.is_file():
        raise InvalidArgumentError(f"GGUF file {str(src)!r} does not exist", op="convert_gguf")
    folder = cache_root() / "models" / f"{src.stem}-{_digest(src)}"
    return build_once(folder, lambda tmp: convert_gguf(src, tmp))
