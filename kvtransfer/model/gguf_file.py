"""A llama.cpp GGUF file read as a Hugging Face checkpoint: ``config.json`` and tensors.

The file is read with the ``gguf`` package (llama.cpp's own reader): metadata, tensor
records, and ``gguf.quants.dequantize`` for the tensor types of :data:`SUPPORTED_TYPES`.
llama.cpp renames the tensors (``blk.3.attn_q.weight`` is ``model.layers.3.self_attn.
q_proj.weight``) and, for the ``llama`` architecture, permutes the rows of q and k within
each head so its rotary embedding can pair adjacent elements (GPT-J style); they are put
back in Transformers' order (pairs half a head apart) here. ``qwen2`` files are written
unpermuted (llama.cpp runs them NEOX style) and read as they are.

Every tensor is checked: its shape against the metadata's, its values for NaN/Inf after
dequantization (a flipped scale byte shows up there; GGUF carries no checksums), and a
file that ends early is refused before any tensor is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InvalidArgumentError
from .config import ModelConfig
from .weights import expected_shapes

#: ``gguf`` tensor types read here (dequantized to float32).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")

#: ``general.architecture`` -> (Transformers architecture, whether llama.cpp permuted q/k).
_ARCHS = {"llama": ("LlamaForCausalLM", True), "qwen2": ("Qwen2ForCausalLM", False)}

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}


def open_gguf(path: str | Path) -> Any:
    """``gguf.GGUFReader`` over ``path`` (memory-mapped, read-only);
    :class:`InvalidArgumentError` for a missing, truncated or malformed file."""
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF files are read with the 'gguf' package: pip install gguf") from None
    file = Path(path)
    if not file.is_file():
        raise InvalidArgumentError(f"GGUF file {str(file)!r} does not exist", op="read_gguf")
    size = file.stat().st_size
    try:
        reader = gguf.GGUFReader(file, "r")
    except (ValueError, IndexError, KeyError, OSError) as e:  # what the reader raises on bytes it cannot parse
        raise InvalidArgumentError(f"{str(file)!r} ({size} bytes) is not a readable GGUF file, truncated or "
                                   f"corrupted: {e}", op="read_gguf") from None
    # gguf 0.19 already raises on a tensor cut short; should a reader map one anyway, this
    # still refuses the file, naming the tensor.
    for t in reader.tensors:
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise InvalidArgumentError(f"{str(file)!r} is truncated: tensor {t.name!r} ends at byte "
                                       f"{int(t.data_offset) + int(t.n_bytes)}, the file at {size}", op="read_gguf")
    return reader


def metadata(reader: Any, key: str, default: Any = None) -> Any:
    """The value of metadata ``key`` (a str, number, bool or list), else ``default``."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader: Any, file: str | Path = "") -> dict[str, Any]:
    """The ``config.json`` contents that describe the file's model (dtype float32: the
    weights are dequantized). :class:`InvalidArgumentError` for an architecture or
    setting the decoder does not run."""
    arch = metadata(reader, "general.architecture")
    if arch not in _ARCHS:
        raise InvalidArgumentError(f"{str(file)!r}: GGUF architecture {arch!r} is not supported "
                                   f"(one of {', '.join(_ARCHS)})", op="read_gguf")

    def need(key: str) -> Any:
        value = metadata(reader, f"{arch}.{key}")
        if value is None:
            raise InvalidArgumentError(f"{str(file)!r}: metadata {arch}.{key} is missing", op="read_gguf")
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(metadata(reader, f"{arch}.attention.key_length", hidden // heads))
    rope_dim = int(metadata(reader, f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise InvalidArgumentError(f"{str(file)!r}: rope.dimension_count {rope_dim} != head dim {head_dim} "
                                   "(partial rotary embeddings are not supported)", op="read_gguf")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise InvalidArgumentError(f"{str(file)!r}: per-frequency RoPE factors (rope_freqs.weight, Llama 3.1 "
                                   "style) are not supported", op="read_gguf")
    tokens = metadata(reader, "tokenizer.ggml.tokens") or []
    cfg: dict[str, Any] = {
        "architectures": [_ARCHS[arch][0]], "model_type": arch,
        "vocab_size": int(metadata(reader, f"{arch}.vocab_size", len(tokens))),
        "hidden_size": hidden, "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(metadata(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim, "hidden_act": "silu",
        "max_position_embeddings": int(metadata(reader, f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(metadata(reader, f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names, "torch_dtype": "float32",
    }
    scaling = metadata(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        cfg["rope_scaling"] = {"rope_type": scaling, "factor": float(need("rope.scaling.factor"))}
        orig = metadata(reader, f"{arch}.rope.scaling.original_context_length")
        if orig:
            cfg["rope_scaling"]["original_max_position_embeddings"] = int(orig)
    if arch == "llama":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in names
        cfg["mlp_bias"] = False
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        value = metadata(reader, f"tokenizer.ggml.{key}")
        if value is not None:
            cfg[key.replace("padding", "pad")] = int(value)
    try:
        ModelConfig.from_dict(cfg)
    except InvalidArgumentError as e:
        raise InvalidArgumentError(f"{str(file)!r}: {e}", op="read_gguf") from None
    return cfg


def hf_name(name: str) -> str | None:
    """llama.cpp's tensor name -> Transformers', or None for a name it does not map."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undoes llama.cpp's q/k row order: within each of ``heads`` heads, rows (0, d/2, 1,
    d/2+1, ...) -> (0, 1, ..., d-1), for a [heads * d, ...] weight or bias."""
    d = w.shape[0] // heads
    return w.reshape(heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order (its ``convert_hf_to_gguf.py`` ``permute``): the inverse
    of :func:`unpermute`. Used to write test files."""
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(reader: Any, cfg: dict[str, Any], file: str | Path = "") -> dict[str, torch.Tensor]:
    """Every tensor, under Transformers' name, dequantized to float32 and in Transformers'
    row order; shapes checked against ``cfg`` (from :func:`gguf_config`). Raises
    :class:`InvalidArgumentError` naming the tensor for an unknown name, an unsupported
    type, a wrong shape, NaN/Inf values, or a missing tensor."""
    from gguf import quants

    model_cfg = ModelConfig.from_dict(cfg)
    expected = expected_shapes(model_cfg)
    permuted = _ARCHS[cfg["model_type"]][1]
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None or name not in expected:
            raise InvalidArgumentError(f"{str(file)!r}: unexpected tensor {t.name!r} for a "
                                       f"{model_cfg.num_layers}-layer {cfg['model_type']} model", op="read_gguf")
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise InvalidArgumentError(f"{str(file)!r}: tensor {t.name!r} is {t.tensor_type.name}; supported types: "
                                       f"{', '.join(SUPPORTED_TYPES)}", op="read_gguf")
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists the fastest-varying dimension first
        if shape != expected[name]:
            raise InvalidArgumentError(f"{str(file)!r}: tensor {t.name!r} has shape {list(shape)}, the metadata "
                                       f"implies {list(expected[name])}", op="read_gguf")
        values = np.asarray(quants.dequantize(np.asarray(t.data), t.tensor_type), dtype=np.float32)
        w = torch.from_numpy(values.reshape(shape).copy())
        if not torch.isfinite(w).all():
            bad = int((~torch.isfinite(w)).sum())
            raise InvalidArgumentError(f"{str(file)!r}: tensor {t.name!r} ({t.tensor_type.name}) holds {bad} "
                                       "NaN/Inf values after dequantization: the file is corrupted", op="read_gguf")
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute(w, model_cfg.num_heads)
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute(w, model_cfg.num_kv_heads)
        out[name] = w
    missing = [n for n in expected if n not in out]
    if missing:
        raise InvalidArgumentError(f"{str(file)!r}: missing tensor(s) {', '.join(map(repr, missing[:5]))}"
                                   f"{' ...' if len(missing) > 5 else ''}", op="read_gguf")
    return out
