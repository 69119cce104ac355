"""Dropout masks for the LoRA input: cheap to draw, and shared by layers fed the very same tensor.

A mask is 16 random bits per element compared with p (p rounded to a multiple of 1/65536), several times
cheaper than `bernoulli_` on CPU. Sibling layers that read one input (q/k/v, gate/up) reuse the last mask
drawn for it, so they drop the same features of it and the dropped input is computed once.
"""
from __future__ import annotations

import weakref

import numpy as np
import torch

DROPOUT_RESOLUTION = 1 << 16  # dropout probabilities are rounded to multiples of 1 / 65536


def random_words(n: int, device: torch.device) -> torch.Tensor:
    """n uniform random int64 words, decided by torch's default generator (`torch.manual_seed`, gradient
    checkpointing's RNG replay). On CPU they come from numpy's PCG64 seeded by one torch draw: torch.randint's
    serial mt19937 is what made per-layer dropout masks expensive."""
    if device.type != "cpu":
        return torch.randint(-(1 << 63), (1 << 63) - 1, (n,), dtype=torch.int64, device=device)
    seed = int(torch.randint(0, 1 << 62, ()))
    return torch.from_numpy(np.random.PCG64(seed).random_raw(n).view(np.int64))


def dropout_keep_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """A 0/1 mask shaped and typed like x keeping each element with probability 1 - p', and p' (p rounded to a
    multiple of 1/65536)."""
    drop = round(p * DROPOUT_RESOLUTION)
    n = x.numel()
    draws = random_words((n + 3) // 4, x.device).view(torch.int16)[:n].view(x.shape)  # 4 draws per word
    keep = torch.empty_like(x, memory_format=torch.contiguous_format)
    torch.ge(draws, drop - DROPOUT_RESOLUTION // 2, out=keep)  # comparisons into a float tensor: no bool pass
    return keep, drop / DROPOUT_RESOLUTION


class LastMask:
    """The last dropout mask drawn, so layers that get the very same tensor (unchanged since) reuse it.

    Holds the input weakly (an entry dies with its input) and the mask strongly: whether a sibling reuses it
    must not depend on autograd keeping it, or gradient checkpointing's replay would draw a different number
    of masks than the forward did. A caller never reuses an entry twice, so calling one layer again on the
    same tensor draws a new mask, as nn.Dropout would.
    """

    def __init__(self):
        self.entry = None  # (weakref to input, input._version, p, mask, effective p, user ids)

    def get(self, user: object, x: torch.Tensor, p: float) -> tuple[torch.Tensor, float] | None:
        if self.entry is None:
            return None
        ref, version, entry_p, keep, p_eff, users = self.entry
        if ref() is not x or x._version != version or entry_p != p or id(user) in users:
            return None
        users.add(id(user))
        return keep, p_eff

    def put(self, user: object, x: torch.Tensor, p: float, keep: torch.Tensor, p_eff: float) -> None:
        def forget(ref):
            if self.entry is not None and self.entry[0] is ref:
                self.entry = None

        self.entry = (weakref.ref(x, forget), x._version, p, keep, p_eff, {id(user)})


_last_mask = LastMask()


def shared_dropout_mask(user: object, x: torch.Tensor, p: float, share: bool = True) -> tuple[torch.Tensor, float]:
    """`dropout_keep_mask(x, p)`, or the mask a sibling already drew for this very tensor when `share`."""
    share = share and not x.is_inference()  # inference tensors have no version counter
    mask = _last_mask.get(user, x, p) if share else None
    if mask is None:
        mask = dropout_keep_mask(x, p)
        if share:
            _last_mask.put(user, x, p, *mask)
    return mask
