"""Extractive QA (SQuAD): question/context windows with answer token positions, and logits back to text.

Long contexts are split into overlapping windows of `max_length` tokens (`doc_stride` tokens of overlap),
each one a feature. A feature whose window does not hold the whole answer (or whose example has no
answer) points both positions at the CLS token, as in the Hugging Face run_qa example.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from minilora.checks import check_number
from minilora.data.collate import Features
from minilora.data.readers import get_field, get_text, require_rows, source_of


def qa_dataset(records: Sequence[dict], tokenizer, *, max_length: int = 384, doc_stride: int = 128,
               question_column: str = "question", context_column: str = "context",
               answers_column: str = "answers", id_column: str = "id") -> Features:
    """Tokenize SQuAD-style rows into features for training and evaluation.

    Each feature has input_ids, attention_mask, (token_type_ids), start_positions and end_positions (when
    the rows have `answers_column`: {"text": [...], "answer_start": [...]}, the first answer is the
    target), plus `example_id` (the row's `id_column`, else its index) and `offset_mapping` (character
    spans of context tokens, None elsewhere) for `postprocess_qa_predictions`.
    """
    require_rows(records, "qa_dataset")
    check_number(max_length, "qa_dataset: max_length", low=1, integer=True)
    if not 0 <= doc_stride < max_length:
        raise ValueError(f"qa_dataset: doc_stride must be in [0, max_length={max_length}), got {doc_stride}")
    # leading whitespace in questions only wastes window space
    questions = [get_text(row, question_column, records, i).lstrip() for i, row in enumerate(records)]
    contexts = [get_text(row, context_column, records, i) for i, row in enumerate(records)]
    has_answers = answers_column in records[0]
    spans = [_answer_span(row, answers_column, records, i) for i, row in enumerate(records)] if has_answers else None

    enc = tokenizer(questions, contexts, truncation="only_second", max_length=max_length, stride=doc_stride,
                    return_overflowing_tokens=True, return_offsets_mapping=True)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    features = Features(source=source_of(records))
    for i, ids in enumerate(enc["input_ids"]):
        example = enc["overflow_to_sample_mapping"][i]
        sequence_ids = enc.sequence_ids(i)
        offsets = [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][i], sequence_ids, strict=True)]
        feature = {k: enc[k][i] for k in keys}
        if spans is not None:
            cls_index = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
            feature["start_positions"], feature["end_positions"] = _token_span(offsets, spans[example], cls_index)
        feature["example_id"] = records[example].get(id_column, example)
        feature["offset_mapping"] = offsets
        features.append(feature)
    return features


def _answer_span(row: dict, column: str, records, index: int) -> tuple[int, int] | None:
    """(start_char, end_char) of the first answer, None for an unanswerable question."""
    answers = get_field(row, column, records, index)
    if not isinstance(answers, dict) or "text" not in answers or "answer_start" not in answers:
        raise ValueError(f"{source_of(records)}: row {index}, column {column!r} must be "
                         "{'text': [...], 'answer_start': [...]}")
    if not answers["text"]:
        return None
    start = int(answers["answer_start"][0])
    return start, start + len(answers["text"][0])


def _token_span(offsets: list, span: tuple[int, int] | None, cls_index: int) -> tuple[int, int]:
    """Token positions of the character span inside this window, or (cls, cls) when it is not all inside."""
    context = [t for t, o in enumerate(offsets) if o is not None]
    if span is None or not context or offsets[context[0]][0] > span[0] or offsets[context[-1]][1] < span[1]:
        return cls_index, cls_index
    start = max(t for t in context if offsets[t][0] <= span[0])
    end = min(t for t in context if offsets[t][1] >= span[1])
    return start, end


def postprocess_qa_predictions(examples: Sequence[dict], features: Sequence[dict], start_logits, end_logits,
                               n_best: int = 20, max_answer_length: int = 30, *, id_column: str = "id",
                               context_column: str = "context") -> dict:
    """Answer text per example id from per-feature start/end logits (the HF example's SQuAD v1 algorithm).

    For every feature of an example, the `n_best` highest start and end logits are paired; pairs outside the
    context, reversed, or longer than `max_answer_length` tokens are skipped, and the highest
    start + end score over all the example's features wins. `start_logits`/`end_logits` hold one row per
    feature (a 2-D array, or a list of 1-D arrays of each feature's own length). An example with no valid
    pair gets "".
    """
    if not (len(features) == len(start_logits) == len(end_logits)):
        raise ValueError(f"postprocess_qa_predictions: {len(features)} features but {len(start_logits)} start "
                         f"and {len(end_logits)} end logit rows")
    features_of: dict = {}
    for f_index, feature in enumerate(features):
        features_of.setdefault(feature["example_id"], []).append(f_index)

    predictions = {}
    for e_index, example in enumerate(examples):
        example_id = example.get(id_column, e_index)
        best_score, best_span = -np.inf, None
        for f_index in features_of.get(example_id, []):
            offsets = features[f_index]["offset_mapping"]
            starts, ends = np.asarray(start_logits[f_index]), np.asarray(end_logits[f_index])
            for s in np.argsort(starts)[::-1][:n_best]:
                for e in np.argsort(ends)[::-1][:n_best]:
                    inside = s < len(offsets) and e < len(offsets) and offsets[s] is not None and offsets[e] is not None
                    if inside and s <= e < s + max_answer_length and starts[s] + ends[e] > best_score:
                        best_score, best_span = starts[s] + ends[e], (offsets[s][0], offsets[e][1])
        context = example[context_column]
        predictions[example_id] = context[best_span[0]:best_span[1]] if best_span else ""
    return predictions
