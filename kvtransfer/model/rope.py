"""Rotary position embeddings: inverse frequencies for each scaling type, and applying them.

The arithmetic follows Transformers' ``modeling_rope_utils`` step for step (same float32
operations in the same order), so that keys written here equal the keys Transformers
computes; that is what lets greedy tokens match it exactly.

``dynamic`` (NTK) scaling changes the frequencies only once a sequence grows past
``max_position_embeddings``; since this decoder refuses positions past that limit, it is
the unscaled RoPE here, exactly as Transformers computes it for such lengths.
"""

from __future__ import annotations

import math

import torch

from .config import RopeConfig


def inv_freq(rope: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Returns ``(inv_freq, attention_scaling)``: float32 ``[head_dim // 2]`` inverse
    frequencies (radians per position) and the factor cos/sin are multiplied by
    (1.0 except for yarn)."""
    dim = head_dim
    base = rope.theta
    if rope.kind == "dynamic":
        # Transformers' NTK base at sequence length == max_position_embeddings; 1.0 up to
        # float rounding, kept in its form so the frequencies match bit for bit.
        base = base * ((rope.factor * 1.0) - (rope.factor - 1)) ** (dim / (dim - 2))
    freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    if rope.kind in ("default", "dynamic"):
        return freq, 1.0
    if rope.kind == "linear":
        return freq / rope.factor, 1.0
    if rope.kind == "llama3":
        return _llama3(freq, rope), 1.0
    if rope.kind == "yarn":
        return _yarn(rope, dim)
    raise AssertionError(f"rope kind {rope.kind!r} passed config validation")  # config.py refuses others


def _llama3(freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / freq
    # Long wavelengths are divided by factor, short ones kept, the band between blended.
    scaled = torch.where(wavelen > low_wavelen, freq / rope.factor, freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    base, factor = rope.theta, rope.factor
    orig = rope.original_max_position_embeddings

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = rope.attention_factor
    if attention is None:
        if rope.mscale and rope.mscale_all_dim:
            attention = float(mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim))
        else:
            attention = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as Transformers: avoids dividing by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)

    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp
    freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return freq, attention


def cos_sin(freq: torch.Tensor, scaling: float, positions: torch.Tensor,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for ``positions`` (int64 ``[N]``): each ``[N, head_dim]`` in ``dtype``,
    computed in float32 (positions times frequencies, then cos/sin), as Transformers does."""
    angles = positions[:, None].float() * freq[None, :].to(positions.device)
    emb = torch.cat((angles, angles), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates ``x`` ``[N, heads, head_dim]`` by cos/sin ``[N, head_dim]`` (the "rotate half"
    convention of Hugging Face checkpoints: pairs are (i, i + head_dim/2))."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
