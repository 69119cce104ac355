"""Gradient checkpointing per transformer block (non-reentrant, so frozen inputs need no workaround)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from minilora.ops.checkpointed import checkpointed_block


def run_block(owner: nn.Module, block: nn.Module, *args, **kwargs):
    """Call `block(*args, **kwargs)`, recomputing its activations in backward when `owner` asks for it.

    Model code calls this in its layer loop; `enable_gradient_checkpointing` flips the flag. Only
    checkpoints while autograd records (training or a grad-enabled eval pass), never under no_grad.
    """
    if getattr(owner, "gradient_checkpointing", False) and torch.is_grad_enabled():
        return checkpoint(_checkpointed(block), *args, use_reentrant=False, **kwargs)
    return block(*args, **kwargs)


def _checkpointed(block: nn.Module):
    def run(*args, **kwargs):
        with checkpointed_block():  # frozen layers may save their dense weight: it is recomputed, not kept
            return block(*args, **kwargs)
    return run


def enable_gradient_checkpointing(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Turn per-block checkpointing on (or off) in every stack of `model` that supports it."""
    stacks = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    if not stacks:
        raise ValueError(f"{type(model).__name__} has no block stack that supports gradient checkpointing")
    for m in stacks:
        m.gradient_checkpointing = enabled
    return model
