"""Decoder families that are Llama with a few switches: each config says what differs, the model is Llama's.

A family's config class holds (1) transformers' defaults for config.json keys a checkpoint may leave out,
(2) its architecture switches (see `LlamaConfig`'s class attributes), (3) `normalized`, translating the
family's own config.json spellings into Llama's fields. Its model class only carries the Hugging Face class
name (written to a saved config.json's `architectures`). Module and parameter names are Hugging Face's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from minilora.models.llama import LlamaForCausalLM, LlamaModel
from minilora.models.llama_config import LlamaConfig

_SLIDING = frozenset({"sliding_window", "layer_types"})


@dataclass
class Qwen2Config(LlamaConfig):
    """Qwen2 / Qwen2.5 / DeepSeek-R1-Distill-Qwen: bias on q/k/v (not o_proj); optional sliding window."""

    vocab_size: int = 151936
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    sliding_window: int | None = 4096
    model_type: str = "qwen2"
    family_keys: ClassVar[frozenset[str]] = _SLIDING
    ignored_keys: ClassVar[frozenset[str]] = frozenset({"attention_bias", "mlp_bias"})
    qkv_bias: ClassVar[bool] = True

    @classmethod
    def normalized(cls, d: dict) -> dict:
        """Qwen's sliding window is on only with use_sliding_window, and then for layers >= max_window_layers."""
        if not d.get("use_sliding_window"):
            return {**d, "sliding_window": None, "layer_types": d.get("layer_types")
                    if d.get("layer_types") and "sliding_attention" not in d["layer_types"] else None}
        if d.get("layer_types") is None:
            first = d.get("max_window_layers", 28)
            d = {**d, "layer_types": ["sliding_attention" if d.get("sliding_window") and i >= first
                                      else "full_attention" for i in range(d["num_hidden_layers"])]}
        return d


@dataclass
class Qwen3Config(Qwen2Config):
    """Qwen3: RMSNorm over head_dim on q and k before RoPE, explicit head_dim, bias per attention_bias."""

    head_dim: int | None = 128
    model_type: str = "qwen3"
    ignored_keys: ClassVar[frozenset[str]] = frozenset({"mlp_bias"})
    qkv_bias: ClassVar[bool] = False
    qk_norm: ClassVar[bool] = True


@dataclass
class MistralConfig(LlamaConfig):
    """Mistral: Llama's modules; every layer attends within `sliding_window` when it is set."""

    num_key_value_heads: int | None = 8
    max_position_embeddings: int = 4096 * 32
    sliding_window: int | None = 4096
    model_type: str = "mistral"
    family_keys: ClassVar[frozenset[str]] = frozenset({"sliding_window"})
    ignored_keys: ClassVar[frozenset[str]] = frozenset({"attention_bias", "mlp_bias"})


@dataclass
class GemmaConfig(LlamaConfig):
    """Gemma: RMSNorm as x * (1 + w) in fp32, embeddings scaled by sqrt(hidden_size), gelu-tanh, tied head."""

    vocab_size: int = 256000
    head_dim: int | None = 256
    hidden_act: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    bos_token_id: int | None = 2
    model_type: str = "gemma"
    ignored_keys: ClassVar[frozenset[str]] = frozenset({"mlp_bias"})
    gemma_norm: ClassVar[bool] = True

    @classmethod
    def normalized(cls, d: dict) -> dict:
        if d.get("use_bidirectional_attention"):
            raise ValueError(f"config.json use_bidirectional_attention={d['use_bidirectional_attention']!r} is not "
                             f"supported by minilora's {d.get('model_type')} model: only causal attention is "
                             "implemented")
        if d.get("hidden_act") == "gelu":  # old Gemma releases say "gelu" and mean the tanh approximation
            d = {**d, "hidden_act": "gelu_pytorch_tanh"}
        return d


@dataclass
class Gemma2Config(GemmaConfig):
    """Gemma 2: norms after attention and MLP too, soft-capped attention scores and logits,
    query_pre_attn_scalar, sliding-window layers alternating with global ones."""

    query_pre_attn_scalar: float | None = 256
    sliding_window: int | None = 4096
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0
    model_type: str = "gemma2"
    family_keys: ClassVar[frozenset[str]] = _SLIDING | {"query_pre_attn_scalar", "attn_logit_softcapping",
                                                        "final_logit_softcapping"}
    sandwich_norm: ClassVar[bool] = True
    sliding_every: ClassVar[int] = 2  # layer i is global when (i + 1) % sliding_every == 0

    @classmethod
    def normalized(cls, d: dict) -> dict:
        d = super().normalized(d)
        d["hidden_act"] = d.get("hidden_activation") or "gelu_pytorch_tanh"  # Gemma 2/3 read hidden_activation
        if d.get("layer_types") is None:
            every = d.get("sliding_window_pattern", cls.sliding_every)
            d["layer_types"] = ["sliding_attention" if (i + 1) % every else "full_attention"
                                for i in range(d.get("num_hidden_layers", cls.num_hidden_layers))]
        return d


@dataclass
class Gemma3TextConfig(Gemma2Config):
    """Gemma 3 (text): Gemma 2 without soft-capping by default, q/k norms, 5 local : 1 global layers, local
    layers with their own RoPE base (rope_local_base_freq), RoPE scaling on global layers only."""

    vocab_size: int = 262208
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int | None = 4
    max_position_embeddings: int = 131072
    rope_theta: float = 1_000_000.0
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    model_type: str = "gemma3_text"
    family_keys: ClassVar[frozenset[str]] = Gemma2Config.family_keys | {"rope_local_theta"}
    qk_norm: ClassVar[bool] = True
    sliding_every: ClassVar[int] = 6

    @classmethod
    def normalized(cls, d: dict) -> dict:
        d = super().normalized(d)
        rope = d.get("rope_parameters") or {}
        if "sliding_attention" in rope or "full_attention" in rope:  # transformers v5: one dict per layer type
            local = rope.get("sliding_attention") or {}
            if (local.get("rope_type") or "default") != "default":
                raise ValueError(f"config.json rope_parameters.sliding_attention: rope type {local['rope_type']!r} "
                                 "is not supported by minilora (local layers use plain RoPE)")
            d["rope_parameters"] = rope.get("full_attention") or {}
            d["rope_local_theta"] = local.get("rope_theta", 10_000.0)
        else:  # v4: rope_theta / rope_scaling for global layers, rope_local_base_freq for local ones
            d["rope_local_theta"] = d.get("rope_local_base_freq", 10_000.0)
        return d


@dataclass
class Gemma3Config(Gemma3TextConfig):
    """Gemma 3's multimodal config.json (gemma-3-4b and larger: Gemma3ForConditionalGeneration). minilora builds
    its language model only: the fields come from `text_config` (which hub checkpoints write sparsely: the
    defaults above fill the rest). Top-level values win: `tie_word_embeddings` (transformers ties by it) and the
    token ids (the instruction-tuned checkpoints list `<end_of_turn>` as an eos_token_id there)."""

    model_type: str = "gemma3"
    nested_config: ClassVar[str] = "text_config"

    @classmethod
    def from_dict(cls, d: dict) -> Gemma3Config:
        text = dict(d.get(cls.nested_config) or {})
        text.update({k: d[k] for k in ("tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
                     if d.get(k) is not None})
        config = super().from_dict(text)
        config.model_type, config.raw = "gemma3", dict(d)
        return config


@dataclass
class Phi3Config(LlamaConfig):
    """Phi-3 / Phi-3.5 / Phi-4-mini: fused qkv_proj and gate_up_proj, partial rotary, longrope scaling."""

    vocab_size: int = 32064
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int | None = 4096
    rms_norm_eps: float = 1e-5
    eos_token_id: int | list[int] | None = 32000
    pad_token_id: int | None = 32000
    model_type: str = "phi3"
    family_keys: ClassVar[frozenset[str]] = frozenset({"sliding_window", "partial_rotary_factor", "resid_pdrop",
                                                       "original_max_position_embeddings"})
    ignored_keys: ClassVar[frozenset[str]] = frozenset({"attention_bias", "mlp_bias"})
    fused_projections: ClassVar[bool] = True

    @classmethod
    def normalized(cls, d: dict) -> dict:
        for key in ("rope_scaling", "rope_parameters"):  # early Phi-3 configs call longrope "su" or "yarn"
            rope = d.get(key)
            if isinstance(rope, dict) and (rope.get("rope_type") or rope.get("type")) in ("su", "yarn"):
                d[key] = {**{k: v for k, v in rope.items() if k != "type"}, "rope_type": "longrope"}
        return d


@dataclass
class SmolLM3Config(LlamaConfig):
    """SmolLM3: no RoPE on every `no_rope_layer_interval`-th layer (`no_rope_layers[i]` 0: NoPE), and with
    use_sliding_window a sliding window on those layers; otherwise Llama with a tied head."""

    vocab_size: int = 128256
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 4
    max_position_embeddings: int = 32768
    rope_theta: float = 2_000_000.0
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 128000
    eos_token_id: int | list[int] | None = 128001
    pad_token_id: int | None = 128004
    model_type: str = "smollm3"
    family_keys: ClassVar[frozenset[str]] = _SLIDING | {"no_rope_layers"}

    @classmethod
    def normalized(cls, d: dict) -> dict:
        layers, interval = d.get("num_hidden_layers", cls.num_hidden_layers), d.get("no_rope_layer_interval", 4)
        rope_layers = d.get("no_rope_layers")
        if rope_layers is None:
            rope_layers = [int((i + 1) % interval != 0) for i in range(layers)]
        d = {**d, "no_rope_layers": rope_layers}
        if not (d.get("use_sliding_window") and d.get("sliding_window")):  # transformers ignores the window then
            return {**d, "sliding_window": None, "layer_types": None}
        if d.get("layer_types") is None:
            d["layer_types"] = ["full_attention" if rope else "sliding_attention" for rope in rope_layers]
        return d


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 / Qwen2.5 decoder (see Qwen2Config for what differs from Llama)."""


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3 decoder (see Qwen3Config)."""


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral decoder (see MistralConfig)."""


class GemmaForCausalLM(LlamaForCausalLM):
    """Gemma decoder (see GemmaConfig)."""


class Gemma2ForCausalLM(LlamaForCausalLM):
    """Gemma 2 decoder (see Gemma2Config)."""


class Gemma3ForCausalLM(LlamaForCausalLM):
    """Gemma 3 text decoder (see Gemma3TextConfig)."""


class Gemma3Model(nn.Module):
    """transformers' multimodal Gemma3Model without its vision tower and projector: the text decoder under the
    name it has there, so module paths (and peft adapter keys) are transformers'."""

    def __init__(self, config: Gemma3Config):
        super().__init__()
        self.language_model = LlamaModel(config)

    def forward(self, *args, **kwargs):
        return self.language_model(*args, **kwargs)


class Gemma3ForConditionalGeneration(LlamaForCausalLM):
    """Gemma 3's multimodal checkpoints (gemma-3-4b and larger) as a text-only decoder: the language model of
    transformers' class of this name, same logits on text. The vision tower is not built or read."""

    backbone_class = Gemma3Model
    # As transformers reads them: the checkpoints store the module `model.language_model` as `language_model.model`.
    checkpoint_renames = ((r"^language_model\.model\.", "model.language_model."),
                          (r"^language_model\.lm_head\.", "lm_head."))
    unbuilt_parts = (r"^(model\.)?(vision_tower|multi_modal_projector)\.",)

    @property
    def decoder(self) -> LlamaModel:
        return self.model.language_model


class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi-3 decoder (see Phi3Config)."""


class SmolLM3ForCausalLM(LlamaForCausalLM):
    """SmolLM3 decoder (see SmolLM3Config)."""
