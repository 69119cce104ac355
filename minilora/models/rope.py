"""Rotary position embeddings (RoPE) of the Llama-like decoders, with the scalings of Hugging Face configs.

Each pair of q/k dimensions i is rotated by position * inv_freq[i], inv_freq[i] = base ** (-2i / rotary_dim).
The scalings stretch that to longer contexts than pre-training: "linear" divides every frequency by a factor,
"dynamic" (NTK) raises the base once a sequence outgrows max_position_embeddings, "llama3" and "yarn" divide
only the low frequencies (a ramp between), "longrope" divides each frequency by its own factor. YaRN and
LongRoPE also scale cos and sin (their attention factor). Computed as transformers computes them (tested
against its rope functions and logits).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from minilora.models.llama_config import LlamaConfig


def rope_inv_freq(config: LlamaConfig, seq_len: int | None = None, device=None, local: bool = False) -> torch.Tensor:
    """Rotary inverse frequencies, (rotary_dim // 2,), with the config's scaling applied.

    `seq_len` matters for "dynamic" (NTK) scaling, which raises the base once a sequence grows past
    max_position_embeddings, and for "longrope", which switches to its long factors past the original length.
    `local`: the frequencies of sliding-window layers when they have their own base (Gemma 3, unscaled).
    """
    dim = config.rotary_dim
    own_base = local and config.rope_local_theta is not None
    base = config.rope_local_theta if own_base else config.rope_theta
    scaling = (None if own_base else config.rope_scaling) or {"rope_type": "default"}
    kind = scaling["rope_type"]
    if kind == "dynamic" and seq_len is not None and seq_len > config.max_position_embeddings:
        factor = scaling["factor"]
        base = base * (factor * seq_len / config.max_position_embeddings - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "longrope":  # per-frequency divisors, "long" ones once a sequence outgrows pre-training
        is_long = seq_len is not None and seq_len > scaling["original_max_position_embeddings"]
        ext = torch.tensor(scaling["long_factor" if is_long else "short_factor"], dtype=torch.float32, device=device)
        inv_freq = 1.0 / (ext * base ** (torch.arange(0, dim, 2, device=device, dtype=torch.int64).float() / dim))
    elif kind == "yarn":  # YaRN: interpolated (/ factor) low frequencies, kept high ones, a linear ramp between
        factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]

        def dim_turning(rotations: float) -> float:  # the dimension turning `rotations` times over old_len
            return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = dim_turning(scaling.get("beta_fast") or 32), dim_turning(scaling.get("beta_slow") or 1)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        span = high - low if high != low else 0.001
        ramp = ((torch.arange(dim // 2, device=device, dtype=torch.float32) - low) / span).clamp(0, 1)
        inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    elif kind == "llama3":  # long wavelengths divided by factor, short ones kept, a smooth ramp in between
        factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(is_medium, smoothed, inv_freq)
    return inv_freq


class LlamaRotaryEmbedding(nn.Module):
    def __init__(self, config: LlamaConfig, local: bool = False):
        super().__init__()
        self.config, self.local = config, local
        scaling = None if local and config.rope_local_theta is not None else config.rope_scaling
        self.kind = scaling["rope_type"] if scaling else "default"
        # cos and sin scaled by this (YaRN's and LongRoPE's attention factor: logits sharpened for long contexts)
        self.attention_scaling = scaling["attention_factor"] if self.kind in ("longrope", "yarn") else 1.0
        # Computed on the CPU and moved: on the meta device (the loader) arange would import torch._dynamo.
        inv_freq = rope_inv_freq(config, device="cpu", local=local).to(torch.get_default_device())
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for each position, (batch, seq, rotary_dim), in x's dtype (computed in fp32)."""
        inv_freq = self.inv_freq
        if self.kind in ("dynamic", "longrope"):
            seq_len = int(position_ids.max()) + 1
            limit = (self.config.max_position_embeddings if self.kind == "dynamic"
                     else self.config.rope_scaling["original_max_position_embeddings"])
            if seq_len > limit:
                inv_freq = rope_inv_freq(self.config, seq_len, device=x.device, local=self.local)
        freqs = position_ids[..., None].float() * inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)
