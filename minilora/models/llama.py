"""Llama-style decoder-only transformer: RMSNorm, rotary positions, grouped-query attention, gated MLP.

Module and parameter names match Hugging Face's `LlamaForCausalLM`, so its safetensors state dict loads as is.
Data flow per layer (pre-norm residual blocks):

    x = x + o_proj(attention(rope(q_proj(norm(x))), rope(k_proj(norm(x))), v_proj(norm(x))))
    x = x + down_proj(silu(gate_proj(norm(x))) * up_proj(norm(x)))

The other decoder families (Qwen2/3, Mistral, Gemma 1/2/3, Phi-3, SmolLM3; see `minilora.models.families`) are
this model with a few switches of their config: bias on q/k/v only, RMSNorm on q and k, Gemma's `x * (1 + w)`
norm and scaled embeddings, norms around the attention and MLP outputs, soft-capped logits, sliding-window
layers with their own RoPE base, partial rotary dimensions, layers without RoPE, and Phi-3's fused
`qkv_proj` / `gate_up_proj`. RoPE and its scalings are in `minilora.models.rope`.

Training-speed details live elsewhere: norm, rope, attention (on CPU, with grad) and the output head with its
loss (in row chunks, given labels) use the hand-written backward passes of `minilora.ops`; `linear_group` runs
the LoRA branches of q/k/v and of gate/up together.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from minilora.models.base import ACTIVATIONS, PreTrainedModel
from minilora.models.gradient_checkpointing import run_block
from minilora.models.inputs import checked_token_ids
from minilora.models.llama_config import LlamaConfig
from minilora.models.masks import restrict_to_documents
from minilora.models.outputs import LazyLogitsOutput, ModelOutput
from minilora.models.rope import LlamaRotaryEmbedding, rope_inv_freq
from minilora.ops import gemm
from minilora.ops.attention import attention
from minilora.ops.cross_entropy import causal_lm_loss
from minilora.ops.linear_cross_entropy import causal_lm_head_loss
from minilora.ops.linear_group import linear_group
from minilora.ops.rms_norm import rms_norm
from minilora.ops.rotary import rotary

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # one (key, value) pair per layer, (batch, kv_heads, seq, head_dim)

# SDPA shares key/value heads among query heads itself since torch 2.5 (no repeated copies of K and V).
SDPA_HAS_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)


class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, unit_offset: bool = False):
        super().__init__()
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(hidden_size) if unit_offset else torch.ones(hidden_size))
        self.variance_epsilon = eps

    def reset_parameters(self) -> None:
        (nn.init.zeros_ if self.unit_offset else nn.init.ones_)(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unit_offset:  # Gemma: scaled by (1 + w) in fp32, rounded once at the end
            x32 = x.float()
            normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return (normed * (1.0 + self.weight.float())).type_as(x)
        # Normalises in fp32 for bf16/fp16 stability and casts back before the weight, like HF.
        return rms_norm(x, self.weight, self.variance_epsilon)


def softcapped_attention(q, k, v, mask, scale: float, softcap: float, dropout: float) -> torch.Tensor:
    """Attention with scores soft-capped to (-softcap, softcap) by tanh (Gemma 2), which SDPA cannot do: the
    plain ops of transformers' eager path, probabilities in fp32. mask as `attention_mask_4d` returns it;
    masked scores get the dtype's minimum added, as there, so a padding query that sees no key averages all
    values (the loss sees that output at the last padding position) and its gradient flows the same way."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.tanh(q @ k.transpose(-1, -2) * scale / softcap) * softcap
    if mask is None and q.shape[2] > 1:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores + torch.zeros_like(mask, dtype=scores.dtype).masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = F.dropout(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), dropout)
    return probs @ v


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.rotary_dim = config.head_dim, config.rotary_dim
        self.attention_dropout = config.attention_dropout
        self.scaling = (config.query_pre_attn_scalar or config.head_dim) ** -0.5
        self.softcap = config.attn_logit_softcapping
        hidden, q_size, kv_size = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = config.attention_bias
        if config.fused_projections:
            self.qkv_proj = nn.Linear(hidden, q_size + 2 * kv_size, bias=bias)
        else:
            qkv_bias = bias or config.qkv_bias
            self.q_proj = nn.Linear(hidden, q_size, bias=qkv_bias)
            self.k_proj = nn.Linear(hidden, kv_size, bias=qkv_bias)
            self.v_proj = nn.Linear(hidden, kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(q_size, hidden, bias=bias)
        if config.qk_norm:
            self.q_norm = LlamaRMSNorm(self.head_dim, config.rms_norm_eps, unit_offset=config.gemma_norm)
            self.k_norm = LlamaRMSNorm(self.head_dim, config.rms_norm_eps, unit_offset=config.gemma_norm)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on the first rotary_dim dimensions of each head; the rest pass through (partial rotary)."""
        if self.rotary_dim == self.head_dim:
            return rotary(x, cos, sin)  # cos/sin halves are equal (cat(f, f))
        return torch.cat((rotary(x[..., :self.rotary_dim], cos, sin), x[..., self.rotary_dim:]), dim=-1)

    def forward(self, x, cos, sin, mask, past_kv=None):
        batch, seq, _ = x.shape
        if hasattr(self, "qkv_proj"):
            kv_size = self.num_kv_heads * self.head_dim
            q, k, v = gemm.apply_linear(self.qkv_proj, x).split((self.num_heads * self.head_dim, kv_size, kv_size), -1)
        else:
            q, k, v = linear_group(x, self.q_proj, self.k_proj, self.v_proj)
        q, k, v = (t.view(batch, seq, -1, self.head_dim) for t in (q, k, v))
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if cos is not None:  # None: a layer without position encoding (SmolLM3's NoPE layers)
            q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        if past_kv is not None:
            k, v = torch.cat((past_kv[0], k), dim=2), torch.cat((past_kv[1], v), dim=2)
        dropout = self.attention_dropout if self.training else 0.0
        if self.softcap is not None:
            out = softcapped_attention(q, k, v, mask, self.scaling, self.softcap, dropout)
        else:
            out = self.masked_attention(q, k, v, mask, dropout, cached=past_kv is not None)
        return gemm.apply_linear(self.o_proj, out.transpose(1, 2).reshape(batch, seq, -1)), (k, v)

    def masked_attention(self, q, k, v, mask, dropout: float, cached: bool) -> torch.Tensor:
        """Attention under `mask` (as `attention_mask_4d` returns it; None: causal): minilora's kernel when
        training on the CPU without a cache or dropout (SDPA's CPU backward is slower), SDPA otherwise."""
        sees_nothing = None
        if mask is not None:
            # A left-padding query may see no key at all. Softmax over nothing is NaN on some backends, so
            # let it see every key, then zero its output as HF's SDPA path does (its loss depends on it).
            sees_nothing = ~mask.any(dim=-1, keepdim=True)
            mask = mask | sees_nothing
        training_on_cpu = q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or v.requires_grad)
        if training_on_cpu and not cached and dropout == 0:
            out = attention(q, k, v, mask, scale=self.scaling)
        else:
            if not SDPA_HAS_GQA:
                groups = self.num_heads // self.num_kv_heads  # each key/value head serves `groups` query heads
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            gqa = {"enable_gqa": True} if SDPA_HAS_GQA and self.num_heads != self.num_kv_heads else {}
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
                                                 dropout_p=dropout, scale=self.scaling, **gqa)
        return out if sees_nothing is None else out.masked_fill(sees_nothing, 0.0)


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.act = ACTIVATIONS[config.hidden_act]
        if config.fused_projections:
            self.gate_up_proj = nn.Linear(hidden, 2 * inner, bias=bias)
        else:
            self.gate_proj = nn.Linear(hidden, inner, bias=bias)
            self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):
            gate, up = gemm.apply_linear(self.gate_up_proj, x).chunk(2, dim=-1)
        else:
            gate, up = linear_group(x, self.gate_proj, self.up_proj)
        return gemm.apply_linear(self.down_proj, self.act(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.self_attn = LlamaAttention(config)
        self.mlp = LlamaMLP(config)
        self.resid_pdrop = config.resid_pdrop
        norm = lambda: LlamaRMSNorm(config.hidden_size, config.rms_norm_eps, unit_offset=config.gemma_norm)  # noqa: E731
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        if config.sandwich_norm:  # Gemma 2/3: post_attention_layernorm normalises the attention output instead
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def forward(self, x, cos, sin, mask, past_kv=None):
        attn_out, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_kv)
        if hasattr(self, "pre_feedforward_layernorm"):
            x = x + self.post_attention_layernorm(attn_out)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))), new_kv
        x = x + F.dropout(attn_out, self.resid_pdrop, self.training)
        x = x + F.dropout(self.mlp(self.post_attention_layernorm(x)), self.resid_pdrop, self.training)
        return x, new_kv


def attention_mask_4d(
    attention_mask: torch.Tensor | None, q_len: int, past_len: int, device: torch.device,
    sliding_window: int | None = None,
) -> torch.Tensor | None:
    """Boolean (batch, 1, q_len, past_len + q_len) mask, True = may attend; None means plain causal, no past.

    Query i (absolute position past_len + i) sees keys up to itself that the 2-D padding mask keeps, and with
    `sliding_window` only the last `sliding_window` of them (itself included). A padding mask of all ones is
    dropped, so that SDPA can pick its causal (flash) kernels.
    """
    kv_len = past_len + q_len
    if attention_mask is not None:
        if attention_mask.shape[-1] != kv_len:
            raise ValueError(f"attention_mask has {attention_mask.shape[-1]} columns, expected past length + "
                             f"input length = {past_len} + {q_len}")
        if attention_mask.all():
            attention_mask = None
    windowed = sliding_window is not None and kv_len > sliding_window
    if attention_mask is None and not windowed and (past_len == 0 or q_len == 1):
        return None  # SDPA's is_causal covers it (a single new token may see the whole cache)
    ones = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    mask = ones.tril(diagonal=past_len)
    if windowed:
        mask &= ~ones.tril(diagonal=past_len - sliding_window)
    if attention_mask is None:
        return mask[None, None]
    return mask[None, None] & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps, unit_offset=config.gemma_norm)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        if config.rope_local_theta is not None and "sliding_attention" in config.layer_types:
            self.rotary_emb_local = LlamaRotaryEmbedding(config, local=True)
        self.gradient_checkpointing = False

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        batch, seq = input_ids.shape
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + seq, device=input_ids.device).expand(batch, seq)
        elif position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        input_ids = checked_token_ids(input_ids, self.embed_tokens)
        layer_types = self.config.layer_types
        masks = {kind: restrict_to_documents(  # packed rows: no attention across documents
                     attention_mask_4d(attention_mask, seq, past_len, input_ids.device,
                                       self.config.sliding_window if kind == "sliding_attention" else None),
                     position_ids, past_len)
                 for kind in set(layer_types)}
        x = self.embed_tokens(input_ids)
        if self.config.gemma_norm:  # sqrt(hidden_size) rounded to the weights' dtype, as transformers does
            x = x * torch.tensor(self.config.hidden_size ** 0.5).to(x.dtype)
        rope = {kind: self.rotary_emb(x, position_ids) for kind in set(layer_types)}
        if hasattr(self, "rotary_emb_local"):
            rope["sliding_attention"] = self.rotary_emb_local(x, position_ids)
        new_cache: KVCache = []
        for i, layer in enumerate(self.layers):
            past_kv = past_key_values[i] if past_key_values else None
            cos, sin = rope[layer_types[i]] if self.config.uses_rope(i) else (None, None)
            x, kv = run_block(self, layer, x, cos, sin, masks[layer_types[i]], past_kv)
            if use_cache:
                new_cache.append(kv)
        return self.norm(x), (new_cache if use_cache else None)


class LlamaForCausalLM(PreTrainedModel):
    """Llama language model: `model` (the decoder stack) + `lm_head`, optionally tied to the embeddings."""

    base_model_prefix = "model"
    ignore_unexpected_keys: tuple[str, ...] = (r".*rotary_emb\.inv_freq",)  # saved by old checkpoints
    backbone_class: type[nn.Module] = LlamaModel  # what `model` is: the decoder, or a module holding it

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = self.backbone_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: KVCache | None = None,
                use_cache: bool = False, labels: torch.Tensor | None = None) -> ModelOutput:
        """Logits (batch, seq, vocab); with `labels`, the next-token cross-entropy (-100 = ignore, token mean).

        `attention_mask` (batch, past + seq) is 1 for real tokens, 0 for padding. With `use_cache`, the
        returned `past_key_values` continues the sequence when passed back with only the new tokens.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        hidden, cache = self.model(input_ids, attention_mask, position_ids, past_key_values, use_cache)
        if labels is not None and gemm.is_plain_linear(self.lm_head):
            # The loss in row chunks, never holding the whole (tokens, vocab) logits; they are computed if read.
            loss = causal_lm_head_loss(hidden, self.lm_head.weight, labels, self.lm_head.bias,
                                       self.config.final_logit_softcapping)
            return LazyLogitsOutput(lambda: self.logits(hidden), hidden.device, loss=loss, past_key_values=cache)
        logits = self.logits(hidden)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, past_key_values=cache)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output head on the final hidden states (soft-capped where the config says so)."""
        logits = gemm.apply_linear(self.lm_head, hidden)
        if self.config.final_logit_softcapping is not None:
            cap = self.config.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

    @property
    def stale_cache_length(self) -> int | None:
        """Longrope switches to its long factors past original_max_position_embeddings, so keys cached before
        are rotated differently: generation recomputes the cache once a sequence grows past this length."""
        scaling = self.config.rope_scaling
        return scaling["original_max_position_embeddings"] if scaling and scaling["rope_type"] == "longrope" else None

    def reorder_cache(self, past_key_values: KVCache, beam_idx: torch.Tensor) -> KVCache:
        """Select batch rows of the cache (beam search keeps the cache of the beams it continues)."""
        return [(k.index_select(0, beam_idx.to(k.device)), v.index_select(0, beam_idx.to(v.device)))
                for k, v in past_key_values]

    @property
    def decoder(self) -> LlamaModel:
        """The decoder stack: `model` itself, or the module inside it that a multimodal layout names."""
        return self.model

    def tied_weight_keys(self) -> list[str]:
        return ["lm_head.weight"] if self.config.tie_word_embeddings else []

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.decoder.embed_tokens.weight

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def init_non_persistent_buffers(self, device: torch.device | str) -> None:
        """(Re)compute the rotary frequencies, e.g. after the loader materialised the model from `meta`."""
        for rotary_emb in (self.decoder.rotary_emb, getattr(self.decoder, "rotary_emb_local", None)):
            if rotary_emb is not None:
                rotary_emb.inv_freq = rope_inv_freq(self.config, device=device, local=rotary_emb.local)
