"""Tokenized data sets (`Features`) and the collator that pads them into tensor batches."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

IGNORE_INDEX = -100  # a label the loss skips (prompt tokens, padding, another document's boundary)

# Feature keys the models take, with the value that pads them (None: the tokenizer's pad token id; the scalar
# start/end_positions are never padded). Other keys (offset_mapping, example_id, ...) stay in the features for
# post-processing only.
PAD_VALUES: dict[str, int | None] = {
    "input_ids": None, "attention_mask": 0, "token_type_ids": 0, "labels": IGNORE_INDEX, "position_ids": 0,
    "decoder_input_ids": None, "decoder_attention_mask": 0, "start_positions": None, "end_positions": None,
}


class Features(list):
    """A list of tokenized examples (dicts of token id lists) plus `source` and `num_dropped`.

    `num_dropped` counts the records a task function left out (too long, nothing to learn from, ...).
    """

    def __init__(self, features: Iterable[dict] = (), source: str = "records", num_dropped: int = 0):
        super().__init__(features)
        self.source = source
        self.num_dropped = num_dropped


class Collator:
    """Turn a list of features into a batch of tensors, padding sequences to the batch's longest.

    `input_ids` are padded with `pad_token_id`, masks and token types with 0 and `labels` with -100
    (so the loss ignores them). Scalar features (class labels, start/end positions) are stacked.
    `pad_to_multiple_of` rounds the padded length up (8 or 64 helps tensor cores on GPUs).
    """

    def __init__(self, pad_token_id: int = 0, *, padding_side: str = "right", pad_to_multiple_of: int | None = None):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("Collator: empty batch")
        batch = {}
        for key in [k for k in features[0] if k in PAD_VALUES]:
            try:
                values = [f[key] for f in features]
            except KeyError:
                raise KeyError(f"Collator: some features in the batch have no {key!r}") from None
            if isinstance(values[0], (list, tuple)):
                batch[key] = self._pad(values, self.pad_token_id if PAD_VALUES[key] is None else PAD_VALUES[key])
            else:
                batch[key] = torch.tensor(values)
        return batch

    def _pad(self, sequences: list, pad: int) -> torch.Tensor:
        length = max(len(s) for s in sequences)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        out = torch.full((len(sequences), length), pad, dtype=torch.long)
        for i, seq in enumerate(sequences):
            start = 0 if self.padding_side == "right" else length - len(seq)
            out[i, start:start + len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        return out
