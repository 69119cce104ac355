"""Sequence classification data: a text (or a text pair) and a label."""
from __future__ import annotations

from typing import Sequence

from minilora.data.collate import Features
from minilora.data.readers import get_field, get_text, require_rows, source_of


def classification_dataset(records: Sequence[dict], tokenizer, *, text_column: str = "text",
                           text_pair_column: str | None = None, label_column: str = "label",
                           num_labels: int | None = None, label_names: Sequence[str] | None = None,
                           max_length: int = 512) -> Features:
    """Tokenize rows for classification: features with input_ids, attention_mask, (token_type_ids) and labels.

    Labels are class ids (ints, or digit strings as read from CSV) or, with `label_names`, names mapped to
    their index. Ids must lie in [0, num_labels) (num_labels defaults to len(label_names) when given).
    `num_labels=1` means regression: labels become floats. Texts are truncated to `max_length` tokens.
    """
    require_rows(records, "classification_dataset")
    if label_names is not None:
        num_labels = num_labels or len(label_names)
    texts = [get_text(row, text_column, records, i) for i, row in enumerate(records)]
    pairs = None if text_pair_column is None else [
        get_text(row, text_pair_column, records, i) for i, row in enumerate(records)]
    labels = [_label(get_field(row, label_column, records, i), i, records, label_column, num_labels, label_names)
              for i, row in enumerate(records)]

    enc = tokenizer(texts, text_pair=pairs, add_special_tokens=True, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return Features(({**{k: enc[k][i] for k in keys}, "labels": labels[i]} for i in range(len(texts))),
                    source=source_of(records))


def _label(value, index: int, records, column: str, num_labels: int | None,
           label_names: Sequence[str] | None) -> int | float:
    where = f"{source_of(records)}: row {index}, column {column!r}"
    if num_labels == 1:  # regression
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: {value!r} is not a number (num_labels=1 means regression)") from None
    if label_names is not None and isinstance(value, str) and value in label_names:
        return list(label_names).index(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        names = f" or one of {list(label_names)}" if label_names is not None else ""
        raise ValueError(f"{where}: label {value!r} is not a class id{names}")
    if value < 0 or (num_labels is not None and value >= num_labels):
        raise ValueError(f"{where}: label {value} is out of range [0, {num_labels if num_labels else 'num_labels'})")
    return value
