"""Reading a folder's ``*.safetensors`` weights, strictly.

A folder holds either ``model.safetensors.index.json`` (``weight_map``: tensor name ->
shard file) or one or more ``*.safetensors`` files read as one set. Every tensor the
config implies must be present with the expected shape; an unexpected tensor is refused
too (it usually means the config does not describe these weights), except the few that
Transformers ignores as well: ``*.rotary_emb.inv_freq`` and ``lm_head.weight`` of a model
with tied embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import InvalidArgumentError
from .config import ModelConfig

INDEX = "model.safetensors.index.json"


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Tensor name (Hugging Face naming) -> shape, for every weight ``cfg`` implies."""
    h, kv, q = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, cfg.num_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h),
                                          "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (cfg.intermediate_size, h),
            p + "mlp.up_proj.weight": (cfg.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, cfg.intermediate_size),
        })
        if cfg.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if cfg.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if cfg.mlp_bias:
            shapes.update({p + "mlp.gate_proj.bias": (cfg.intermediate_size,),
                           p + "mlp.up_proj.bias": (cfg.intermediate_size,), p + "mlp.down_proj.bias": (h,)})
    return shapes


def _ignorable(name: str, cfg: ModelConfig) -> bool:
    return name.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and name == "lm_head.weight")


def _shard_files(folder: Path) -> dict[str, list[str] | None]:
    """File -> the tensor names the index places there (None: whatever the file holds)."""
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise InvalidArgumentError(f"{str(index)!r} is malformed: {e}", op="load_model") from None
        files: dict[str, list[str] | None] = {}
        for name, file in weight_map.items():
            files.setdefault(file, []).append(name)  # type: ignore[union-attr]
        for file in files:
            if not (folder / file).is_file():
                raise InvalidArgumentError(f"{str(index)!r} names shard {file!r}, which is missing", op="load_model")
        return files
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    if not found:
        other = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" (found {', '.join(other)}: only safetensors are read)" if other else ""
        raise InvalidArgumentError(f"no *.safetensors weights in {str(folder)!r}{hint}", op="load_model")
    return {name: None for name in found}


def load_weights(folder: str | Path, cfg: ModelConfig, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of ``expected_shapes(cfg)``, converted to ``dtype`` on ``device``.

    Raises :class:`InvalidArgumentError` naming the tensor for a missing tensor, a shape
    different from the config's (both shapes given), an unexpected tensor, or an
    unreadable file.
    """
    from safetensors import SafetensorError, safe_open  # runtime dependency, imported where used

    folder = Path(folder)
    expected = expected_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    for file, names in _shard_files(folder).items():
        path = folder / file
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                present = set(f.keys())
                for name in (names if names is not None else sorted(present)):
                    if name not in present:
                        raise InvalidArgumentError(f"tensor {name!r} is listed in {INDEX} but missing from {file!r}",
                                                   op="load_model")
                    if name not in expected:
                        if _ignorable(name, cfg):
                            continue
                        raise InvalidArgumentError(
                            f"unexpected tensor {name!r} in {file!r}: config.json does not describe these weights "
                            f"({cfg.architecture}, {cfg.num_layers} layers)", op="load_model")
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != expected[name]:
                        raise InvalidArgumentError(
                            f"tensor {name!r} in {file!r} has shape {list(shape)}, config.json implies "
                            f"{list(expected[name])}", op="load_model")
                    out[name] = f.get_tensor(name).to(device=device, dtype=dtype)
        except (SafetensorError, OSError) as e:
            raise InvalidArgumentError(f"cannot read {str(path)!r}: {e}", op="load_model") from None
    missing = [n for n in expected if n not in out]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise InvalidArgumentError(
            f"missing tensor(s) {', '.join(repr(n) for n in missing[:5])}{more} in {str(folder)!r} "
            f"(expected shape of the first: {list(expected[missing[0]])})", op="load_model")
    return out
