"""BERT encoder and its two task heads (sequence classification, extractive QA), HF-compatible names.

Module and parameter names equal transformers' (`bert.encoder.layer.0.attention.self.query.weight`, ...) so a
Hugging Face state dict loads without remapping. Attention runs through `F.scaled_dot_product_attention`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from minilora.models.gradient_checkpointing import run_block
from minilora.models.base import ACTIVATIONS, PreTrainedModel, padding_mask_to_bias
from minilora.models.inputs import checked_token_ids
from minilora.models.outputs import ModelOutput
from minilora.ops.linear_group import linear_group

# Checkpoint keys every BERT class drops silently: pre-training heads (`cls.*`, e.g. bert-base-uncased) and the
# position_ids / token_type_ids buffers older transformers versions saved (all-MiniLM-L6-v2 has them).
_IGNORED_KEYS = (r"^cls\.", r"^(bert\.)?embeddings\.(position_ids|token_type_ids)$")


@dataclass
class BertConfig:
    """The subset of HF's `BertConfig` (config.json keys, same names and defaults) that minilora uses."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    position_embedding_type: str = "absolute"
    classifier_dropout: float | None = None
    num_labels: int = 2
    problem_type: str | None = None  # "regression" | "single_label_classification" | "multi_label_classification"
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d: dict) -> BertConfig:
        """Read an HF config.json dict; unknown keys are ignored (and kept in `raw`)."""
        known = {f.name for f in fields(cls)} - {"raw", "num_labels"}
        config = cls(**{k: v for k, v in d.items() if k in known}, raw=dict(d))
        # Like HF: the label count comes from id2label when present, else `num_labels`, else 2.
        if d.get("id2label"):
            config.num_labels = len(d["id2label"])
        elif d.get("num_labels") is not None:
            config.num_labels = int(d["num_labels"])
        config.validate()
        return config

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"{type(self).__name__}: hidden_size ({self.hidden_size}) must be a multiple of "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"{type(self).__name__}: hidden_act {self.hidden_act!r} is not supported; "
                             f"expected one of {sorted(ACTIVATIONS)}")
        if self.position_embedding_type != "absolute":
            raise ValueError(f"{type(self).__name__}: position_embedding_type {self.position_embedding_type!r} is not "
                             "supported; only 'absolute' is")
        if self.raw.get("is_decoder") or self.raw.get("add_cross_attention"):
            raise ValueError(f"{type(self).__name__}: is_decoder / add_cross_attention are not supported; minilora "
                             "runs this family as a bidirectional encoder only")
        if self.problem_type not in (None, "regression", "single_label_classification",
                                     "multi_label_classification"):
            raise ValueError(f"{type(self).__name__}: unknown problem_type {self.problem_type!r}")


@dataclass
class BertModelOutput(ModelOutput):
    """`ModelOutput` plus BERT's pooled output: tanh(dense(hidden state of the first token))."""

    pooler_output: torch.Tensor | None = None


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def default_position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Positions when the caller passes none: 0, 1, 2, ... for every row."""
        seq_len, max_len = input_ids.shape[1], self.position_embeddings.num_embeddings
        if seq_len > max_len:
            raise ValueError(f"input_ids has {seq_len} tokens but max_position_embeddings is {max_len}")
        return torch.arange(seq_len, device=input_ids.device)[None]

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
                position_ids: torch.Tensor | None) -> torch.Tensor:
        if position_ids is None:
            position_ids = self.default_position_ids(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        input_ids = checked_token_ids(input_ids, self.word_embeddings)
        x = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
             + self.position_embeddings(position_ids))
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor | None) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
                   for t in linear_group(x, self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_bias,
                                             dropout_p=self.dropout_p if self.training else 0.0)
        return out.transpose(1, 2).flatten(2)


class BertSelfOutput(nn.Module):
    """Projection (from `in_features`, default hidden_size) + dropout + post-norm residual, after attention."""

    def __init__(self, config: BertConfig, in_features: int | None = None):
        super().__init__()
        self.dense = nn.Linear(in_features or config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, mask_bias), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertOutput(BertSelfOutput):
    """The same after the feed-forward: down projection from intermediate_size + dropout + post-norm residual."""

    def __init__(self, config: BertConfig):
        super().__init__(config, config.intermediate_size)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, mask_bias)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layer:
            x = run_block(self, layer, x, mask_bias)
        return x


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden_states[:, 0]))


class BertPreTrainedModel(PreTrainedModel):
    """What every BERT class shares: config handling, init, and the loader's hooks."""

    base_model_prefix = "bert"  # the encoder's attribute in task models, and its checkpoint key prefix
    ignore_unexpected_keys: tuple[str, ...] = _IGNORED_KEYS
    # Like transformers, a missing pooler is initialised afresh (with a warning) instead of failing the load:
    # *ForMaskedLM checkpoints (e.g. roberta-base) have none. Unlike a task head it stays an ordinary layer.
    init_if_missing: tuple[str, ...] = (r"^(\w+\.)?pooler\.",)

    @property
    def base_model(self) -> nn.Module:
        """The bare encoder (the model itself for a `BertModel`)."""
        return getattr(self, self.base_model_prefix, self)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.base_model.embeddings.word_embeddings


class BertModel(BertPreTrainedModel):
    """The bare BERT encoder.

    Returns a `BertModelOutput`: `last_hidden_state` (batch, seq, hidden) and, when the model has a pooler
    (`add_pooling_layer=True`, HF's default), `pooler_output` (batch, hidden).
    """

    # A task checkpoint (BertForSequenceClassification / QA) loads into the bare encoder minus its head.
    ignore_unexpected_keys = _IGNORED_KEYS + (r"^classifier\.", r"^qa_outputs\.")
    embeddings_class: type[BertEmbeddings] = BertEmbeddings

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = self.embeddings_class(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> BertModelOutput:
        x = self.embeddings(input_ids, token_type_ids, position_ids)
        x = self.encoder(x, padding_mask_to_bias(attention_mask, x.dtype))
        pooled = self.pooler(x) if self.pooler is not None else None
        return BertModelOutput(last_hidden_state=x, pooler_output=pooled)


class BertForSequenceClassification(BertPreTrainedModel):
    """BERT + dropout + linear classifier on the pooled output; the loss is HF's (`classification_loss`)."""

    new_head_prefixes = ("classifier.",)

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.bert = BertModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def get_output_embeddings(self) -> nn.Module:
        return self.classifier

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> ModelOutput:
        pooled = self.bert(input_ids, attention_mask, token_type_ids, position_ids).pooler_output
        logits = self.classifier(self.dropout(pooled))
        loss = self.compute_loss(logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits)

    def compute_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return classification_loss(logits, labels, self.config.problem_type)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, problem_type: str | None) -> torch.Tensor:
    """HF's sequence-classification loss: MSE when there is one label, cross-entropy for integer labels,
    BCE-with-logits for float multi-label targets (or as `problem_type` says)."""
    num_labels = logits.shape[-1]
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    logits = logits.float()
    if problem_type == "regression":
        labels = labels.to(logits.dtype)
        return F.mse_loss(logits.squeeze(), labels.squeeze()) if num_labels == 1 else F.mse_loss(logits, labels)
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


class BertForQuestionAnswering(BertPreTrainedModel):
    """BERT (no pooler) + `qa_outputs` (hidden -> 2): per-token start and end logits.

    Loss like HF: mean of the start and end cross-entropies; positions are clamped to [0, seq_len] and
    positions at seq_len (i.e. outside the input) are ignored.
    """

    new_head_prefixes = ("qa_outputs.",)
    ignore_unexpected_keys = _IGNORED_KEYS + (r"^(bert\.)?pooler\.",)
    encoder_class: type[BertModel] = BertModel  # stored as `self.<base_model_prefix>`

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        setattr(self, self.base_model_prefix, self.encoder_class(config, add_pooling_layer=False))
        self.qa_outputs = nn.Linear(config.hidden_size, 2)

    def get_output_embeddings(self) -> nn.Module:
        return self.qa_outputs

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                start_positions: torch.Tensor | None = None,
                end_positions: torch.Tensor | None = None) -> ModelOutput:
        hidden = self.base_model(input_ids, attention_mask, token_type_ids, position_ids).last_hidden_state
        start_logits, end_logits = self.qa_outputs(hidden).unbind(dim=-1)
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start_logits.shape[1]

            def span_loss(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
                positions = positions.view(-1).clamp(0, ignored)
                return F.cross_entropy(logits.float(), positions, ignore_index=ignored)

            loss = (span_loss(start_logits, start_positions) + span_loss(end_logits, end_positions)) / 2
        return ModelOutput(loss=loss, start_logits=start_logits.contiguous(), end_logits=end_logits.contiguous())
