"""RoBERTa and XLM-RoBERTa: BERT's encoder (models/bert.py) with what fairseq changed around it.

- Positions count only real tokens and start after `pad_token_id`; a pad sits at position `pad_token_id`,
  whose embedding row is the padding row (fairseq's `make_positions`).
- One token type in the released checkpoints (`type_vocab_size: 1`); ids default to 0 as in BERT.
- The encoder lives under `roberta.` in task checkpoints, and the masked-LM head is `lm_head.*`.
- Sequence classification reads the `<s>` token through its own head (dense + tanh + out_proj, dropout
  around the dense), not through a pooler; task models have no pooler.
XLM-RoBERTa is the same network with another vocabulary: its classes only carry HF's names.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minilora.models.bert import (
    BertConfig,
    BertEmbeddings,
    BertForQuestionAnswering,
    BertModel,
    BertPreTrainedModel,
    classification_loss,
)
from minilora.models.outputs import ModelOutput

# Dropped silently, as BERT drops `cls.*`: the masked-LM head of roberta-base & co., and the buffers older
# transformers versions saved.
_ROBERTA_IGNORED_KEYS = (r"^lm_head\.", r"^(roberta\.)?embeddings\.(position_ids|token_type_ids)$")
# Task models have no pooler: a base checkpoint's is dropped (as transformers does).
_TASK_IGNORED_KEYS = (*_ROBERTA_IGNORED_KEYS, r"^(roberta\.)?pooler\.")


@dataclass
class RobertaConfig(BertConfig):
    """HF's `RobertaConfig` (BERT's fields; RoBERTa's defaults)."""

    vocab_size: int = 50265
    pad_token_id: int | None = 1

    def validate(self) -> None:
        super().validate()
        if self.pad_token_id is None:
            raise ValueError(f"{type(self).__name__}: pad_token_id is required (positions are counted from it)")


@dataclass
class XLMRobertaConfig(RobertaConfig):
    """HF's `XLMRobertaConfig`: RoBERTa's with its own default vocabulary size."""

    vocab_size: int = 30522


class RobertaEmbeddings(BertEmbeddings):
    def __init__(self, config: RobertaConfig):
        super().__init__(config)
        self.position_embeddings.padding_idx = config.pad_token_id  # as in HF: no gradient to the pad position

    def default_position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """pad_token_id + 1, + 2, ... over the real tokens of each row; pad_token_id at the pads."""
        pad, max_len = self.word_embeddings.padding_idx, self.position_embeddings.num_embeddings
        if input_ids.shape[1] + pad >= max_len:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens but this model takes at most "
                             f"{max_len - pad - 1} (max_position_embeddings {max_len} - pad_token_id {pad} - 1)")
        real = input_ids.ne(pad).long()
        return torch.cumsum(real, dim=1) * real + pad


class RobertaModel(BertModel):
    """The bare RoBERTa encoder: `last_hidden_state` and (with the pooler) `pooler_output`, as `BertModel`."""

    base_model_prefix = "roberta"
    ignore_unexpected_keys = _ROBERTA_IGNORED_KEYS + (r"^classifier\.", r"^qa_outputs\.")
    embeddings_class = RobertaEmbeddings


class RobertaClassificationHead(nn.Module):
    """dropout -> dense -> tanh -> dropout -> out_proj, on the hidden state of the first token (`<s>`)."""

    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = self.dropout(hidden_states[:, 0])
        x = self.dropout(torch.tanh(self.dense(x)))
        return self.out_proj(x)


class RobertaForSequenceClassification(BertPreTrainedModel):
    """RoBERTa (no pooler) + `RobertaClassificationHead`; the loss is BERT's (`classification_loss`)."""

    base_model_prefix = "roberta"
    new_head_prefixes = ("classifier.",)
    ignore_unexpected_keys = _TASK_IGNORED_KEYS

    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.roberta = RobertaModel(config, add_pooling_layer=False)
        self.classifier = RobertaClassificationHead(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> ModelOutput:
        hidden = self.roberta(input_ids, attention_mask, token_type_ids, position_ids).last_hidden_state
        logits = self.classifier(hidden)
        loss = classification_loss(logits, labels, self.config.problem_type) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits)


class RobertaForQuestionAnswering(BertForQuestionAnswering):
    """RoBERTa (no pooler) + `qa_outputs`: BERT's span head and loss."""

    base_model_prefix = "roberta"
    ignore_unexpected_keys = _TASK_IGNORED_KEYS
    encoder_class = RobertaModel


# XLM-RoBERTa: the same classes under HF's names (saved as `architectures`, matched on load).
class XLMRobertaModel(RobertaModel):
    pass


class XLMRobertaForSequenceClassification(RobertaForSequenceClassification):
    pass


class XLMRobertaForQuestionAnswering(RobertaForQuestionAnswering):
    pass
