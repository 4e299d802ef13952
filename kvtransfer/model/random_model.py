"""Small seeded random models, written as real Hugging Face-style folders.

``make_random_model(folder)`` writes ``config.json`` and ``model.safetensors`` (or shards
with an index), which are then read through the same loader as a downloaded checkpoint —
and by Transformers, which is how the tests check this decoder. The byte-level
tokenizer serves them (no ``tokenizer.json``), so the vocabulary is at least 258.

The weights are not trained, but scaled so that the model is not degenerate: attention
is sharp enough to depend on positions and context, and logits spread wide enough that
greedy argmax is far from ties (so two correct implementations agree token for token).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import InvalidArgumentError
from .config import ModelConfig
from .tokenizer import BYTE_BOS, BYTE_EOS, BYTE_VOCAB
from .weights import INDEX, expected_shapes

#: Bumped whenever the weights a seed produces change, so cached folders are rebuilt.
GENERATOR_VERSION = 2

_ARCHS = {
    "llama": ("LlamaForCausalLM", {"attention_bias": False, "mlp_bias": False}),
    "qwen2": ("Qwen2ForCausalLM", {"use_sliding_window": False, "sliding_window": None, "max_window_layers": 0}),
    "mistral": ("MistralForCausalLM", {"sliding_window": None}),
}

_DEFAULTS: dict[str, Any] = {
    "vocab_size": 384, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32, "hidden_act": "silu",
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "bos_token_id": BYTE_BOS, "eos_token_id": BYTE_EOS,
    "torch_dtype": "float32", "initializer_range": 0.02,
}

# Standard deviations by tensor kind. q/k are larger than usual so attention is not
# uniform; the output head is larger so logits spread over several units.
_STD = {"embed_tokens": 1.0, "lm_head": 0.12, "q_proj": 0.12, "k_proj": 0.12, "v_proj": 0.06,
        "o_proj": 0.04, "gate_proj": 0.06, "up_proj": 0.06, "down_proj": 0.04}


def random_config(arch: str = "llama", **overrides: Any) -> dict[str, Any]:
    """The ``config.json`` contents of a random model of ``arch`` ("llama", "qwen2",
    "mistral"), with ``overrides`` (any config.json key) applied last."""
    if arch not in _ARCHS:
        raise InvalidArgumentError(f"unknown arch {arch!r} (one of {', '.join(_ARCHS)})", op="make_random_model")
    name, extra = _ARCHS[arch]
    cfg = {"architectures": [name], "model_type": arch, **_DEFAULTS, **extra, **overrides}
    if cfg["vocab_size"] < BYTE_VOCAB:
        raise InvalidArgumentError(f"vocab_size {cfg['vocab_size']} < {BYTE_VOCAB}: the byte-level tokenizer "
                                   "needs 256 bytes plus BOS and EOS", op="make_random_model")
    return cfg


def _init(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        # Norm gains around 1, not exactly 1, so a mix-up of the two norms shows.
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if name.endswith(".bias"):
        return 0.1 * torch.randn(shape, generator=g)
    kind = name.split(".")[-2] if name.count(".") >= 2 else name.split(".")[0]
    return _STD[kind] * torch.randn(shape, generator=g)


def make_random_model(folder: str | Path, seed: int = 0, arch: str = "llama", *, num_shards: int = 1,
                      **overrides: Any) -> Path:
    """Writes a random model to ``folder`` (created if needed) and returns its path.

    Same ``seed``, ``arch`` and ``overrides`` -> the same bytes. Defaults: 4 layers,
    hidden 256, 8 attention heads, 2 KV heads, head_dim 32, intermediate 512, vocab 384,
    2048 positions, float32 (``torch_dtype="bfloat16"`` writes bfloat16). ``num_shards`` > 1
    writes ``model-0000i-of-0000n.safetensors`` files and ``model.safetensors.index.json``.
    """
    from safetensors.torch import save_file  # runtime dependency, imported where used

    raw = random_config(arch, **overrides)
    cfg = ModelConfig.from_dict(raw)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[cfg.dtype]
    g = torch.Generator().manual_seed(seed)
    tensors = {name: _init(name, shape, g) for name, shape in expected_shapes(cfg).items()}
    if "lm_head.weight" in tensors:
        # Output rows of bytes other than printable ASCII shrink, so greedy text from a
        # random model is readable characters rather than control bytes (noise still).
        quiet = torch.ones(cfg.vocab_size, 1)
        quiet[:32] = quiet[127:] = 0.25
        tensors["lm_head.weight"] *= quiet
    tensors = {name: t.to(dtype).contiguous() for name, t in tensors.items()}
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    if num_shards <= 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    names = list(tensors)
    weight_map: dict[str, str] = {}
    for s in range(num_shards):
        file = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::num_shards]}
        save_file(part, str(out / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2),
                             encoding="utf-8")
    return out


def cache_root() -> Path:
    """``$KVTRANSFER_CACHE``, else ``$XDG_CACHE_HOME/kvtransfer``, else ``~/.cache/kvtransfer``."""
    if os.environ.get("KVTRANSFER_CACHE"):
        return Path(os.environ["KVTRANSFER_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "kvtransfer"


def build_once(folder: Path, write: Callable[[Path], object]) -> Path:
    """``folder``, written by ``write(empty_folder)`` first unless it holds a config.json.
    Safe when several processes ask at once: each writes a private folder and renames it
    into place; the first rename wins."""
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def default_model_dir(seed: int = 0) -> Path:
    """The folder of the seeded random Llama (``--model random``) under :func:`cache_root`,
    written on first use (:func:`build_once`)."""
    folder = cache_root() / "models" / f"random-llama-seed{seed}-v{GENERATOR_VERSION}"
    return build_once(folder, lambda tmp: make_random_model(tmp, seed=seed))
