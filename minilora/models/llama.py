"""Llama decoder-only transformer: RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP.

Module and parameter names match Hugging Face's `LlamaForCausalLM`, so its safetensors state dict loads as is.
Data flow per layer (pre-norm residual blocks):

    x = x + o_proj(attention(rope(q_proj(norm(x))), rope(k_proj(norm(x))), v_proj(norm(x))))
    x = x + down_proj(silu(gate_proj(norm(x))) * up_proj(norm(x)))

Training-speed details live elsewhere: norm, rope, attention (on CPU, with grad) and the loss use the
hand-written backward passes of `minilora.fused`; `shared_input` runs the LoRA branches of q/k/v and of
gate/up together.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from minilora import fused, gemm
from minilora.checkpointing import run_block
from minilora.lora import shared_input
from minilora.models.inputs import checked_token_ids
from minilora.models.masks import restrict_to_documents
from minilora.models.outputs import ModelOutput

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # one (key, value) pair per layer, (batch, kv_heads, seq, head_dim)

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (plain multi-head attention)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "dynamic" | "llama3", "factor": ..., ...}
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    raw: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported: Llama uses 'silu'")
        self.rope_scaling = self._checked_rope_scaling()

    def _checked_rope_scaling(self) -> dict | None:
        """rope_scaling with `rope_type` spelled out (old configs say `type`); None for plain RoPE."""
        params = dict(self.rope_scaling or {})
        params.pop("rope_theta", None)
        rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
        if rope_type == "default":
            return None
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope type {rope_type!r} is not supported; expected one of {ROPE_TYPES}")
        required = {"factor"} | ({"low_freq_factor", "high_freq_factor"} if rope_type == "llama3" else set())
        if required - params.keys():
            raise KeyError(f"rope scaling {rope_type!r} in config is missing {sorted(required - params.keys())}")
        if rope_type == "llama3":
            params.setdefault("original_max_position_embeddings", self.max_position_embeddings)
        return {"rope_type": rope_type, **params}

    @classmethod
    def from_dict(cls, d: dict) -> LlamaConfig:
        """Build from a Hugging Face config.json dict (v4 `rope_theta`/`rope_scaling` or v5 `rope_parameters`)."""
        known = {f.name for f in fields(cls)} - {"raw", "rope_theta", "rope_scaling"}
        kwargs = {k: d[k] for k in known if d.get(k) is not None}
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        kwargs["rope_theta"] = float(rope.get("rope_theta") or d.get("rope_theta") or 10000.0)
        return cls(**kwargs, rope_scaling=rope, raw=dict(d))


def rope_inv_freq(config: LlamaConfig, seq_len: int | None = None, device=None) -> torch.Tensor:
    """Rotary inverse frequencies, (head_dim // 2,), with the config's scaling applied.

    `seq_len` only matters for "dynamic" (NTK) scaling, which raises the base once a sequence grows past
    max_position_embeddings.
    """
    dim, base = config.head_dim, config.rope_theta
    scaling = config.rope_scaling or {"rope_type": "default"}
    kind = scaling["rope_type"]
    if kind == "dynamic" and seq_len is not None and seq_len > config.max_position_embeddings:
        factor = scaling["factor"]
        base = base * (factor * seq_len / config.max_position_embeddings - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
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
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        # Computed on the CPU and moved: on the meta device (the loader) arange would import torch._dynamo.
        inv_freq = rope_inv_freq(config, device="cpu").to(torch.get_default_device())
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for each position, (batch, seq, head_dim), in x's dtype (computed in fp32)."""
        inv_freq = self.inv_freq
        scaling = self.config.rope_scaling
        if scaling and scaling["rope_type"] == "dynamic":
            seq_len = int(position_ids.max()) + 1
            if seq_len > self.config.max_position_embeddings:
                inv_freq = rope_inv_freq(self.config, seq_len, device=x.device)
        freqs = position_ids[..., None].float() * inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalises in fp32 for bf16/fp16 stability and casts back before the weight, like HF.
        return fused.rms_norm(x, self.weight, self.variance_epsilon)


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.attention_dropout = config.attention_dropout
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, x, cos, sin, mask, past_kv=None):
        batch, seq, _ = x.shape
        q, k, v = (t.view(batch, seq, -1, self.head_dim).transpose(1, 2)
                   for t in shared_input(x, self.q_proj, self.k_proj, self.v_proj))
        q, k = fused.rotary(q, cos, sin), fused.rotary(k, cos, sin)  # cos/sin halves are equal (cat(f, f))
        if past_kv is not None:
            k, v = torch.cat((past_kv[0], k), dim=2), torch.cat((past_kv[1], v), dim=2)
        new_kv = (k, v)
        dropout = self.attention_dropout if self.training else 0.0
        sees_nothing = None
        if mask is not None:
            # A left-padding query may see no key at all. Softmax over nothing is NaN on some backends, so
            # let it see every key, then zero its output as HF's SDPA path does (its loss depends on it).
            sees_nothing = ~mask.any(dim=-1, keepdim=True)
            mask = mask | sees_nothing
        training_on_cpu = q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or v.requires_grad)
        if training_on_cpu and past_kv is None and dropout == 0:
            out = fused.attention(q, k, v, mask)  # SDPA's CPU backward is ~2x slower
        else:
            groups = self.num_heads // self.num_kv_heads  # each key/value head serves `groups` query heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and seq > 1,
                                                 dropout_p=dropout)
        if sees_nothing is not None:
            out = out.masked_fill(sees_nothing, 0.0)
        return gemm.apply_linear(self.o_proj, out.transpose(1, 2).reshape(batch, seq, -1)), new_kv


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = shared_input(x, self.gate_proj, self.up_proj)
        return gemm.apply_linear(self.down_proj, F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.self_attn = LlamaAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, past_kv=None):
        attn_out, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_kv)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, new_kv


def attention_mask_4d(
    attention_mask: torch.Tensor | None, q_len: int, past_len: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean (batch, 1, q_len, past_len + q_len) mask, True = may attend; None means plain causal, no past.

    Query i (absolute position past_len + i) sees keys up to itself that the 2-D padding mask keeps.
    """
    kv_len = past_len + q_len
    if attention_mask is None and (past_len == 0 or q_len == 1):
        return None  # SDPA's is_causal covers it (a single new token may see the whole cache)
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(diagonal=past_len)
    if attention_mask is None:
        return causal[None, None]
    if attention_mask.shape[-1] != kv_len:
        raise ValueError(f"attention_mask has {attention_mask.shape[-1]} columns, expected past length + "
                         f"input length = {past_len} + {q_len}")
    return causal[None, None] & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.gradient_checkpointing = False

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        batch, seq = input_ids.shape
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + seq, device=input_ids.device).expand(batch, seq)
        elif position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        mask = attention_mask_4d(attention_mask, seq, past_len, input_ids.device)
        input_ids = checked_token_ids(input_ids, self.embed_tokens)
        mask = restrict_to_documents(mask, position_ids, past_len)  # packed rows: no attention across documents
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(x, position_ids)
        new_cache: KVCache = []
        for i, layer in enumerate(self.layers):
            past_kv = past_key_values[i] if past_key_values else None
            x, kv = run_block(self, layer, x, cos, sin, mask, past_kv)
            if use_cache:
                new_cache.append(kv)
        return self.norm(x), (new_cache if use_cache else None)


class LlamaForCausalLM(nn.Module):
    """Llama language model: `model` (the decoder stack) + `lm_head`, optionally tied to the embeddings."""

    base_model_prefix = "model"
    is_encoder_decoder = False
    new_head_prefixes: tuple[str, ...] = ()
    ignore_unexpected_keys: tuple[str, ...] = (r".*rotary_emb\.inv_freq",)  # saved by old checkpoints

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        labels: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Logits (batch, seq, vocab); with `labels`, the next-token cross-entropy (-100 = ignore, token mean).

        `attention_mask` (batch, past + seq) is 1 for real tokens, 0 for padding. With `use_cache`, the
        returned `past_key_values` continues the sequence when passed back with only the new tokens.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        hidden, cache = self.model(input_ids, attention_mask, position_ids, past_key_values, use_cache)
        logits = gemm.apply_linear(self.lm_head, hidden)
        loss = None
        if labels is not None:
            loss = fused.causal_lm_loss(logits, labels)
        return ModelOutput(loss=loss, logits=logits, past_key_values=cache)

    @staticmethod
    def reorder_cache(past_key_values: KVCache, beam_idx: torch.Tensor) -> KVCache:
        """Select batch rows of the cache (beam search keeps the cache of the beams it continues)."""
        return [(k.index_select(0, beam_idx.to(k.device)), v.index_select(0, beam_idx.to(v.device)))
                for k, v in past_key_values]

    def tied_weight_keys(self) -> list[str]:
        return ["lm_head.weight"] if self.config.tie_word_embeddings else []

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def init_weights(self, module: nn.Module) -> None:
        """HF-style initialisation of a freshly created module."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, LlamaRMSNorm):
            nn.init.ones_(module.weight)

    def init_non_persistent_buffers(self, device: torch.device | str) -> None:
        """(Re)compute the rotary frequencies, e.g. after the loader materialised the model from `meta`."""
        self.model.rotary_emb.inv_freq = rope_inv_freq(self.config, device=device)
