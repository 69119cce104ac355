"""Packing: whole documents placed side by side in rows of at most `max_length` tokens, so batches carry
little padding. Each document keeps its own positions (0, 1, 2, ... in `position_ids`), which is how the
models find the boundaries and mask attention between documents (`minilora.models.masks`), and the first
label of each document is -100, so no token is ever predicted from another document.
"""
from __future__ import annotations

from minilora.data.collate import IGNORE_INDEX, Features


def pack(documents: list[tuple[list[int], list[int]]], max_length: int, source: str = "records") -> Features:
    """Rows of whole (input_ids, labels) documents, each at most `max_length` tokens long.

    Documents are first cut to `max_length` by the caller (a document never spans two rows). They are
    placed first-fit in order of decreasing length (fewest rows, least padding); each row is a feature
    with input_ids, attention_mask, labels and position_ids.
    """
    rows: list[list[tuple[list[int], list[int]]]] = []
    free: list[int] = []
    for ids, labels in sorted(documents, key=lambda doc: -len(doc[0])):
        if len(ids) > max_length:
            raise ValueError(f"pack: a document of {len(ids)} tokens is longer than max_length={max_length}")
        row = next((i for i, room in enumerate(free) if room >= len(ids)), len(rows))
        if row == len(rows):
            rows.append([])
            free.append(max_length)
        rows[row].append((ids, labels))
        free[row] -= len(ids)
    features = Features(source=source)
    for docs in rows:
        features.append({
            "input_ids": [t for ids, _ in docs for t in ids],
            "attention_mask": [1] * sum(len(ids) for ids, _ in docs),
            "labels": [t for _, labels in docs for t in [IGNORE_INDEX, *labels[1:]]],
            "position_ids": [p for ids, _ in docs for p in range(len(ids))],
        })
    return features


def to_features(documents: list[tuple[list[int], list[int]]], max_length: int, packing: bool, source: str,
                dropped: int) -> Features:
    """(input_ids, labels) documents as features: packed rows, or one row per document; `num_dropped` noted."""
    if packing:
        features = pack(documents, max_length, source)
    else:
        features = Features(({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
                             for ids, labels in documents), source=source)
    features.num_dropped = dropped
    return features
