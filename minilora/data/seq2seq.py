"""Sequence-to-sequence (T5) data: source text -> input_ids, target text -> labels."""
from __future__ import annotations

from typing import Sequence

from minilora.data.collate import Features
from minilora.data.readers import get_text, require_rows, source_of


def seq2seq_dataset(records: Sequence[dict], tokenizer, *, source_column: str = "source",
                    target_column: str = "target", max_source_length: int = 512, max_target_length: int = 128,
                    drop_long: bool = False) -> Features:
    """Tokenize rows for encoder-decoder training: features with input_ids, attention_mask and labels.

    Sources longer than `max_source_length` tokens are truncated, or with `drop_long=True` left out and
    counted in `num_dropped` (the Flan-T5 recipe, so the model never learns from a cut-off question).
    Targets are truncated to `max_target_length`. Both keep the tokenizer's special tokens (T5's </s>).
    The collator pads labels with -100; the model derives decoder_input_ids from the labels.
    """
    require_rows(records, "seq2seq_dataset")
    sources = [get_text(row, source_column, records, i) for i, row in enumerate(records)]
    targets = [get_text(row, target_column, records, i) for i, row in enumerate(records)]
    source_ids = tokenizer(sources, add_special_tokens=True)["input_ids"]
    label_ids = tokenizer(targets, add_special_tokens=True, truncation=True, max_length=max_target_length)["input_ids"]

    features = Features(source=source_of(records))
    for source, ids, labels in zip(sources, source_ids, label_ids, strict=True):
        if len(ids) > max_source_length:
            if drop_long:
                features.num_dropped += 1
                continue
            # re-tokenize with truncation so the special tokens (T5's closing </s>) survive the cut
            ids = tokenizer(source, add_special_tokens=True, truncation=True, max_length=max_source_length)["input_ids"]
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    if not features:
        raise ValueError(f"seq2seq_dataset: every source in {source_of(records)} is longer than "
                         f"max_source_length={max_source_length} tokens (all {features.num_dropped} dropped)")
    return features
