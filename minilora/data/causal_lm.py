"""Causal-LM supervised fine-tuning data: a `text` column, or prompt/response columns with the prompt masked."""
from __future__ import annotations

from typing import Sequence

from minilora.checks import check_number
from minilora.data.collate import IGNORE_INDEX, Features
from minilora.data.packing import to_features
from minilora.data.readers import get_text, require_rows, source_of


def causal_lm_dataset(records: Sequence[dict], tokenizer, *, max_length: int = 512, text_column: str = "text",
                      prompt_column: str | None = None, response_column: str | None = None,
                      packing: bool = False, add_eos: bool = True) -> Features:
    """Tokenize rows for causal-LM training: features with input_ids, attention_mask and labels.

    - Default: the whole `text_column` is learned (e.g. Llama-2 chat text "<s>[INST] ... [/INST] ... </s>").
    - With `prompt_column` and `response_column`: prompt tokens (with the tokenizer's special tokens) are
      followed by the response tokens, and only the response is learned (prompt labels are -100).
    - `add_eos` appends the EOS token unless the text already ends with it.
    - Each example is truncated to `max_length` (the rest of a longer one is dropped; the collator pads to
      the batch's longest); examples left with no learnable token are dropped and counted in `num_dropped`.
    - With `packing`, whole examples share rows of up to `max_length` tokens with the loss and gradients of
      the examples unpacked (`minilora.data.packing` says how).
    """
    require_rows(records, "causal_lm_dataset")
    if (prompt_column is None) != (response_column is None):
        raise ValueError("causal_lm_dataset: give both prompt_column and response_column, or neither")
    check_number(max_length, "causal_lm_dataset: max_length", low=1, integer=True)

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

    examples = [(ids[:max_length], labels[:max_length]) for ids, labels in examples]
    kept = [(ids, labels) for ids, labels in examples if any(label != IGNORE_INDEX for label in labels)]
    if not kept:
        raise ValueError(f"causal_lm_dataset: no example of {source_of(records)} has a response token within "
                         f"max_length={max_length}")
    return to_features(kept, max_length, packing, source_of(records), len(examples) - len(kept))
