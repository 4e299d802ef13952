"""What a model folder's ``config.json`` says, checked, in one frozen dataclass.

Accepted architectures: ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``MistralForCausalLM``
(one decoder with three sets of defaults). Both spellings of the RoPE settings are read:
Transformers 4's ``rope_theta`` + ``rope_scaling`` and Transformers 5's ``rope_parameters``.
Anything this decoder would compute differently from Transformers is refused here, with
the key and its value in the message, rather than run wrong.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError

#: architecture name in ``config.json`` -> the ``model_type`` it implies.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}

#: RoPE variants computed here (``rope_type`` or the older ``type`` key).
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")

_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding settings.

    ``kind`` is one of :data:`ROPE_TYPES`; ``theta`` the base; ``factor`` the scaling factor
    (1.0 when unscaled); ``original_max_position_embeddings`` the pre-scaling context
    (llama3, yarn); ``low_freq_factor``/``high_freq_factor`` (llama3);
    ``beta_fast``/``beta_slow``/``attention_factor``/``mscale``/``mscale_all_dim``/``truncate``
    (yarn; ``attention_factor`` None means "derive it from factor").
    """

    kind: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class ModelConfig:
    """One decoder's shape and numerics.

    Sizes are counts (``head_dim`` in elements); ``sliding_windows[i]`` is layer ``i``'s
    window in tokens (a query at position p sees keys at positions p-window+1..p) or
    None for full attention. ``qkv_bias``/``o_bias``/``mlp_bias`` say which projections
    carry a bias (Llama: ``attention_bias`` gives q, k, v and o; Qwen2: q, k, v always;
    Mistral: none). ``dtype`` is the checkpoint's declared dtype name (``"float32"``,
    ``"float16"`` or ``"bfloat16"``). ``eos_token_ids`` may hold several ids (Llama 3).
    """

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_windows: tuple[int | None, ...] = ()
    dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_folder(cls, path: str | Path) -> "ModelConfig":
        """Reads ``<path>/config.json``; :class:`InvalidArgumentError` for a missing folder,
        a missing or malformed file, or settings this decoder does not implement."""
        folder = Path(path)
        if not folder.is_dir():
            raise InvalidArgumentError(f"model folder {str(folder)!r} does not exist or is not a folder",
                                       op="load_model")
        file = folder / "config.json"
        if not file.is_file():
            raise InvalidArgumentError(f"{str(file)!r} is missing: a model folder needs config.json",
                                       op="load_model")
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidArgumentError(f"{str(file)!r} is not valid JSON: {e}", op="load_model") from None
        if not isinstance(raw, dict):
            raise InvalidArgumentError(f"{str(file)!r} must hold a JSON object, not {type(raw).__name__}",
                                       op="load_model")
        try:
            return cls.from_dict(raw)
        except InvalidArgumentError as e:
            raise InvalidArgumentError(f"{str(file)!r}: {e}", op="load_model") from None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """Parses the contents of a ``config.json`` (see :meth:`from_folder`)."""
        archs = raw.get("architectures")
        if not isinstance(archs, list) or not archs:
            raise InvalidArgumentError(
                f"'architectures' must be a non-empty list (one of {sorted(ARCHITECTURES)}), got {archs!r}",
                op="load_model")
        arch = archs[0]
        if arch not in ARCHITECTURES:
            raise InvalidArgumentError(
                f"unsupported architecture {arch!r}: this decoder runs {', '.join(sorted(ARCHITECTURES))}",
                op="load_model")
        model_type = ARCHITECTURES[arch]

        hidden = _int(raw, "hidden_size")
        heads = _int(raw, "num_attention_heads")
        kv_heads = _int(raw, "num_key_value_heads", heads)
        head_dim = raw.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise InvalidArgumentError(
                    f"hidden_size {hidden} is not a multiple of num_attention_heads {heads} and no head_dim is given",
                    op="load_model")
            head_dim = hidden // heads
        else:
            head_dim = _int(raw, "head_dim")
        if heads % kv_heads:
            raise InvalidArgumentError(
                f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}", op="load_model")
        if head_dim % 2:
            raise InvalidArgumentError(f"head_dim {head_dim} must be even for RoPE", op="load_model")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise InvalidArgumentError(f"hidden_act {act!r} is not supported (only 'silu': SwiGLU)",
                                       op="load_model")
        layers = _int(raw, "num_hidden_layers")
        max_pos = _int(raw, "max_position_embeddings", 2048)

        if model_type == "llama":
            qkv_bias = o_bias = bool(raw.get("attention_bias", False))
            mlp_bias = bool(raw.get("mlp_bias", False))
        elif model_type == "qwen2":
            # Qwen2 always has q/k/v biases and never an o_proj or MLP bias.
            qkv_bias, o_bias, mlp_bias = True, False, False
        else:
            qkv_bias = o_bias = mlp_bias = False

        dtype = raw.get("torch_dtype", raw.get("dtype")) or "float32"
        if dtype not in _DTYPES:
            raise InvalidArgumentError(f"dtype {dtype!r} is not supported (one of {_DTYPES})", op="load_model")

        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            architecture=arch, model_type=model_type,
            vocab_size=_int(raw, "vocab_size"), hidden_size=hidden,
            intermediate_size=_int(raw, "intermediate_size"), num_layers=layers,
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            max_position_embeddings=max_pos,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=_rope(raw, head_dim, max_pos),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias,
            sliding_windows=_sliding_windows(raw, model_type, layers),
            dtype=dtype, bos_token_id=raw.get("bos_token_id"), eos_token_ids=eos_ids,
        )


def _int(raw: dict[str, Any], key: str, default: int | None = None) -> int:
    value = raw.get(key, default)
    if value is None:
        raise InvalidArgumentError(f"{key!r} is missing", op="load_model")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidArgumentError(f"{key!r} must be a positive integer, got {value!r}", op="load_model")
    return value


def _float(params: dict[str, Any], key: str, default: float | None) -> float:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgumentError(f"rope setting {key!r} must be a number, got {value!r}", op="load_model")
    return float(value)


def _rope(raw: dict[str, Any], head_dim: int, max_pos: int) -> RopeConfig:
    # Transformers 5 writes one "rope_parameters" dict (rope_theta inside); 4 writes
    # "rope_theta" beside an optional "rope_scaling". Either may be null.
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise InvalidArgumentError(f"rope settings must be an object, got {params!r}", op="load_model")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise InvalidArgumentError(
            f"unsupported rope scaling type {kind!r} (supported: {', '.join(ROPE_TYPES)})", op="load_model")
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise InvalidArgumentError(f"partial_rotary_factor {partial!r} is not supported (only 1.0)",
                                   op="load_model")
    theta = _float(params, "rope_theta", raw.get("rope_theta", 10000.0))
    if kind == "default":
        return RopeConfig(kind=kind, theta=theta)
    factor = _float(params, "factor", None)
    if factor < 1.0 and kind != "linear":
        raise InvalidArgumentError(f"rope scaling factor {factor} must be >= 1 for {kind!r}", op="load_model")
    # A top-level original_max_position_embeddings wins (Phi-3 style), as in Transformers.
    orig = raw.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") or max_pos
    common = dict(kind=kind, theta=theta, factor=factor, original_max_position_embeddings=int(orig))
    if kind == "llama3":
        low = _float(params, "low_freq_factor", None)
        high = _float(params, "high_freq_factor", None)
        if high <= low:
            raise InvalidArgumentError(f"llama3 rope: high_freq_factor {high} must exceed low_freq_factor {low}",
                                       op="load_model")
        return RopeConfig(low_freq_factor=low, high_freq_factor=high, **common)
    if kind == "yarn":
        optional = {k: (None if params.get(k) is None else _float(params, k, None))
                    for k in ("attention_factor", "mscale", "mscale_all_dim")}
        return RopeConfig(beta_fast=float(params.get("beta_fast") or 32.0),
                          beta_slow=float(params.get("beta_slow") or 1.0),
                          truncate=bool(params.get("truncate", True)), **optional, **common)
    return RopeConfig(**common)


def _sliding_windows(raw: dict[str, Any], model_type: str, layers: int) -> tuple[int | None, ...]:
    window = raw.get("sliding_window")
    if model_type == "llama" or window is None:
        return (None,) * layers
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise InvalidArgumentError(f"'sliding_window' must be a positive integer or null, got {window!r}",
                                   op="load_model")
    if model_type == "mistral":
        return (window,) * layers
    # Qwen2: the window is used only when use_sliding_window is set, and then only on the
    # layers that layer_types marks (default: layers from max_window_layers on).
    if not raw.get("use_sliding_window", False):
        return (None,) * layers
    types = raw.get("layer_types")
    if types is None:
        first = raw.get("max_window_layers", 28)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    if len(types) != layers or any(t not in ("sliding_attention", "full_attention") for t in types):
        raise InvalidArgumentError(f"'layer_types' must list {layers} of 'sliding_attention'/'full_attention', "
                                   f"got {types!r}", op="load_model")
    return tuple(window if t == "sliding_attention" else None for t in types)
