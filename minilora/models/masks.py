"""Attention masks for packed rows: several documents in one row, none attending to another.

A packed row holds whole documents back to back, each with `position_ids` 0, 1, 2, ... (see
`minilora.data.packing`). The documents are recovered from where the positions restart at 0, so a model
needs nothing but the position ids it already takes: the block-diagonal mask is ANDed into its usual
causal + padding mask.
"""
from __future__ import annotations

import torch


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(batch, seq) index of the document each token belongs to: it grows by one wherever a position is 0."""
    return (position_ids == 0).cumsum(dim=-1)


def same_document_mask(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Boolean (batch, 1, seq, seq), True where query and key lie in the same document; None when no row
    restarts its positions after its first token (nothing is packed, so no mask is needed)."""
    if position_ids.shape[-1] < 2 or not bool((position_ids[:, 1:] == 0).any()):
        return None
    documents = document_ids(position_ids)
    return (documents[:, :, None] == documents[:, None, :])[:, None]


def restrict_to_documents(mask: torch.Tensor | None, position_ids: torch.Tensor, past_len: int) -> torch.Tensor | None:
    """`mask` (boolean (batch | 1, 1, q, kv), or None for plain causal attention) ANDed with the
    block-diagonal mask of packed documents. A forward with a KV cache continues one document: unchanged."""
    if past_len:
        return mask
    same = same_document_mask(position_ids)
    if same is None:
        return mask
    if mask is None:
        seq = position_ids.shape[-1]
        mask = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril()[None, None]
    return mask & same.to(mask.device)
