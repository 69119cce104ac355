"""Checks at a model's input, shared by every architecture."""
from __future__ import annotations

import torch
from torch import nn


def checked_token_ids(ids: torch.Tensor, embedding: nn.Embedding, name: str = "input_ids") -> torch.Tensor:
    """`ids`, after checking every id indexes `embedding` (0 <= id < its size): a ValueError naming the id and
    the vocabulary size, instead of an IndexError (or a device-side assert) from inside the lookup."""
    if ids.numel():
        low, high = (int(v) for v in torch.aminmax(ids))
        bad = high if high >= embedding.num_embeddings else low if low < 0 else None
        if bad is not None:
            raise ValueError(f"{name} holds token id {bad} but the model's vocabulary has {embedding.num_embeddings} "
                             f"entries (ids 0..{embedding.num_embeddings - 1}): text tokenized for another model?")
    return ids
