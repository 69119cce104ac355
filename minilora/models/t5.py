"""T5 encoder-decoder (v1.0 "relu" and v1.1 / Flan "gated-gelu"), HF-compatible names.

What makes T5 different from a textbook transformer: RMS layer norm without bias or mean, no 1/sqrt(d) attention
scaling, a learned relative position bias (computed by block 0 of each stack and shared by all its blocks;
bidirectional buckets in the encoder, causal in the decoder) and, with tied embeddings, a d_model**-0.5 scaling
of the decoder output before the LM head. Computation runs in the parameters' dtype (fp32 or bf16); HF's fp16
overflow clamping is not implemented, so prefer bf16 over fp16.

The decoder cache (`past_key_values`) is a list with one tuple per decoder block:
(self_k, self_v, cross_k, cross_v), each (batch, heads, length, d_kv). Self-attention k/v grow by the new
tokens each step; cross-attention k/v are computed from the encoder output once, on the first step.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from minilora.ops import gemm
from minilora.models.gradient_checkpointing import run_block
from minilora.models.base import ACTIVATIONS, PreTrainedModel, padding_mask_to_bias
from minilora.models.t5_config import T5Config
from minilora.models.inputs import checked_token_ids
from minilora.models.outputs import LazyLogitsOutput, ModelOutput
from minilora.ops.linear_cross_entropy import linear_cross_entropy
from minilora.ops.linear_group import linear_group

DecoderCache = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """Map key-minus-query distances to T5's buckets: exact for small distances, log-spaced up to
    max_distance, one shared bucket beyond. Bidirectional splits the buckets between past and future;
    causal keeps only the past (future distances fall into bucket 0 and are masked anyway)."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    log_ratio = torch.log(distance.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class T5LayerNorm(nn.Module):
    """RMS norm: no mean subtraction, no bias; the variance is accumulated in fp32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = (x * torch.rsqrt(variance + self.variance_epsilon)).to(self.weight.dtype)
        return self.weight * x


class T5DenseActDense(nn.Module):
    """T5 v1.0 feed-forward: wo(dropout(act(wi(x))))."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.act = ACTIVATIONS[config.dense_act_fn]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(self.dropout(self.act(self.wi(x))))


class T5DenseGatedActDense(nn.Module):
    """T5 v1.1 / Flan feed-forward: wo(dropout(act(wi_0(x)) * wi_1(x)))."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.act = ACTIVATIONS[config.dense_act_fn]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear_group(x, self.wi_0, self.wi_1)
        return self.wo(self.dropout(self.act(gate) * up))


class T5Attention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool = False):
        super().__init__()
        self.n_heads, self.d_kv = config.num_heads, config.d_kv
        inner = config.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(self.num_buckets, self.n_heads)
        self.dropout_p = config.dropout_rate

    def compute_bias(self, query_len: int, key_len: int, past_len: int, bidirectional: bool) -> torch.Tensor:
        """Relative position bias (1, heads, query_len, key_len); queries start at position `past_len`."""
        device = self.relative_attention_bias.weight.device
        query_pos = torch.arange(past_len, past_len + query_len, device=device)[:, None]
        key_pos = torch.arange(key_len, device=device)[None, :]
        buckets = relative_position_bucket(key_pos - query_pos, bidirectional, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.n_heads, self.d_kv).transpose(1, 2)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, key_value_states: torch.Tensor | None = None,
                past_kv: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Self-attention (key_value_states None; past_kv is extended) or cross-attention (past_kv, when
        given, is reused as is). Returns (output, (k, v)) so the caller can cache k/v."""
        if key_value_states is None:
            q, k, v = (self.heads(t) for t in linear_group(x, self.q, self.k, self.v))
            if past_kv is not None:
                k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        else:
            k, v = past_kv if past_kv is not None else (
                self.heads(t) for t in linear_group(key_value_states, self.k, self.v))
            q = self.heads(self.q(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0,
                                             dropout_p=self.dropout_p if self.training else 0.0)
        return self.o(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)), (k, v)


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool = False):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x, bias, past_kv=None):
        out, kv = self.SelfAttention(self.layer_norm(x), bias, past_kv=past_kv)
        return x + self.dropout(out), kv


class T5LayerCrossAttention(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.EncDecAttention = T5Attention(config)
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x, encoder_states, bias, past_kv=None):
        out, kv = self.EncDecAttention(self.layer_norm(x), bias, key_value_states=encoder_states, past_kv=past_kv)
        return x + self.dropout(out), kv


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(config) if config.is_gated_act else T5DenseActDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.DenseReluDense(self.layer_norm(x)))


class T5Block(nn.Module):
    """Pre-norm block: self-attention, (decoder only) cross-attention, feed-forward."""

    def __init__(self, config: T5Config, is_decoder: bool, has_relative_attention_bias: bool = False):
        super().__init__()
        self.is_decoder = is_decoder
        self.layer = nn.ModuleList([T5LayerSelfAttention(config, has_relative_attention_bias)])
        if is_decoder:
            self.layer.append(T5LayerCrossAttention(config))
        self.layer.append(T5LayerFF(config))

    def forward(self, x: torch.Tensor, self_bias: torch.Tensor | None, encoder_states: torch.Tensor | None = None,
                cross_bias: torch.Tensor | None = None, past: tuple[torch.Tensor, ...] | None = None):
        """Returns (hidden states, this block's cache entry: (self_k, self_v, cross_k, cross_v) or ())."""
        x, self_kv = self.layer[0](x, self_bias, past_kv=past[:2] if past is not None else None)
        if not self.is_decoder:
            return self.layer[-1](x), ()
        x, cross_kv = self.layer[1](x, encoder_states, cross_bias, past_kv=past[2:] if past is not None else None)
        return self.layer[-1](x), (*self_kv, *cross_kv)


class T5Stack(nn.Module):
    """The encoder or the decoder: embeddings (tied to `shared`), blocks, final RMS norm."""

    def __init__(self, config: T5Config, is_decoder: bool):
        super().__init__()
        self.is_decoder = is_decoder
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        num_layers = config.num_decoder_layers if is_decoder else config.num_layers
        self.block = nn.ModuleList(T5Block(config, is_decoder, has_relative_attention_bias=(i == 0))
                                   for i in range(num_layers))
        self.final_layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.gradient_checkpointing = False

    def self_attention_bias(self, attention_mask: torch.Tensor | None, batch: int, query_len: int,
                            past_len: int) -> torch.Tensor:
        """Relative position bias with the padding (and, in the decoder, causal) mask folded in."""
        key_len = past_len + query_len
        bias = self.block[0].layer[0].SelfAttention.compute_bias(query_len, key_len, past_len,
                                                                 bidirectional=not self.is_decoder)
        allowed = torch.ones(query_len, key_len, dtype=torch.bool, device=bias.device)
        if self.is_decoder:  # query i sits at position past_len + i
            allowed = allowed.tril(diagonal=past_len)
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (batch, key_len):
                name = "decoder_attention_mask" if self.is_decoder else "attention_mask"
                raise ValueError(f"{name} must have shape (batch, past + new tokens) = {(batch, key_len)}, "
                                 f"got {tuple(attention_mask.shape)}")
            allowed = allowed & attention_mask[:, None, None, :].to(device=bias.device, dtype=torch.bool)
        # masked_fill rather than adding two masks: min + min would overflow to -inf (NaN on fully masked rows).
        return bias.masked_fill(~allowed, torch.finfo(bias.dtype).min)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, encoder_attention_mask: torch.Tensor | None = None,
                past_key_values: DecoderCache | None = None, use_cache: bool = False):
        """Returns (last hidden state after the final norm, new decoder cache or None)."""
        if past_key_values is not None and len(past_key_values) != len(self.block):
            raise ValueError(f"past_key_values has {len(past_key_values)} entries, the decoder has "
                             f"{len(self.block)} blocks")
        batch, query_len = input_ids.shape
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        input_ids = checked_token_ids(input_ids, self.embed_tokens)
        x = self.dropout(self.embed_tokens(input_ids))
        self_bias = self.self_attention_bias(attention_mask, batch, query_len, past_len)
        cross_bias = padding_mask_to_bias(encoder_attention_mask, x.dtype) if self.is_decoder else None
        cache = []
        for i, block in enumerate(self.block):
            past = past_key_values[i] if past_key_values else None
            x, present = run_block(self, block, x, self_bias, encoder_hidden_states, cross_bias, past)
            cache.append(present)
        return self.dropout(self.final_layer_norm(x)), (cache if use_cache else None)


class T5ForConditionalGeneration(PreTrainedModel):
    """T5 with its LM head. `forward` follows HF's argument names; `encode` runs only the encoder."""

    is_encoder_decoder = True
    base_model_prefix = "transformer"
    # HF's own list: old checkpoints carry an unused relative bias in the first cross-attention.
    ignore_unexpected_keys: tuple[str, ...] = (
        r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$",)

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, is_decoder=False)
        self.decoder = T5Stack(config, is_decoder=True)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.encoder.embed_tokens.weight = self.shared.weight
        self.decoder.embed_tokens.weight = self.shared.weight
        if config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight

    def tied_weight_keys(self) -> list[str]:
        keys = ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]
        return keys + (["lm_head.weight"] if self.config.tie_word_embeddings else [])

    def tie_weights(self) -> None:
        """Point the stacks' embeddings (and, when tied, lm_head) at `shared.weight` again. A copy loaded from
        the checkpoint must equal it: a different embedding is an error; a different lm_head is kept (untied)
        with a warning, as transformers does."""
        shared = self.shared.weight
        for name in ("encoder", "decoder"):
            embed = getattr(self, name).embed_tokens
            if _differs(embed.weight, shared):
                raise ValueError(f"checkpoint tensor {name}.embed_tokens.weight differs from shared.weight; "
                                 "T5 ties them, so they must be equal")
            embed.weight = shared
        if self.config.tie_word_embeddings:
            if _differs(self.lm_head.weight, shared):
                warnings.warn("lm_head.weight in the checkpoint differs from shared.weight although "
                              "tie_word_embeddings is true: keeping it untied (as transformers does)", stacklevel=2)
            else:
                self.lm_head.weight = shared

    def get_input_embeddings(self) -> nn.Embedding:
        return self.shared

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    @torch.no_grad()
    def init_weights(self, module: nn.Module) -> None:
        """HF's T5 init (scaled by `initializer_factor`) for a freshly created module and its children.
        A bare Linear (e.g. an untied lm_head) gets std factor * in_features**-0.5."""
        factor, d_model, d_kv = self.config.initializer_factor, self.config.d_model, self.config.d_kv
        # Children first, so a parent's specific rule (q's extra 1/sqrt(d_kv)) overrides the generic Linear one.
        for m in reversed(list(module.modules())):
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, factor * m.in_features ** -0.5)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, factor)
            elif isinstance(m, T5LayerNorm):
                m.weight.fill_(factor)
            elif isinstance(m, T5Attention):
                m.q.weight.normal_(0.0, factor * (d_model * d_kv) ** -0.5)
                if hasattr(m, "relative_attention_bias"):
                    m.relative_attention_bias.weight.normal_(0.0, factor * d_model ** -0.5)

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Shift labels right, start with decoder_start_token_id, and replace -100 by the pad id."""
        if self.config.decoder_start_token_id is None or self.config.pad_token_id is None:
            raise ValueError("T5Config needs decoder_start_token_id and pad_token_id to build decoder inputs "
                             "from labels")
        shifted = labels.new_full(labels.shape, self.config.decoder_start_token_id)
        shifted[..., 1:] = labels[..., :-1]
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's last hidden state (batch, seq, d_model); pass it back as `encoder_outputs`."""
        return self.encoder(input_ids, attention_mask)[0]

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
                encoder_outputs: torch.Tensor | None = None, past_key_values: DecoderCache | None = None,
                use_cache: bool = False, labels: torch.Tensor | None = None) -> ModelOutput:
        """Encode (unless `encoder_outputs` is given) and decode. Without decoder_input_ids they are built
        from `labels`; the loss is token cross-entropy ignoring -100. With use_cache=True,
        `out.past_key_values` continues decoding when passed back with only the new decoder tokens."""
        if encoder_outputs is None:
            if input_ids is None:
                raise ValueError("T5ForConditionalGeneration needs input_ids or encoder_outputs")
            encoder_outputs = self.encode(input_ids, attention_mask)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("T5ForConditionalGeneration needs decoder_input_ids or labels")
            decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
        hidden, cache = self.decoder(decoder_input_ids, decoder_attention_mask, encoder_outputs, attention_mask,
                                     past_key_values, use_cache)
        scaled = hidden * self.config.d_model ** -0.5 if self.config.scale_decoder_outputs else hidden
        outputs = {"last_hidden_state": hidden, "encoder_last_hidden_state": encoder_outputs,
                   "past_key_values": cache}
        if labels is not None and gemm.is_plain_linear(self.lm_head):
            # The loss in row chunks, never holding the whole (tokens, vocab) logits; they are computed if read.
            loss = linear_cross_entropy(scaled.reshape(-1, scaled.shape[-1]), self.lm_head.weight,
                                        labels.reshape(-1), self.lm_head.bias)
            return LazyLogitsOutput(lambda: gemm.apply_linear(self.lm_head, scaled), hidden.device, loss=loss,
                                    **outputs)
        logits = gemm.apply_linear(self.lm_head, scaled)
        loss = None if labels is None else F.cross_entropy(
            logits.float().view(-1, logits.shape[-1]), labels.view(-1).to(logits.device), ignore_index=-100)
        return ModelOutput(loss=loss, logits=logits, **outputs)

    def reorder_cache(self, past_key_values: DecoderCache, beam_idx: torch.Tensor) -> DecoderCache:
        """Select the cache rows of the surviving beams (batch dimension 0 of every tensor)."""
        return [tuple(t.index_select(0, beam_idx.to(t.device)) for t in layer) for layer in past_key_values]


def _differs(loaded: torch.Tensor, shared: torch.Tensor) -> bool:
    """True when `loaded` is a separately materialised tensor whose values differ from `shared`."""
    if loaded is shared or loaded.is_meta or shared.is_meta:
        return False
    return loaded.shape != shared.shape or not torch.equal(loaded.to(shared.device), shared)
