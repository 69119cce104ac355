"""LlamaConfig: the config.json of Llama and of the families built like it (minilora/models/families.py), checked."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import ClassVar

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "longrope", "yarn")
LAYER_TYPES = ("full_attention", "sliding_attention")
HIDDEN_ACTS = ("silu", "gelu_pytorch_tanh")  # of models.base.ACTIVATIONS: what the families use


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
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "dynamic" | "llama3" | "longrope", "factor": ..., ...}
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    # Used by other families (their config.json keys, read only where `family_keys` lists them).
    sliding_window: int | None = None  # a sliding layer's query sees the last `sliding_window` keys (itself included)
    layer_types: list[str] | None = None  # per layer "full_attention" | "sliding_attention"; None: all full
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5; None: head_dim ** -0.5
    attn_logit_softcapping: float | None = None  # scores -> c * tanh(scores / c)
    final_logit_softcapping: float | None = None  # logits -> c * tanh(logits / c)
    rope_local_theta: float | None = None  # RoPE base of sliding layers, unscaled (Gemma 3); None: as full layers
    partial_rotary_factor: float = 1.0  # rotate only the first head_dim * factor dimensions of q and k
    original_max_position_embeddings: int | None = None  # pre-training length for llama3 / longrope / yarn
    resid_pdrop: float = 0.0  # dropout on the attention and MLP outputs before the residual add (Phi-3)
    no_rope_layers: list[int] | None = None  # per layer 1: RoPE, 0: no position encoding (SmolLM3); None: all 1
    model_type: str = "llama"
    raw: dict = field(default_factory=dict)

    # Architecture switches of a family (class attributes of its config subclass, never read from config.json).
    family_keys: ClassVar[frozenset[str]] = frozenset()  # config.json keys beyond Llama's that the family reads
    ignored_keys: ClassVar[frozenset[str]] = frozenset()  # Llama keys the family's transformers class ignores
    qkv_bias: ClassVar[bool] = False  # bias on q/k/v whatever attention_bias says (Qwen2)
    qk_norm: ClassVar[bool] = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3, Gemma 3)
    gemma_norm: ClassVar[bool] = False  # RMSNorm as x * (1 + w) in fp32, embeddings * sqrt(hidden_size)
    sandwich_norm: ClassVar[bool] = False  # norms after attention and MLP too (Gemma 2/3)
    fused_projections: ClassVar[bool] = False  # qkv_proj and gate_up_proj (Phi-3)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported for model_type {self.model_type!r}: "
                             f"expected one of {HIDDEN_ACTS}")
        if self.layer_types is None:
            kind = "sliding_attention" if self.sliding_window else "full_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) - set(LAYER_TYPES):
            raise ValueError(f"layer_types must list one of {LAYER_TYPES} for each of the {self.num_hidden_layers} "
                             f"layers, got {self.layer_types}")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError("layer_types has sliding_attention layers but config field sliding_window is not set")
        if self.no_rope_layers is not None and (len(self.no_rope_layers) != self.num_hidden_layers
                                                or any(v not in (0, 1) for v in self.no_rope_layers)):
            raise ValueError(f"no_rope_layers must list 1 (RoPE) or 0 (none) for each of the {self.num_hidden_layers} "
                             f"layers, got {self.no_rope_layers}")
        self.rope_scaling = self._checked_rope_scaling()

    def uses_rope(self, layer: int) -> bool:
        """Whether layer `layer` rotates q and k (SmolLM3 leaves some layers without position encoding)."""
        return self.no_rope_layers is None or bool(self.no_rope_layers[layer])

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def _checked_rope_scaling(self) -> dict | None:
        """rope_scaling with `rope_type` spelled out (old configs say `type`); None for plain RoPE."""
        params = dict(self.rope_scaling or {})
        for key in ("rope_theta", "partial_rotary_factor"):
            params.pop(key, None)
        rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
        if rope_type == "default":
            return None
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"config.json rope_scaling / rope_parameters: rope type {rope_type!r} is not supported "
                             f"by minilora; expected one of {ROPE_TYPES}")
        for key, value in params.items():
            if key in _ROPE_NUMBERS and value is not None and not (
                    isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf):
                raise ValueError(f"config.json rope_scaling / rope_parameters: {key} must be a positive number, "
                                 f"got {value!r}")
        required = {"longrope": {"short_factor", "long_factor"}, "yarn": set(),  # yarn infers its factor
                    "llama3": {"factor", "low_freq_factor", "high_freq_factor"}}.get(rope_type, {"factor"})
        if required - params.keys():
            raise KeyError(f"rope scaling {rope_type!r} in config is missing {sorted(required - params.keys())}")
        if rope_type in ("llama3", "longrope", "yarn"):
            # Phi-3 keeps the pre-training length at the top level of config.json; it wins, as in transformers.
            old_len = self.original_max_position_embeddings or params.get("original_max_position_embeddings")
            params["original_max_position_embeddings"] = old_len or self.max_position_embeddings
        if rope_type == "yarn":  # factor and attention factor inferred as transformers does when left out
            params["factor"] = params.get("factor") or self.max_position_embeddings / params[
                "original_max_position_embeddings"]
            if params.get("attention_factor") is None:
                factor, mscale, mscale_all_dim = params["factor"], params.get("mscale"), params.get("mscale_all_dim")
                params["attention_factor"] = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                                              if mscale and mscale_all_dim else _yarn_mscale(factor))
        if rope_type == "longrope":
            old_len = params["original_max_position_embeddings"]
            factor = params.get("factor") or self.max_position_embeddings / old_len
            if params.get("attention_factor") is None:
                params["attention_factor"] = math.sqrt(1 + math.log(factor) / math.log(old_len)) if factor > 1 else 1.0
            for key in ("short_factor", "long_factor"):
                if len(params[key]) != self.rotary_dim // 2:
                    raise ValueError(f"rope scaling longrope: {key} has {len(params[key])} entries, expected "
                                     f"rotary_dim // 2 = {self.rotary_dim // 2}")
        return {"rope_type": rope_type, **params}

    @classmethod
    def from_dict(cls, d: dict) -> LlamaConfig:
        """Build from a Hugging Face config.json dict (v4 `rope_theta`/`rope_scaling` or v5 `rope_parameters`)."""
        raw, d = dict(d), cls.normalized(dict(d))
        known = ({f.name for f in fields(cls)} - _FAMILY_ONLY_KEYS - cls.ignored_keys | cls.family_keys) - {
            "raw", "rope_theta", "rope_scaling", "partial_rotary_factor"}
        kwargs = {k: d[k] for k in known if d.get(k) is not None}
        kwargs.update({k: None for k in known & _NULLABLE_KEYS if k in d and d[k] is None})
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        theta = rope.get("rope_theta") or d.get("rope_theta")
        if theta is not None:
            kwargs["rope_theta"] = float(theta)
        factor = rope.get("partial_rotary_factor") or d.get("partial_rotary_factor")
        if factor is not None and "partial_rotary_factor" in cls.family_keys:
            kwargs["partial_rotary_factor"] = float(factor)
        return cls(**kwargs, rope_scaling=rope, raw=raw)

    @classmethod
    def normalized(cls, d: dict) -> dict:
        """config.json translated to this class's fields (a family overrides it for its own spellings)."""
        return d


_ROPE_NUMBERS = frozenset({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
                           "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"})


def _yarn_mscale(factor: float, mscale: float | None = None) -> float:
    """YaRN's attention temperature for a context stretched `factor` times (the paper's 0.1 ln(s) + 1)."""
    return 0.1 * (mscale or 1.0) * math.log(factor) + 1.0 if factor > 1 else 1.0


# Fields only the families read from config.json; None in config.json means "off" for the nullable ones.
_FAMILY_ONLY_KEYS = frozenset({"sliding_window", "layer_types", "query_pre_attn_scalar", "attn_logit_softcapping",
                               "final_logit_softcapping", "rope_local_theta", "partial_rotary_factor", "resid_pdrop",
                               "original_max_position_embeddings", "no_rope_layers"})
_NULLABLE_KEYS = frozenset({"sliding_window", "attn_logit_softcapping", "final_logit_softcapping"})
