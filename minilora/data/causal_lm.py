"""Causal-LM supervised fine-tuning data: a `text` column, or prompt/response columns with the prompt masked."""
from __future__ import annotations

from typing import Sequence

from .collate import IGNORE_INDEX, Features
from .readers import get_text, require_rows, source_of


def causal_lm_dataset(records: Sequence[dict], tokenizer, *, max_length: int = 512, text_column: str = "text",
                      prompt_column: str | None = None, response_column: str | None = None,
                      packing: bool = False, add_eos: bool = True) -> Features:
    """Tokenize rows for causal-LM training: features with input_ids, attention_mask and labels.

    - Default: the whole `text_column` is learned (e.g. Llama-2 chat text "<s>[INST] ... [/INST] ... </s>").
    - With `prompt_column` and `response_column`: prompt tokens (with the tokenizer's special tokens) are
      followed by the response tokens, and only the response is learned (prompt labels are -100).
    - `add_eos` appends the EOS token unless the text already ends with it.
    - Without packing each example is truncated to `max_length` (the collator pads to the batch's longest);
      examples left with no learnable token are dropped and counted in `num_dropped`.
    - With `packing`, all examples are concatenated and cut into blocks of exactly `max_length` tokens (the
      tail shorter than a block is dropped), so no padding is needed. Blocks can span example boundaries.
    """
    require_rows(records, "causal_lm_dataset")
    if (prompt_column is None) != (response_column is None):
        raise ValueError("causal_lm_dataset: give both prompt_column and response_column, or neither")
    if max_length < 1:
        raise ValueError(f"causal_lm_dataset: max_length must be >= 1, got {max_length}")

    if prompt_column is not None:
        prompts = [get_text(row, prompt_column, records, i) for i, row in enumerate(records)]
        responses = [get_text(row, response_column, records, i) for i, row in enumerate(records)]
        prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
        response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
        examples = [(p + r, [IGNORE_INDEX] * len(p) + r) for p, r in zip(prompt_ids, response_ids, strict=True)]
    else:
        texts = [get_text(row, text_column, records, i) for i, row in enumerate(records)]
        examples = [(ids, list(ids)) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]

    eos = tokenizer.eos_token_id
    if add_eos:
        if eos is None:
            raise ValueError("causal_lm_dataset: add_eos=True but the tokenizer has no eos_token_id")
        examples = [(ids + [eos], labels + [eos]) if ids[-1:] != [eos] else (ids, labels) for ids, labels in examples]

    if packing:
        return _pack(examples, max_length, source_of(records))
    features = Features(source=source_of(records))
    for ids, labels in examples:
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            features.num_dropped += 1
            continue
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    if not features:
        raise ValueError(f"causal_lm_dataset: no example of {source_of(records)} has a response token within "
                         f"max_length={max_length}")
    return features


def _pack(examples: list[tuple[list[int], list[int]]], block: int, source: str) -> Features:
    ids = [t for example_ids, _ in examples for t in example_ids]
    labels = [t for _, example_labels in examples for t in example_labels]
    if len(ids) < block:
        raise ValueError(f"causal_lm_dataset: {source} has {len(ids)} tokens in all, fewer than one packed block "
                         f"of max_length={block}")
    features = Features(source=source)
    for start in range(0, len(ids) - block + 1, block):
        block_labels = labels[start:start + block]
        if all(label == IGNORE_INDEX for label in block_labels):
            features.num_dropped += 1
            continue
        features.append({"input_ids": ids[start:start + block], "attention_mask": [1] * block, "labels": block_labels})
    return features
