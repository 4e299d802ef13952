"""The model both workers run: a Llama-family decoder over a paged KV pool.

- :func:`load_model` (``config.json`` + ``*.safetensors``) -> :class:`Model`, with
  :meth:`Model.kv_layout`, :meth:`Model.prefill` (a prompt -> its KV blocks, layer by layer)
  and :meth:`Model.decode` (one token for each of B sequences, each with its block table).
- :func:`sample` — greedy or temperature/top-p next-token choice.
- :func:`load_tokenizer` — ``tokenizer.json`` through ``tokenizers``, else byte-level.
- :func:`make_random_model` / :func:`default_model_dir` — seeded random models written as
  real folders, so everything runs offline.
- :func:`convert_gguf` / :func:`resolve_model` — a llama.cpp GGUF file as a folder (the
  default model, SmolLM2-135M-Instruct, comes as one); :mod:`.chat` — chat templates.

Runtime dependencies: ``torch``, ``safetensors``; ``tokenizers`` only for folders with a
``tokenizer.json``; ``gguf`` only for GGUF files.
"""

from .config import ARCHITECTURES, ROPE_TYPES, ModelConfig, RopeConfig
from .convert import convert_gguf, gguf_model_dir
from .decoder import Model, load_model
from .default_model import resolve_model
from .random_model import default_model_dir, make_random_model, random_config
from .sampling import sample
from .tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "ARCHITECTURES", "ROPE_TYPES", "ModelConfig", "RopeConfig", "Model", "load_model", "sample",
    "Tokenizer", "ByteTokenizer", "load_tokenizer", "make_random_model", "random_config", "default_model_dir",
    "convert_gguf", "gguf_model_dir", "resolve_model",
]
