"""T5Config: the config.json of T5 (v1.0 "relu", v1.1 / Flan "gated-gelu"), checked."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from minilora.models.base import ACTIVATIONS


@dataclass
class T5Config:
    """The subset of HF's `T5Config` (config.json keys, same names and defaults) that minilora uses.

    `dense_act_fn` / `is_gated_act` are derived from `feed_forward_proj` ("relu", "gated-gelu", "gated-silu",
    ...) unless config.json states them. `scale_decoder_outputs` (the d_model**-0.5 before the LM head)
    defaults to `tie_word_embeddings`, as in HF.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    initializer_factor: float = 1.0
    feed_forward_proj: str = "relu"
    dense_act_fn: str | None = None
    is_gated_act: bool | None = None
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool | None = None
    pad_token_id: int = 0
    eos_token_id: int | list[int] | None = 1
    decoder_start_token_id: int | None = None
    raw: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"T5Config: feed_forward_proj {self.feed_forward_proj!r} must be 'ACT' or "
                             "'gated-ACT', e.g. 'relu' or 'gated-gelu'")
        if self.dense_act_fn is None:
            # HF maps "gated-gelu" to the tanh approximation for backward compatibility with T5 v1.1.
            self.dense_act_fn = "gelu_new" if self.feed_forward_proj == "gated-gelu" else parts[-1]
        if self.is_gated_act is None:
            self.is_gated_act = parts[0] == "gated"
        if self.dense_act_fn not in ACTIVATIONS:
            raise ValueError(f"T5Config: activation {self.dense_act_fn!r} is not supported; "
                             f"expected one of {sorted(ACTIVATIONS)}")
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = self.tie_word_embeddings is not False
        if self.decoder_start_token_id is None:
            self.decoder_start_token_id = self.pad_token_id  # T5 starts decoding from the pad token

    @classmethod
    def from_dict(cls, d: dict) -> T5Config:
        """Read an HF config.json dict; unknown keys are ignored (and kept in `raw`)."""
        known = {f.name for f in fields(cls)} - {"raw"}
        return cls(**{k: v for k, v in d.items() if k in known}, raw=dict(d))
